"""Which ops' output shapes depend on the values they compute, not only on the input shapes.

``torch.nonzero``, a boolean mask's index (``x[mask]``), ``torch.unique`` and
``torch.masked_select`` give as many rows as the data asks for: a token-choice mixture of
experts hands each expert the ``nonzero`` rows its router chose, and every op after it inherits
that size. The size changes from batch to batch and, since the router is trained, from step
to step on the same batch. A process that receives such a value receives into a buffer of a
shape fixed in advance: ``torch.distributed.pipelining``'s ``PipelineStage`` allocates its
receive buffers from one planned set of shapes, and placer's rank runtime posts its ``irecv``
into buffers of the captured shapes, where gloo aborts the process when the sender's tensor is
another size (measured: a top-2 MoE over ``cpu:0,cpu:1``, its worker killed by SIGABRT after the
first optimizer step moved the routing; its pipelines refused by the stage's shape check).

:func:`data_dependent_shapes` finds these ops by running the captured graph once on fake tensors
under a ``ShapeEnv`` (``torch.fx.experimental.symbolic_shapes``), the machinery torch.export
uses: an op whose output size depends on values gets an *unbacked* symbol (``u0``) for it, and
that symbol flows through every shape computed from it. The placement graph marks those nodes
``shape_varies`` and the grouping keeps each with its consumers, so no process boundary cuts a
value of varying size; in one process a copy between devices takes any size (``Tensor.to``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from graphs.probe_run import probe_module
from graphs.tensor_tree import tensors_in

log = logging.getLogger(__name__)


def data_dependent_shapes(gm: fx.GraphModule, inputs: tuple) -> list[str]:
    """Names of ``gm``'s nodes whose output shape depends on computed values (module doc), in graph
    order; empty where the fake run cannot go through the graph (then nothing is known, and
    nothing is marked; the runtimes' own shape checks still refuse such a cut).

    >>> class Route(torch.nn.Module):
    ...     def forward(self, x):
    ...         rows = (x.sum(1) > 0).nonzero().squeeze(1)
    ...         return torch.zeros_like(x).index_add(0, rows, x[rows] * 2)
    >>> data_dependent_shapes(fx.symbolic_trace(Route()), (torch.randn(6, 3),))
    ['nonzero', 'squeeze', 'getitem', 'mul']
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

    varying: list[str] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if any(free_unbacked_symbols(t.shape) for t in tensors_in(out)):
                varying.append(n.name)
            return out

    try:
        with probe_module(gm, inputs, fake=True, shape_env=ShapeEnv()) as (module, fake_inputs), torch.no_grad():
            Recorder(module).run(*fake_inputs)
    except Exception as exc:  # noqa: BLE001 - a graph fake tensors cannot run: nothing known
        log.info("data-dependent shapes: the fake run stopped (%s: %s); none marked", type(exc).__name__,
                 str(exc).splitlines()[0] if str(exc) else "")
        return []
    return varying
