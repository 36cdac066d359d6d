"""State forward() carries to its next call in a Python attribute, refused after a trace: the
graph holds no Python attribute.

:func:`refuse_carried_state` refuses an attribute forward() read and then set to a value of the
graph that differs from call to call (a recurrent state kept for the next batch): the placed
model would compute every call from what the traced call found. A cache of constants and sizes
is the same at every call and is captured.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from graphs.forward_checks import varies
from graphs.state_snapshot import TraceTimeUpdate


def refuse_carried_state(model: nn.Module, read: Iterable[str], tracer: str,
                          set_from_data: Mapping[str, bool] | None = None) -> None:
    """Raise :class:`TraceTimeUpdate` where forward() read a Python attribute of ``model`` (``read``:
    qualified names, read while it still held the value from before the call) and then set it to a
    value of the graph that differs from call to call (:func:`_carried_state`): a recurrent state
    kept for the next batch (``out, h = self.rnn(x, self.h); self.h = h.detach()``).

    The original carries it to its next call; the graph holds no Python attribute, so the placed
    model computed every call from what the traced call found (walkthrough: a GRU whose hidden
    state was kept on the module, outputs 0.024 off from the second batch on, no error). A value
    set before any read (``torch.nn.utils.prune``'s hook recomputing ``weight`` for the call) is
    the call's own, and a cache of constants and sizes is the same at every call: both captured.
    ``set_from_data`` (torch.export, which puts the attributes back itself): whether each tensor
    forward() set computes from the data, by qualified name (:func:`constant_attributes_read`).
    """
    values: dict[str, Any] = {}
    for qualname in read:
        path, _, name = qualname.rpartition(".")
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(path) if path else model
            if name in vars(module):
                values[qualname] = vars(module)[name]
    carried = ([q for q in read if set_from_data.get(q)] if set_from_data is not None  # torch.export: recorded then
               else _carried_state(values, model))
    if carried:
        raise TraceTimeUpdate(
            f"forward() keeps {carried[0]!r} as a Python attribute, set to a value computed from the inputs or the "
            f"model's state (a recurrent state carried to the next batch): {tracer} records no Python attribute, so "
            "the placed model would compute every call from the value the first one found. Expected state carried "
            "between calls in a registered buffer updated in place (self.register_buffer('h', torch.zeros(...)); "
            "self.h.copy_(h.detach())), or passed to forward() and returned by it", python_state=True)


def _carried_state(values: Mapping[str, Any], model: nn.Module) -> list[str]:
    """The attributes of ``values`` (by name) that hold a value of the graph computed from the
    inputs, the model's parameters or buffers, or a random draw (:func:`varies`): one that differs
    from call to call, unlike a cache made of constants and sizes (``self.mask = torch.triu(...)``)."""
    state = {n for n, _ in itertools.chain(model.named_parameters(remove_duplicate=False),
                                            model.named_buffers(remove_duplicate=False))}
    memo: dict[fx.Node, bool] = {}
    return [name for name, value in values.items() if any(
        varies(v.node, state, memo) for v in tree_flatten(value)[0] if isinstance(v, fx.Proxy))]
