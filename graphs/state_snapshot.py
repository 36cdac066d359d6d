"""The model's state around a trace, which a trace must leave as it found it: updates a tracer
did not record are refused after the trace.

:func:`checked_trace` compares the model's state around a trace (:class:`StateSnapshot`) and
refuses updates the tracer did not record (:class:`TraceTimeUpdate`), naming the line of
forward() that made them (its ``locate``, e.g. :func:`graphs.update_lines.line_updating`).
:func:`unrecorded_update` words that refusal, shared with
:class:`graphs.trace_guards.GuardedTrace`, which stops such an update under fx before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.errors import CaptureError
from graphs.forward_checks import same_value


class TraceTimeUpdate(CaptureError):
    """forward() updated the model's state while being traced: the update is not in the graph.

    ``python_state``: the state is a Python attribute, which no tracer records (torch.export
    would silently drop it too), so the model is refused without a fallback.
    """

    def __init__(self, message: str, python_state: bool = False) -> None:
        super().__init__(message)
        self.python_state = python_state


#: Python attribute types whose change during a trace means forward() keeps Python-side state.
_SCALARS = (bool, int, float, str)


@dataclass
class StateSnapshot:
    """What a trace must leave as it found it: tensor slots, their versions, buffer values,
    scalars, and every module's Python attributes (a tracer's Proxy or a tensor forward()
    caches, ``if self.mask is None: self.mask = ...``, stayed on the user's model: review)."""

    slots: dict[tuple[str, str, str], Any]  # (module path, "_parameters"/"_buffers", key) -> tensor
    versions: dict[tuple[str, str, str], int]
    buffers: dict[tuple[str, str, str], torch.Tensor]
    scalars: dict[tuple[str, str], Any]
    attributes: dict[str, dict[str, Any]]  # module path -> its vars(), as they were

    @classmethod
    def take(cls, model: nn.Module) -> StateSnapshot:
        slots, scalars = cls.take_light(model)
        versions = {k: t._version for k, t in slots.items() if isinstance(t, torch.Tensor)}
        # Buffers only: a copy of every parameter would double a large model's memory, and
        # an updated parameter is refused all the same.
        buffers = {k: t.detach().clone() for k, t in slots.items()
                   if k[1] == "_buffers" and isinstance(t, torch.Tensor)}
        attributes = {path: dict(vars(m)) for path, m in model.named_modules(remove_duplicate=False)}
        return cls(slots, versions, buffers, scalars, attributes)

    def restore_attributes(self, model: nn.Module) -> list[str]:
        """Put every module's Python attributes back as they were; returns those that had
        changed (values torch.export rebuilds equal, a LayerNorm's ``normalized_shape``, had not)."""
        changed = []
        for path, m in model.named_modules(remove_duplicate=False):
            before = self.attributes.get(path, {})
            for key, value in list(vars(m).items()):
                if key in before and before[key] is value:
                    continue
                if key not in before or not same_value(before[key], value):
                    changed.append(f"{path}.{key}" if path else key)
                if key in before:
                    vars(m)[key] = before[key]  # an instance's vars() is its writable __dict__
                else:
                    del vars(m)[key]
        return changed

    def changes(self, model: nn.Module) -> tuple[list[str], list[str], list[Any]]:
        """(tensors replaced or updated, Python attributes changed, the objects now in replaced slots)."""
        now = StateSnapshot.take_light(model)
        changed, replaced = [], []
        for k, t in self.slots.items():
            current = now[0].get(k, t)
            if current is not t:
                changed.append(_slot_name(k))
                replaced.append(current)
            elif isinstance(t, torch.Tensor) and t._version != self.versions[k]:
                changed.append(_slot_name(k))
        scalars = [f"{p}.{a}" if p else a for (p, a), v in self.scalars.items() if now[1].get((p, a), v) != v]
        return changed, scalars, replaced

    @staticmethod
    def take_light(model: nn.Module) -> tuple[dict[tuple[str, str, str], Any], dict[tuple[str, str], Any]]:
        slots: dict[tuple[str, str, str], Any] = {}
        scalars: dict[tuple[str, str], Any] = {}
        for path, mod in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for key, value in getattr(mod, kind).items():
                    slots[(path, kind, key)] = value
            for key, value in vars(mod).items():
                if isinstance(value, _SCALARS) and key != "training":
                    scalars[(path, key)] = value
        return slots, scalars

    def restore(self, model: nn.Module) -> None:
        self.restore_attributes(model)
        modules = dict(model.named_modules(remove_duplicate=False))
        with torch.no_grad():
            for (path, kind, key), value in self.slots.items():
                mod = modules.get(path)
                # no .get: a TorchScript module's slots are an OrderedDictWrapper, without one
                slots = getattr(mod, kind) if mod is not None else {}
                if mod is not None and (slots[key] if key in slots else None) is not value:
                    slots[key] = value
            for k, copy in self.buffers.items():
                t = self.slots[k]
                if t.shape == copy.shape and not torch.equal(t, copy):
                    t.copy_(copy)
        for (path, attr), value in self.scalars.items():
            mod = modules.get(path)
            if mod is not None and vars(mod).get(attr, value) != value:
                vars(mod)[attr] = value  # type: ignore[index]  # an instance's vars() is its writable __dict__


