"""An autocast region torch.export wraps in one node is costed by the ops inside it."""

from __future__ import annotations

import torch
from torch import nn

from graphs.capture import capture
from graphs.flops import linear_flops


class _Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.b(torch.relu(self.a(x)))
        return self.head(h.float())


def test_an_autocast_region_costs_the_flops_of_its_ops_and_launches_one_kernel_each():
    """It was costed as an elementwise op over its inputs (1 MFLOP for 4.3 GFLOPs of linears), so a
    simulated GPU ran a mixed-precision model's whole region in microseconds."""
    torch.manual_seed(0)
    cap = capture(_Autocast(), (torch.randn(16, 32),))
    assert cap.method == "export"
    regions = [a for _, a in cap.graph.nodes(data=True) if "wrap_with_autocast" in str(a.get("target"))]
    assert len(regions) == 1
    expected = linear_flops((16, 64), 32, True) + linear_flops((16, 64), 64, True)
    assert regions[0]["flops"] >= expected  # the linears, and the relu's few elements
    assert regions[0]["flops"] <= expected + 16 * 64 * 4
    assert regions[0]["num_ops"] == 3  # linear, relu, linear
    assert regions[0]["bytes_moved"] >= (32 * 64 + 64 * 64) * 4  # the weights it reads, at least
