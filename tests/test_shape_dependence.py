"""Values whose size depends on the data never cross a process boundary, and the experts of a
token-choice mixture of experts stay free to go to different devices (graphs.shape_dependence,
graphs.grouping)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphs.capture import capture
from graphs.grouping import group_graph
from graphs.shape_dependence import data_dependent_shapes


class _TopTwoMoE(nn.Module):
    """Each expert gets the tokens its router chose (nonzero rows), added back by index_add."""

    def __init__(self, d: int = 8, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(F.softmax(self.router(x), dim=-1), 2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = idx == e
            rows = mask.any(-1).nonzero().squeeze(-1)
            gate = (w * mask).sum(-1)[rows].unsqueeze(-1)
            out = out.index_add(0, rows, gate * expert(x[rows]))
        return x + out


def _captured():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    return capture(_TopTwoMoE(), (x,), loss_fn=lambda out, x: out.pow(2).mean())


def test_what_is_sized_by_the_router_is_marked_and_nothing_else():
    captured = _captured()
    varies = {n for n, v in captured.graph.nodes(data="shape_varies") if v}
    assert {"nonzero", "squeeze", "experts_0_0", "experts_0_2", "mul_1"} <= varies
    # the router, the combined output and what only reads fixed shapes do not vary
    assert not varies & {"router", "softmax", "topk", "zeros_like", "index_add", "index_add_2", "add"}


def test_a_varying_value_stays_with_its_consumers_and_the_experts_stay_apart():
    """Before, each expert's `x[rows]` was taken for a view of the layer input and joined it, so
    one layer was one group; and the varying values could cross worker processes, where gloo
    aborted the receiving rank once training moved the routing."""
    captured = _captured()
    grouping = group_graph(captured.graph)
    group = grouping.op_to_group
    graph = captured.graph
    for name, varies in graph.nodes(data="shape_varies"):
        if varies:
            assert all(group[c] == group[name] for c in graph.successors(name)), name
    experts = {group[f"experts_{e}_0"] for e in range(3)}
    assert len(experts) == 3
    assert group["experts_0_0"] != group["router"]


def test_a_slice_bounded_by_a_size_is_still_a_view():
    """`x[:, : y.shape[1]]` reads a size node, not a tensor: it stays with x (the view rule)."""

    class Crop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h[:, : y.shape[1]])

    captured = capture(Crop(), (torch.randn(4, 8), torch.randn(4, 8)))
    group = group_graph(captured.graph).op_to_group
    [crop] = [n for n in captured.graph.successors("a") if n.startswith("getitem")]
    assert len(list(captured.graph.predecessors(crop))) == 2  # h and the size it is cut at
    assert group[crop] == group["a"]


def test_a_graph_of_fixed_shapes_has_none():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert data_dependent_shapes(gm, (torch.randn(3, 4),)) == []


def test_a_boolean_mask_is_found_with_what_follows_it():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kept = x[x.sum(1) > 0]
            return self.lin(kept).sum(0)

    gm = fx.symbolic_trace(Masked())
    assert data_dependent_shapes(gm, (torch.randn(6, 4),)) == ["getitem", "lin"]
