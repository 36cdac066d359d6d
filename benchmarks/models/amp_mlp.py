"""An MLP whose body runs under bfloat16 autocast: 4 linears of width 1,024 with GELU, a float32
head, batch 512 (benchmarks/results/model_styles.md). torch.export captures the autocast
region as one node, costed by the ops inside it (graphs.region_costs).
"""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=1024, layers=4):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])
        self.head = nn.Linear(width, 10)

    def forward(self, x, y=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.body(x)
        return self.head(h.float())


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(512, 1024), torch.randint(0, 10, (512,)))


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y)
