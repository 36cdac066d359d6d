"""A tensor forward() reads from the model's attributes that forward() itself writes.

A forward hook that keeps an activation for a loss (``self.features["mid"] = output``, deep
supervision, feature distillation) writes the model's state during the call; forward() then
reads it back (``self.aux(self.features["mid"])``). torch.fx runs no hook of a module it keeps
as a call, so the trace reads whatever an earlier call left there and the graph holds that
tensor as a constant (``_tensor_constant0``): the placed model's auxiliary head would read one
stale activation at every step, and no gradient would reach the layers below it through it.
torch.export runs the hooks while it traces and records the read as the activation it is.

:func:`refusing_stale_state` watches the tensors held in the model's attributes (inside dicts,
lists and tuples too) over the graph's first run (its shape propagation, which runs the hooks of
the modules the graph calls): when that run wrote a place whose tensor the graph holds as a
constant, :class:`StaleState` sends the capture to torch.export (:mod:`graphs.capture`). A
constant forward() never writes (a mask kept as a plain attribute) stays a constant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.errors import CaptureError

__all__ = ["StaleState", "held_tensors", "held_tensors_kept", "refusing_stale_state"]

#: How deep an attribute's containers are searched.
_DEPTH = 4


class StaleState(CaptureError):
    """An fx graph holds, as a constant, a tensor that forward() writes into the model's attributes."""


def held_tensors(model: nn.Module, private: bool = False) -> list[tuple[str, Any, Any, torch.Tensor]]:
    """``(path, container, key, tensor)`` for every tensor in a module attribute of ``model`` or a
    submodule that is not a parameter or submodule, inside dicts, lists and tuples to
    :data:`_DEPTH` (``container[key]`` is its place). ``private``: attributes whose names start
    with ``_`` too (a GraphModule's ``_tensor_constant0``, torch's own tables such as ``_buffers``),
    as a deep copy meets them."""
    found: list[tuple[str, Any, Any, torch.Tensor]] = []

    def walk(path: str, container: Any, key: Any, value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            found.append((path, container, key, value))
        elif depth < _DEPTH and isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}[{k!r}]", value, k, v, depth + 1)
        elif depth < _DEPTH and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", value, i, v, depth + 1)

    for module_path, module in model.named_modules():
        for name, value in vars(module).items():
            if (name.startswith("_") and not private) or isinstance(value, (nn.Module, nn.Parameter)):
                continue
            walk(f"{module_path}.{name}" if module_path else name, vars(module), name, value, 0)
    return found


@contextlib.contextmanager
def held_tensors_kept(model: nn.Module) -> Iterator[None]:
    """Put back on exit every tensor held in ``model``'s attributes that the block replaced, and
    take out the tracers' tensors the block put in a new place: a tracer's run of forward()
    computes with fake tensors, and a hook that keeps its output (``self.features["mid"] =
    output``) left one on the user's model, on which the numerical check then failed with a
    traceback. A model never called before has no ``"mid"`` yet: the key goes, as it was."""
    before = held_tensors(model)
    try:
        yield
    finally:
        _put_back(before)
        _take_out_traced(model, before)


@contextlib.contextmanager
def refusing_stale_state(gm: fx.GraphModule, model: nn.Module) -> Iterator[None]:
    """Around the first run of ``gm`` (its shape propagation): raise :class:`StaleState` on exit
    when that run wrote a place of ``model``'s attributes whose tensor ``gm`` holds as a constant
    (module doc).

    Every place the run wrote is put back as it was: the run computes with fake tensors, which
    must not stay on the user's model (a hook keeping one left it there, and the numerical check
    then ended placer with a traceback on it).
    """
    # By name: fx may register a constant that requires grad as a parameter of the graph.
    state = {name for name, _ in (*model.named_parameters(), *model.named_buffers())}
    constants: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) not in state:
            value = getattr(gm, str(node.target), None)
            if isinstance(value, torch.Tensor):
                constants[id(value)] = node
    before = held_tensors(model)
    try:
        yield
    finally:
        stale = [(path, constants[id(tensor)]) for path, container, key, tensor in before
                 if id(tensor) in constants and _place_value(container, key) is not tensor]
        _put_back(before)
    if stale:
        path, node = stale[0]
        users = ", ".join(sorted(u.name for u in node.users)) or "nothing"
        raise StaleState(
            f"forward() reads {path}, which forward() itself writes (a hook): torch.fx runs no hook of a module it "
            f"keeps as a call, so its graph would keep one stale value of it as a constant (read by {users})")


def _put_back(held: list[tuple[str, Any, Any, torch.Tensor]]) -> None:
    """Write each held tensor back into its place where something else is there now."""
    for _, container, key, tensor in held:
        if _place_value(container, key) is not tensor:
            with contextlib.suppress(TypeError):  # a tuple is not written in place
                container[key] = tensor


def _take_out_traced(model: nn.Module, before: list[tuple[str, Any, Any, torch.Tensor]]) -> None:
    """Delete each dict entry or attribute of ``model`` that holds a tracer's fake tensor and held
    no tensor ``before`` (a list's item stays: deleting it would move the others)."""
    from torch._subclasses.fake_tensor import FakeTensor

    places = {(id(container), key) for _, container, key, _ in before}
    for _, container, key, tensor in held_tensors(model):
        if isinstance(tensor, FakeTensor) and isinstance(container, dict) and (id(container), key) not in places:
            del container[key]


def _place_value(container: Any, key: Any) -> Any:
    """What ``container[key]`` holds now (None when the place is gone)."""
    try:
        return container[key]
    except (KeyError, IndexError, TypeError):
        return None
