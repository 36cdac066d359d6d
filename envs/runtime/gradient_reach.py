"""Which trainable parameters a step's loss sends a gradient to.

DDP's reducer waits, every backward, for a gradient of each parameter it holds; one that gets
none stalls it ("Expected to have finished reduction in the prior iteration"), unless DDP
searches the autograd graph for them (``find_unused_parameters=True``, a cost on every step,
so it is set only where needed). A parameter gets no gradient when no op the output depends on
reads it (a head a torch.export graph keeps though forward chose another) and also when every
op that reads it is off the loss's autograd path: a physics-informed network's loss is a
derivative of its output by its input, taken with ``torch.autograd.grad`` in forward, and the
output layer's bias drops out of it.

:func:`parameters_without_gradient` runs one forward and the loss, and walks the autograd graph
from the loss to the parameters' gradient accumulators (``AccumulateGrad`` nodes, each holding
its ``variable``), as DDP's search does (``Reducer::search_unused_parameters`` in
``torch/csrc/distributed/c10d/reducer.cpp``). Nothing is trained: no backward runs, buffers and
the random state are put back.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from graphs.buffers import preserved_buffers
from graphs.input_batch import first_tensor
from graphs.loss_reach import is_unreached

__all__ = ["parameters_without_gradient", "loss_of_a_cut_output"]


def parameters_without_gradient(model: nn.Module, args: Sequence[Any],
                                loss_fn: Callable[..., torch.Tensor] | None) -> list[str]:
    """Names of ``model``'s trainable parameters that the loss of ``model(*args)`` does not
    reach (``loss_fn(output, *args)``; without one, the output's first tensor is the loss).

    >>> net = nn.ModuleDict({"used": nn.Linear(2, 2), "spare": nn.Linear(2, 2)})
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = net
    ...     def forward(self, x):
    ...         return self.net["used"](x).sum()
    >>> parameters_without_gradient(Net(), (torch.ones(1, 2),), None)
    ['net.spare.weight', 'net.spare.bias']
    """
    # The random state of the devices the model is on, so a dropout mask drawn here is drawn
    # again by the first step, as without this forward.
    gpus = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=gpus), preserved_buffers(model), torch.enable_grad():
        output = model(*args)
        loss = loss_fn(output, *args) if loss_fn is not None else first_tensor(output)
        reached = _accumulated(loss.grad_fn if isinstance(loss, torch.Tensor) else None)
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def _accumulated(root: Any) -> set[int]:
    """ids of the tensors whose gradient accumulators the autograd graph below ``root`` holds."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def loss_of_a_cut_output(loss_fn: Callable[..., torch.Tensor], output: Any, inputs: Sequence[Any]) -> torch.Tensor:
    """``loss_fn(output, *inputs)`` where ``output`` came out of the model's last stage as a leaf
    of its own (a pipeline's last stage, the output rank of a placement over worker processes):
    the model's autograd graph is cut where values cross between stages. A loss that
    differentiates through the model (a WGAN-GP critic's gradient penalty,
    ``torch.autograd.grad(out.sum(), x, create_graph=True)`` in ``get_loss``) cannot run there,
    and autograd's own words ("The differentiated Tensor at index 0 appears to not have been used
    in the graph") said nothing of why: the error now says so.

    Raises:
        RuntimeError: the loss asked autograd for a gradient the cut output cannot reach.
    """
    try:
        return loss_fn(output, *inputs)
    except RuntimeError as exc:
        if not is_unreached(exc):
            raise
        raise RuntimeError(
            "the loss differentiates through the model (torch.autograd.grad of its output by an input or "
            "an activation, in get_loss): a stage boundary cuts the model's autograd graph, so the output "
            "reaches the loss without the graph behind it; expected DDP (each replica holds the whole model) "
            f"or a placement in one process (autograd: {str(exc).splitlines()[0]})") from exc
