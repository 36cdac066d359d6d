"""A model's inputs bound to its ``forward``'s parameters: keyword inputs (``model(**batch)``, a
Hugging Face batch) as the positional tuple placer captures, runs and splits.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graphs.errors import ModelFileError

log = logging.getLogger(__name__)


#: A forward parameter as placer binds inputs to it: (name, has a default, the default).
ForwardParam = tuple[str, bool, Any]


def forward_params(model: nn.Module, plain_defaults: bool = False) -> tuple[ForwardParam, ...]:
    """``model.forward``'s positional parameters as ``(name, has a default, the default)``. With
    ``plain_defaults`` a default is kept only where it is a plain constant (None, a bool, a number,
    a string: what a GraphModule can carry pickled); another counts as none.

    >>> forward_params(nn.GRU(2, 2))
    (('input', False, None), ('hx', True, None))
    """
    out = []
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        keep = p.default is not p.empty and (
            not plain_defaults or p.default is None or isinstance(p.default, (bool, int, float, str)))
        out.append((p.name, keep, p.default if keep else None))
    return tuple(out)


class UnboundInput(ValueError):
    """An input :func:`bind_inputs` cannot place: keys forward() does not take by position
    (``unknown``), or a parameter without a default left out (``missing``)."""

    def __init__(self, unknown: Sequence[str] = (), missing: str = "") -> None:
        super().__init__(", ".join(unknown) or missing)
        self.unknown, self.missing = list(unknown), missing


def bind_inputs(params: Sequence[ForwardParam], args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """``args`` and ``kwargs`` as the positional inputs of a forward with ``params``
    (:func:`forward_params`), up to the last one given, the parameters between at their defaults.

    >>> bind_inputs((("x", False, None), ("past", True, None), ("mask", True, None)), (0,), {"mask": 1})
    (0, None, 1)

    Raises:
        UnboundInput: a key no parameter after ``args`` has, or a parameter without a default left out.
    """
    names = [name for name, _, _ in params]
    unknown = [k for k in kwargs if k not in names[len(args):]]
    if unknown:
        raise UnboundInput(unknown=unknown)
    last = max([len(args) - 1, *(names.index(k) for k in kwargs)])
    values = list(args)
    for name, has_default, default in params[len(args):last + 1]:
        if name in kwargs:
            values.append(kwargs[name])
        elif has_default:
            values.append(default)
        else:
            raise UnboundInput(missing=name)
    return tuple(values)


def keyword_inputs_as_positional(model: nn.Module, inputs: Mapping[str, Any], what: str = "the inputs",
                                 targets: bool = False) -> tuple:
    """Keyword inputs (``model(**batch)``, a Hugging Face batch) as the positional tuple of
    ``model.forward``'s parameters up to the last one given, the others at their defaults: what
    placer captures, runs and splits. ``what`` names the inputs in an error.

    With ``targets`` (a loss was given), keys ``forward`` does not take are the loss's targets
    (``labels`` in a batch for a model whose ``forward`` takes ``input_ids``): they follow every
    positional parameter of ``forward`` (each at its value or default), in the dict's order
    (:mod:`graphs.loss_targets`). A ``forward(..., **kwargs)`` does not receive them: a captured
    graph takes its parameters by position, and Hugging Face's ``Trainer`` likewise drops the
    batch keys ``forward`` does not name (``remove_unused_columns``); a warning names them.

    >>> class Net(nn.Module):
    ...     def forward(self, input_ids, past=None, attention_mask=None):
    ...         return input_ids
    >>> keyword_inputs_as_positional(Net(), {"attention_mask": 1, "input_ids": 0})
    (0, None, 1)
    >>> keyword_inputs_as_positional(Net(), {"input_ids": 0, "labels": 7}, targets=True)
    (0, None, None, 7)
    """
    params = forward_params(model)
    if not inputs:
        raise ModelFileError(f"{what} is an empty dict; expected the model's inputs by parameter name")
    names = [name for name, _, _ in params]
    extra = [k for k in inputs if k not in names]
    takes_keywords = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    try:
        if targets and extra:
            if takes_keywords:
                log.warning("%s: %s not parameters of forward() of %s; they go to the loss as its targets, not into "
                            "forward's **kwargs (a captured graph takes the parameters forward() names)", what,
                            ", ".join(repr(k) for k in extra) + (" is" if len(extra) == 1 else " are"),
                            type(model).__name__)
            # every parameter bound, at its value or default: the targets come after them all
            known = {k: v for k, v in inputs.items() if k in names}
            values = bind_inputs(params, (), known) if known else ()
            values += tuple(_default_of(param) for param in params[len(values):])
            return (*values, *(inputs[k] for k in extra))
        return bind_inputs(params, (), inputs)
    except UnboundInput as exc:
        if exc.unknown:
            hint = "" if targets else (", or, if they are the loss's targets, a loss that uses them (get_loss(output, "
                                       "*inputs) in a model file, loss_fn in the API) receives them after forward's")
            raise ModelFileError(
                f"{what} name {', '.join(repr(k) for k in exc.unknown)}, which forward() of {type(model).__name__} "
                f"does not take by position (its parameters: {', '.join(name for name, _, _ in params)}); "
                f"expected keys that are parameters of forward(){hint}") from None
        raise ModelFileError(f"{what} leave out {exc.missing!r}, a parameter of forward() without a default; "
                             "expected every such parameter") from None


def _default_of(param: ForwardParam) -> Any:
    """The default of a forward parameter left out, or :class:`UnboundInput` where it has none."""
    name, has_default, default = param
    if not has_default:
        raise UnboundInput(missing=name)
    return default


def positional_inputs(model: nn.Module, inputs: Any, what: str = "the inputs", targets: bool = False) -> tuple:
    """The model's positional inputs: a tuple as is, a dict by ``forward``'s parameter names bound
    to them (:func:`keyword_inputs_as_positional`, with its ``targets``), anything else (one
    tensor) as a 1-tuple.

    >>> positional_inputs(nn.GRU(2, 2), {"input": 0}), positional_inputs(nn.GRU(2, 2), 0)
    ((0,), (0,))
    """
    if isinstance(inputs, Mapping):
        return keyword_inputs_as_positional(model, inputs, what, targets)
    return inputs if isinstance(inputs, tuple) else (inputs,)


def describe_inputs(inputs: tuple) -> str:
    """Short text for a tuple of inputs: tensor shapes and dtypes, other values by type."""
    parts = []
    for item in inputs:
        if isinstance(item, torch.Tensor):
            parts.append(f"tensor{list(item.shape)} {str(item.dtype).replace('torch.', '')}")
        else:
            parts.append(type(item).__name__)
    return "(" + ", ".join(parts) + ")"
