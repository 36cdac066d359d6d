"""Which tensors a rank holds, and holding only those: per-rank parameters, buffers, constants.

A worker builds the model on the ``meta`` device (shapes and dtypes, no storage), captures
it, and then materialises only the tensors its stages read — the parameters and buffers
of the modules it calls and the tensors its ``get_attr`` nodes read — copied from the job's
shipped state (loaded with ``mmap``, so the other ranks' weights are never read into
memory). Everything else stays on ``meta``. The optimizer is built over the rank's own
parameters, so its state is the stage's too.

Tensors are addressed by their attribute path in the captured ``GraphModule``
(``"cells.0.weight"``, ``"_tensor_constant0"``). A tensor reachable under several paths
(tied weights) is one tensor: it is materialised once and every path points at the copy,
so the tie survives. The splitter puts every reader of a shared tensor on one rank (or
refuses the placement), so a tied weight is never held by two ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from envs.runtime.split import SplitPlan

__all__ = ["module_tensors", "owned_paths", "tensor_bytes", "resident_bytes", "to_meta", "hold"]


def module_tensors(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(path, tensor)`` reachable from ``root``: parameters, buffers and plain tensor
    attributes (fx's ``_tensor_constant*``), with every path of a shared tensor listed."""
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in mod._buffers.items():
            if b is not None:
                yield prefix + name, b
        for name, v in vars(mod).items():
            if isinstance(v, torch.Tensor):
                yield prefix + name, v


def owned_paths(plan: SplitPlan, rank: int) -> set[str]:
    """Attribute paths of the tensors ``rank``'s stages read (stage modules keep the model's paths)."""
    return {path for stage in plan.stages_of(rank) for path, _ in module_tensors(stage.module)}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors given (a shared tensor counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def resident_bytes(*roots: nn.Module) -> int:
    """Bytes of the non-meta parameters, buffers and tensor constants held under ``roots``."""
    return tensor_bytes(t for root in roots for _, t in module_tensors(root) if t.device.type != "meta")


def _set(root: nn.Module, path: str, value: torch.Tensor) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if name in owner._parameters:
        owner._parameters[name] = value  # type: ignore[assignment]
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        object.__setattr__(owner, name, value)


def _like(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` wrapped as ``t`` is: a Parameter (same ``requires_grad``) or a plain tensor."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def data_on(t: torch.Tensor, device: torch.device | str, copy: bool = False) -> torch.Tensor:
    """``t`` on ``device`` (a copy where ``copy``), or ``t`` itself where it is on ``meta``: a tensor
    the model keeps without data (a template module whose parameters torch.func's
    functional_call replaces, PyTorch's model-ensembling recipe) has none to move ("Cannot copy
    out of meta tensor").

    >>> data_on(torch.empty(2, device="meta"), "cpu").is_meta, data_on(torch.zeros(2), "cpu").device.type
    (True, 'cpu')
    """
    return t if t.is_meta else t.to(device, copy=copy)


def to_meta(root: nn.Module) -> None:
    """Replace every tensor under ``root`` by a storage-less ``meta`` tensor of the same
    shape and dtype (ties kept: one meta tensor per original tensor)."""
    replaced: dict[int, torch.Tensor] = {}
    for path, t in list(module_tensors(root)):
        if t.device.type == "meta":
            continue
        if id(t) not in replaced:
            replaced[id(t)] = _like(t, torch.empty_like(t, device="meta"))
        _set(root, path, replaced[id(t)])


def hold(root: nn.Module, paths: Iterable[str], source: Mapping[str, torch.Tensor],
         device: torch.device | str) -> int:
    """Make ``root`` hold real copies of exactly the tensors at ``paths`` (values from ``source``,
    keyed by path, on ``device``); every other tensor goes back to ``meta``.

    Returns:
        the bytes now held.

    Raises:
        KeyError: a path to hold that ``source`` does not have (the job and the worker's
            capture disagree; the fingerprint check catches a different model first).
    """
    to_meta(root)
    wanted = set(paths)
    entries = list(module_tensors(root))
    # By tensor, not by path: a tied weight wanted under one path is held under all of its paths.
    wanted_ids = {id(t) for path, t in entries if path in wanted}
    made: dict[int, torch.Tensor] = {}
    for path, t in entries:
        if id(t) not in wanted_ids:
            continue
        if id(t) not in made:
            if path not in source:
                raise KeyError(f"the job ships no value for {path!r}")
            made[id(t)] = _like(t, data_on(source[path].detach(), device, copy=True))
        _set(root, path, made[id(t)])
    return tensor_bytes(made.values())
