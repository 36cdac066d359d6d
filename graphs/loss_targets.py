"""Loss targets in the example inputs of a model whose ``forward`` does not take them.

Most models are called ``model(x)`` and their loss ``loss(output, y)``: the labels never go
through ``forward``. placer's contract passes one tuple of inputs everywhere (captured,
split into DDP shares and micro-batches, handed to the last pipeline stage's loss as
``loss_fn(output, *inputs)``), so the zoo's models take their targets as parameters that
``forward`` ignores (docs/contracts.md). A user's model should not have to be edited for
that: when the example inputs hold more values than ``forward`` takes by position and the
model comes with its own loss, the extra trailing values are that loss's targets, and the
model is seen through :func:`accepting_targets`, whose ``forward`` takes them and ignores them.

The view is the same object in all but its class: a subclass of the model's class, named as
it is, whose instance shares the model's ``__dict__`` (its modules, parameters, buffers,
hooks, training flag and plain attributes), so that module paths, parameter names, hooks and
``.train()`` are the model's own and the captured graph is the model's graph with one unused
placeholder per target (``default None``, so that the placed model also runs as
``placed(x)``). Only ``forward`` differs: it calls the model's ``forward`` on the leading
inputs.
"""

from __future__ import annotations

import inspect
import keyword
from typing import Any

from torch import nn

from graphs.errors import ModelFileError


def _signed(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` signature is ``model``'s: the module ``torch.compile`` wrapped
    (an ``OptimizedModule`` takes ``*args, **kwargs`` and passes them on), else ``model``."""
    inner = model._modules.get("_orig_mod")
    return _signed(inner) if inner is not None and type(model).__name__ == "OptimizedModule" else model


def _positional_params(model: nn.Module) -> list[inspect.Parameter] | None:
    """``model.forward``'s parameters taken by position, or None when it takes any number
    (``*args``) or its signature cannot be read."""
    try:
        params = inspect.signature(_signed(model).forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def forward_takes(model: nn.Module) -> int | None:
    """How many inputs ``model.forward`` takes by position, or None when it takes any number
    (``*args``) or its signature cannot be read.

    >>> forward_takes(nn.Linear(2, 2)), forward_takes(nn.Bilinear(2, 2, 2))
    (1, 2)
    """
    params = _positional_params(model)
    return None if params is None else len(params)


def target_count(model: nn.Module) -> int:
    """How many of the example inputs are loss targets ``model`` takes only to ignore them (the
    view of :func:`accepting_targets`; 0 for any other model).

    >>> target_count(accepting_targets(nn.Linear(2, 3), 3)), target_count(nn.Linear(2, 3))
    (2, 0)
    """
    return len(getattr(type(model), "loss_targets", ()))


def target_names(forward_names: list[str], count: int) -> list[str]:
    """Names of ``count`` target placeholders that do not clash with ``forward_names``:
    ``target`` for one, ``target_0``, ``target_1``... for several (decided by the model and the
    number of inputs alone, so that a placement made with the targets applies to the same model
    and inputs through the API).

    >>> target_names(["x"], 1), target_names(["x", "target"], 2)
    (['target'], ['target_0', 'target_1'])
    """
    base = ["target"] if count == 1 else [f"target_{i}" for i in range(count)]
    names = []
    for name in base:
        while name in forward_names or name in names:
            name = f"_{name}"
        names.append(name)
    return names


def accepting_targets(model: nn.Module, n_inputs: int) -> nn.Module:
    """``model`` as a module whose ``forward`` takes ``n_inputs`` inputs, the trailing ones
    beyond what ``model.forward`` takes being loss targets it ignores (module doc).

    ``model`` itself when its ``forward`` takes them already. Raises ModelFileError where the
    model cannot be seen that way (a ``forward`` set on the instance, a class that cannot be
    subclassed or has no ``__dict__``).

    >>> seen = accepting_targets(nn.Linear(2, 3), 2)
    >>> import torch; seen(torch.zeros(4, 2), torch.zeros(4)).shape, type(seen).__name__
    (torch.Size([4, 3]), 'Linear')
    """
    params = _positional_params(model)
    if params is None or n_inputs <= len(params):
        return model
    takes = len(params)
    if _signed(model) is not model:
        # torch.compile's wrapper sets its compiled forward on the instance: the view goes
        # inside it, and a wrapper of the same compile settings around the view
        wrapped = model._modules["_orig_mod"]
        assert wrapped is not None  # _signed found it
        return type(model)(accepting_targets(wrapped, n_inputs), model.dynamo_ctx)
    cls = type(model)
    if "forward" in vars(model):
        raise ModelFileError(f"{cls.__name__} has forward() set on the instance, so placer cannot pass it the first "
                             f"{takes} of the {n_inputs} inputs and keep the rest for the loss; expected a forward "
                             "that takes every input (its targets as parameters it ignores)")
    names = [p.name for p in params]
    if any(not n.isidentifier() or keyword.iskeyword(n) for n in names):
        raise ModelFileError(f"forward() of {cls.__name__} has parameters placer cannot name ({', '.join(names)})")
    targets = target_names(names, n_inputs - takes)
    call = ", ".join(names)
    source = (f"def forward(self, {', '.join([*_with_defaults(params), *(t + '=None' for t in targets)])}):\n"
              f"    return __placer_model_forward(self, {call})\n")
    namespace: dict[str, Any] = {"__placer_model_forward": cls.forward}
    exec(compile(source, f"<forward of {cls.__qualname__} with loss targets>", "exec"), namespace)
    forward = namespace["forward"]
    forward.__doc__ = f"{cls.__qualname__}.forward on the first {takes} inputs; the rest are loss targets."
    try:
        view_cls = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__, "loss_targets": tuple(targets)})
        view: nn.Module = object.__new__(view_cls)
        view.__dict__ = model.__dict__
    except (TypeError, AttributeError) as exc:
        raise ModelFileError(f"placer cannot give {cls.__name__} its loss targets ({exc}); expected a forward that "
                             "takes every input (its targets as parameters it ignores)") from None
    return view


def _with_defaults(params: list[inspect.Parameter]) -> list[str]:
    """``forward``'s parameters as the view's signature writes them: with their defaults where
    those are plain constants from that parameter on (``mask=None``: the placed model then runs
    as ``placed(x)`` as the model did), bare before."""
    texts = [p.name for p in params]
    for i in range(len(params) - 1, -1, -1):
        default = params[i].default
        if default is params[i].empty or not (default is None or isinstance(default, (bool, int, float, str))):
            break
        texts[i] = f"{params[i].name}={default!r}"
    return texts


def refuse_targets_without_loss(model: nn.Module, n_inputs: int, inputs_src: str) -> None:
    """Raise ModelFileError when the inputs hold more values than ``forward`` takes and no loss
    was given that could use the rest: the default loss reads the output alone, so such inputs
    are a mistake, and the message says how to make them targets."""
    takes = forward_takes(model)
    if takes is None or n_inputs <= takes:
        return
    raise ModelFileError(
        f"{inputs_src} gives {n_inputs} inputs, but forward() of {type(model).__name__} takes {takes}; expected "
        f"{takes} input(s), or, if the other {n_inputs - takes} are the loss's targets, a loss that uses them: "
        "get_loss(output, *inputs) in a model file (loss_fn in the API) receives every input, and forward() "
        f"only the first {takes}")
