"""Tensors torch.fx baked into a graph as constants although they carry gradients.

fx records an op only when a Proxy takes part in it. A parameter reached as a module attribute
(``self.weight``) is a Proxy, but one reached any other way is the tensor itself: a penalty over
``self.parameters()`` computed in ``forward`` (``sum(p.pow(2).sum() for p in self.parameters())``)
runs once, eagerly, at trace time, and fx stores its result as a ``_tensor_constant`` of the
graph. That constant keeps the trace's autograd history: the first backward reaches the
parameters through it, the second fails ("Trying to backward through the graph a second time"),
and its value never follows the parameters' updates (walkthrough: a nanoGPT with an L2 term,
its placement 7.9e-5 off in gradients from the second step on, the same applied to one device).

:func:`refuse_baked_gradients` refuses such a graph with :class:`GradientsBaked`; the capture
then takes torch.export's graph, which lifts every parameter to an input and records the penalty.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphs.errors import CaptureError
from graphs.placement_graph import fetch_attr

__all__ = ["GradientsBaked", "refuse_baked_gradients"]


class GradientsBaked(CaptureError):
    """fx stored a tensor that requires gradients as a constant of the graph."""


def refuse_baked_gradients(gm: fx.GraphModule) -> None:
    """Raise :class:`GradientsBaked` when a ``get_attr`` of ``gm`` reads a tensor with an autograd
    history: one computed at trace time from tensors that require gradients (module doc).

    >>> class Penalised(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return self.lin(x).sum() + sum(p.pow(2).sum() for p in self.parameters())
    >>> refuse_baked_gradients(fx.symbolic_trace(Penalised()))
    Traceback (most recent call last):
    ...
    graphs.baked_constants.GradientsBaked: forward() computes with parameters torch.fx does not see ...
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attr(gm, str(node.target))
        # GraphModule registers such a constant as a buffer: its autograd history tells it apart
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            raise GradientsBaked(
                f"forward() computes with parameters torch.fx does not see (reached other than as module attributes, "
                f"as in a loop over self.parameters()): their result became the constant {node.target!r} of the "
                "graph, with the trace's gradients and values")

