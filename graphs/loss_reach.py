"""Whether the model's loss differentiates through the model, not only through its output.

A loss that takes ``torch.autograd.grad`` of the output by an input (a WGAN-GP critic's
gradient penalty, ``torch.autograd.grad(out.sum(), x, create_graph=True)`` in ``get_loss``) or
by an activation needs the autograd graph *behind* the output. Wherever a process boundary
cuts that graph (a placement over worker processes, a pipeline stage: a received value is a
fresh autograd leaf) the loss cannot run; autograd then says "The differentiated Tensor at
index 0 appears to not have been used in the graph". In one process, copies between devices
keep the graph (``Tensor.to`` is differentiable), so the loss runs.

:func:`loss_differentiates_through_model` asks the question once, at capture, by running the
loss twice on one forward: on the output as it is, and on the output cut off its graph
(:func:`cut_off_graph`, as a receiving stage holds it). A loss that runs on the
first and fails on the second with autograd's words for an unreached tensor differentiates
through the model. The capture then marks, on the placement graph's output node, every op the
output depends on as one differentiated run (:func:`graphs.placement_graph.differentiated_runs`):
the grouping keeps them in one group and the stage cut in one stage, as it does for a
``torch.autograd.grad`` inside forward. Placements over worker processes then keep the model
in one of them, and no pipeline splits it, instead of measuring runs that cannot work.

The forward runs on fake tensors when it can and otherwise on real ones, leaving no trace
(:mod:`graphs.probe_run`); nothing is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from graphs.probe_run import probe_module

log = logging.getLogger(__name__)

#: What autograd says when a gradient is asked of a tensor the differentiated graph does not reach.
UNREACHED_WORDS = ("appears to not have been used in the graph", "does not require grad and does not have a grad_fn")


def is_unreached(exc: BaseException) -> bool:
    """Whether ``exc`` is autograd refusing a gradient of a tensor the graph does not reach.

    >>> x = torch.ones(2, requires_grad=True)
    >>> try:
    ...     torch.autograd.grad((x * 2).sum(), torch.ones(2, requires_grad=True))
    ... except RuntimeError as exc:
    ...     is_unreached(exc)
    True
    """
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in UNREACHED_WORDS)


def cut_off_graph(value: Any) -> Any:
    """``value`` as a process that receives it holds it: every tensor detached, a fresh autograd
    leaf where it required grad (the rank runtime hands values between stages so).

    >>> x = torch.ones(2, requires_grad=True)
    >>> y = cut_off_graph({"h": x * 2})["h"]
    >>> y.requires_grad, y.grad_fn is None
    (True, True)
    """

    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            y = x.detach()
            return y.requires_grad_(True) if x.requires_grad else y
        return x

    return tree_map(leaf, value)


def loss_differentiates_through_model(gm: fx.GraphModule, inputs: tuple,
                                      loss_fn: Callable[..., torch.Tensor]) -> bool:
    """Whether ``loss_fn(gm(*inputs), *inputs)`` differentiates through the model (module doc).

    False when the loss fails on the whole output too, on real tensors (that failure is the
    training step's to report).

    >>> from torch import nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
    >>> x = torch.randn(5, 3, requires_grad=True)
    >>> def penalty(out, x):
    ...     (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    ...     return out.mean() + (g.norm(dim=1) - 1).pow(2).mean()
    >>> loss_differentiates_through_model(gm, (x,), penalty)
    True
    >>> loss_differentiates_through_model(gm, (x,), lambda out, x: out.pow(2).mean())
    False
    """
    try:
        return _asked(gm, inputs, loss_fn, fake=True)
    except Exception as exc:  # noqa: BLE001 - an op without a fake kernel: ask on real tensors
        log.info("loss reach: fake tensors failed (%s); asking on real tensors", type(exc).__name__)
    try:
        return _asked(gm, inputs, loss_fn, fake=False)
    except Exception as exc:  # noqa: BLE001 - the forward or the loss fails: the step reports it
        log.info("loss reach: could not run the forward and the loss (%s: %s)", type(exc).__name__, exc)
        return False


def _asked(gm: fx.GraphModule, inputs: tuple, loss_fn: Callable[..., torch.Tensor], fake: bool) -> bool:
    with probe_module(gm, inputs, fake=fake) as (module, run_inputs), torch.enable_grad():
        out = module(*run_inputs)
        loss_fn(out, *run_inputs)  # raises where the loss fails on the whole output too
        try:
            loss_fn(cut_off_graph(out), *run_inputs)
        except RuntimeError as exc:
            return is_unreached(exc)
        return False
