"""Models with lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ``nn.LazyBatchNorm1d``...).

A lazy module's parameters have no shape until its first forward; reading them before (their
count, a copy, a trace) raises "Attempted to use an uninitialized parameter". PyTorch's advice is
to run the model once on a batch first (``torch.nn.modules.lazy.LazyModuleMixin``'s docstring);
placer does that on the example inputs before anything else reads the model.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.parameter import is_lazy


def has_lazy_state(model: nn.Module) -> bool:
    """True when a parameter or buffer of ``model`` is still uninitialized.

    >>> has_lazy_state(nn.LazyLinear(4)), has_lazy_state(nn.Linear(3, 4))
    (True, False)
    """
    return any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers()))


def materialize(model: nn.Module, example_inputs: tuple) -> None:
    """Give every lazy parameter and buffer of ``model`` its shape and initial values by one
    forward on ``example_inputs``; nothing to do (no forward) for a model without them.

    The forward runs in eval mode without gradients, so it moves no running statistics
    (a LazyBatchNorm's start at their initial values, as in the user's first training step)
    and draws no dropout masks; each module's training flag is restored afterwards.

    >>> m = nn.Sequential(nn.LazyLinear(4))
    >>> materialize(m, (torch.zeros(2, 3),))
    >>> tuple(m[0].weight.shape), m.training
    ((4, 3), True)
    """
    if not has_lazy_state(model):
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for module, training in modes:
            module.training = training
