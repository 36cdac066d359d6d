"""Moving a placed model's state to its devices: :class:`_Mover`.

Parameters, buffers and attribute tensors go to the device of the node that uses them, in
place (``.data`` is reassigned, so tied weights stay tied and an optimizer built afterwards
sees the moved parameters). A tensor two nodes on different devices need is refused with an
:class:`~envs.runtime.apply_error.ApplyError` rather than split: the mover can also only
claim, to find such a conflict before anything moves (``check_applicable``).
"""

from __future__ import annotations

from typing import Any

import torch

from envs.runtime.apply_error import ApplyError
from envs.runtime.device_names import _canonical


def _tensor_attr(root: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str, Any]:
    owner_path, _, attr = qualname.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr, getattr(owner, attr)


class _Mover:
    """Moves parameters, buffers and attribute tensors, refusing to split a shared one."""

    def __init__(self, root: torch.nn.Module, real: Any, move: bool = True) -> None:
        self.root = root
        self.real = real  # device name -> torch device string
        self.move = move  # False: claim only, to find a conflict before anything moves
        self.where: dict[int, tuple[str, str]] = {}  # id(tensor) -> (device, who)

    def claim(self, tensor: torch.Tensor, device: str, who: str) -> None:
        key = id(tensor)
        prev = self.where.get(key)
        if prev is not None and prev[0] != device:
            raise ApplyError(
                f"{who} needs a tensor on {device} that {prev[1]} needs on {prev[0]}; a module or "
                f"tensor used by several nodes must have all of them on one device "
                f"(group the placement graph so shared modules are co-located)"
            )
        self.where[key] = (device, who)

    def move_module(self, path: str, device: str, who: str) -> None:
        mod = self.root.get_submodule(path)
        for name, p in mod.named_parameters(recurse=True):
            self.claim(p, device, who)
        for name, b in mod.named_buffers(recurse=True):
            self.claim(b, device, who)
        if not self.move:
            return
        real = self.real(device)
        for sub in mod.modules():
            self._move_own(sub, real)
            if isinstance(sub, torch.nn.RNNBase) and torch.device(real).type == "cuda":
                # Module.to() would do this: cuDNN wants the weights in one contiguous chunk.
                sub.flatten_parameters()

    def move_attr(self, qualname: str, device: str, who: str) -> None:
        owner, attr, value = _tensor_attr(self.root, qualname)
        if isinstance(value, torch.nn.Module):
            self.move_module(qualname, device, who)
            return
        if not isinstance(value, torch.Tensor):
            return
        self.claim(value, device, who)
        if self.move:
            # Parameters, buffers and plain tensor attributes (fx's _tensor_constant*) alike.
            self._move_tensor(value, self.real(device))

    @staticmethod
    def _move_tensor(t: torch.Tensor, device: str) -> None:
        if t.is_meta:
            # A tensor without data stays without it: a template module on meta whose parameters
            # torch.func.functional_call replaces (PyTorch's model-ensembling recipe) raised
            # "Cannot copy out of meta tensor" in the check, after the whole search.
            return
        if _canonical(t.device) != device:
            # Assigning .data keeps the tensor object (so tied weights stay tied and an
            # optimizer built afterwards sees the moved Parameter).
            t.data = t.data.to(device)
            if t.grad is not None:
                t.grad.data = t.grad.data.to(device)

    def _move_own(self, mod: torch.nn.Module, device: str) -> None:
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                self._move_tensor(t, device)
