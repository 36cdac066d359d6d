"""The signature of a node's call, under which isolated profiling shares one timing among identical calls.

A signature is the op (module type, ``extra_repr``, mode and parameter shapes, or the function /
method), the shapes, dtypes, strides and autograd flags of its tensor inputs, and every
non-tensor argument: nodes with equal signatures do the same work (the same LSTM cell at every
unrolled time step), so :mod:`graphs.profile.isolated` times each distinct one once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn


def _value_signature(value: Any) -> Any:
    """A hashable description of an argument: tensors by layout, everything else by value."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), str(value.dtype), tuple(value.stride()), bool(value.requires_grad))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _value_signature(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(...))):
        return (type(value).__name__, repr(value))
    return (type(value).__qualname__, repr(value))


def _module_signature(module: nn.Module) -> tuple:
    # Type, constructor settings (stride, padding, ...), mode and every tensor's layout:
    # two modules with equal signatures do the same work on the same inputs.
    tensors = tuple((name, tuple(t.shape), str(t.dtype), bool(t.requires_grad))
                    for name, t in list(module.named_parameters()) + list(module.named_buffers()))
    return (type(module).__module__, type(module).__qualname__, module.extra_repr(), module.training, tensors)


def node_signature(node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict) -> tuple:
    """The signature under which ``node``'s timing is shared with identical calls."""
    if node.op == "call_module":
        assert module is not None
        op: Any = ("module", _module_signature(module))
    elif node.op == "call_method":
        op = ("method", str(node.target))
    else:
        op = ("function", node.target)
    return (op, _value_signature(args), _value_signature(kwargs))
