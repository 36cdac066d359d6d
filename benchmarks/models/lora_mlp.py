"""An MLP fine-tuned with LoRA: 8 frozen linears of width 2,048, each with a trained rank-8 adapter
beside it, batch 64: the frozen weights' gradients do not exist, so DDP all-reduces the adapters
only (measured over cpu:0,cpu:1 in benchmarks/results/model_styles.md).
"""
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, i, o, r=8):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(r, i) / math.sqrt(i))
        self.b = nn.Parameter(torch.zeros(o, r))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


class Net(nn.Module):
    def __init__(self, width=2048, layers=8):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(layers) for m in (LoRALinear(width, width), nn.ReLU())])
        self.head = nn.Linear(width, 10)

    def forward(self, x, y=None):
        return self.head(self.body(x))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(64, 2048), torch.randint(0, 10, (64,)))


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y)