def _slot_name(key: tuple[str, str, str]) -> str:
    path, _, name = key
    return f"{path}.{name}" if path else name


def checked_trace(model: nn.Module, tracer: str, trace: Any, locate: Any,
                  attributes_set: list[str] | None = None) -> fx.GraphModule:
    """Run ``trace()``; refuse it if it changed the model's tensors or Python attributes.

    A tracer runs forward()'s Python once. An update it does not record — a tensor it did
    not proxy (reached through a list or ``_buffers``) updated in place, a buffer
    reassigned (``self.calls = self.calls + 1``: fx records the addition, not the
    assignment), a Python number (``self.steps += 1``) — happens then, on the user's
    model, and never again in the captured graph: the placed model would silently diverge
    from the original from its second step on. The model is restored and
    :class:`TraceTimeUpdate` names the state and, via ``locate(changed_tensors,
    replacements)`` (a rerun that finds the line), the model line. Other Python attributes
    forward() sets (a tensor it caches: ``if self.mask is None: self.mask = ...``) are put back
    and named in ``attributes_set``: the graph holds what they computed.
    """
    snapshot = StateSnapshot.take(model)
    try:
        gm = trace()
        changed, scalars, replaced = snapshot.changes(model)
    finally:
        restored = snapshot.restore_attributes(model)
        snapshot.restore(model)
    if attributes_set is not None:
        attributes_set += restored
    if not changed and not scalars:
        return gm
    line = None
    if changed:
        try:
            line = locate([snapshot.slots[k] for k in snapshot.slots if _slot_name(k) in changed], replaced)
        except Exception:  # the line is a courtesy; the refusal stands without it
            line = None
        finally:
            snapshot.restore(model)
    what = (f"tensor {changed[0]!r}" if changed else f"Python attribute {scalars[0]!r}")
    raise TraceTimeUpdate(unrecorded_update(what, line, tracer), python_state=not changed)


def unrecorded_update(what: str, line: str | None, tracer: str, stopped: bool = False) -> str:
    """The refusal of an update of model state that ``tracer`` does not record (one text for
    :func:`checked_trace`, after the trace, and :class:`GuardedTrace`, before the update)."""
    where = f" at {line}" if line else ""
    ran = "would have run" if stopped else "ran"
    return (f"forward() updates {what}{where} in a way {tracer} does not record: the update {ran} once while "
            "tracing and is not part of the captured graph, so the placed model would diverge from the "
            "original from its second step on. Expected state kept in registered buffers and updated in "
            "place with tensor methods (e.g. self.register_buffer('steps', torch.zeros(())) and "
            "self.steps.add_(1))")
