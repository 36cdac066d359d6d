"""What a higher-order op's region costs: the ops torch.export wraps in one node.

torch.export records a ``torch.autocast`` region (and a grad-mode change inside forward) as one
higher-order op, ``torch.ops.higher_order.wrap_with_autocast(..., submod, *args)``, whose ops live
in a subgraph (``submod``, a GraphModule attribute of the captured one). The placement graph has
one node for it, and its FLOPs were estimated as for an elementwise op over its inputs and
outputs: a 4-layer MLP of width 1,024 under bfloat16 autocast, 4.3 GFLOPs a forward, was costed
1 MFLOP, so a simulated V100 ran the whole region in microseconds and every GPU placement of a
mixed-precision model was priced as nearly free (measured 2026-12-07 on `placer optimize`, 4xV100-nvlink:
0.168 ms a step).

:func:`region_costs` sums what the region's own ops cost, by the same rules as every other node
(:func:`graphs.flops.node_flops`, :func:`graphs.flops.node_bytes_moved`, nested regions
included), and counts them: the node launches that many kernels (``num_ops``, which the cost
model charges one launch each, :func:`envs.sim.cost_model._op_count`). The region stays one node
of the placement: its ops run inside the higher-order op, on one device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphs.flops import node_bytes_moved, node_flops


@dataclass(frozen=True)
class RegionCosts:
    """A region's forward FLOPs and bytes moved, and how many of its ops do work."""

    flops: int
    bytes_moved: int
    ops: int


def region_graph(node: fx.Node, gm: torch.nn.Module) -> fx.GraphModule | None:
    """The subgraph ``node`` runs, where it is a higher-order op given one (a ``get_attr`` of a
    GraphModule among its arguments); None for every other node."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = getattr(gm, str(arg.target), None)
            if isinstance(value, fx.GraphModule):
                return value
    return None


def region_costs(node: fx.Node, gm: torch.nn.Module,
                 outputs_of: Callable[[fx.Node], Sequence[Any]]) -> RegionCosts | None:
    """The costs of the ops in ``node``'s region (module doc), or None where ``node`` has none.
    ``outputs_of(n)``: the tensors node ``n`` produces, each with ``shape`` and ``nbytes`` (the
    placement graph's ``tensor_outputs``, from export's ``val`` metadata)."""
    sub = region_graph(node, gm)
    if sub is None:
        return None
    infos: dict[fx.Node, Sequence[Any]] = {}
    out_bytes: dict[fx.Node, int] = {}

    def shape_of(arg: Any) -> tuple[int, ...] | None:
        found = infos.get(arg) if isinstance(arg, fx.Node) else None
        return tuple(found[0].shape) if found else None

    flops = moved = ops = 0
    for inner in sub.graph.nodes:
        outputs = [] if inner.op == "output" else outputs_of(inner)
        infos[inner] = outputs
        out_bytes[inner] = sum(int(t.nbytes) for t in outputs)
        nested = region_costs(inner, sub, outputs_of)
        if nested is not None:
            flops, moved, ops = flops + nested.flops, moved + nested.bytes_moved, ops + nested.ops
            continue
        first = outputs[0] if outputs else None
        f = int(node_flops(inner, None, shape_of, first.shape if first else None))
        m = int(node_bytes_moved(inner, [out_bytes.get(i, 0) for i in inner.all_input_nodes], out_bytes[inner], 0))
        flops, moved, ops = flops + f, moved + m, ops + (1 if f or m else 0)
    return RegionCosts(flops, moved, ops)
