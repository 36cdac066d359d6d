"""An MLP of ``torch.jit.script``-ed gated layers (4 of width 128, batch 64;
benchmarks/results/model_styles.md): each scripted layer is one op (graphs.fx_tracer), copied with
leaf parameters and sent to pipeline workers as a ``torch.jit.save`` archive. ``forward(x)`` takes
the features only; the labels reach ``get_loss`` alone (graphs.loss_targets).
"""
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lin(x).chunk(2, dim=-1)
        return a * torch.sigmoid(b)


class Net(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.gates = nn.ModuleList([torch.jit.script(Gate(width)) for _ in range(4)])
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        h = self.inp(x)
        for gate in self.gates:
            h = h + gate(h)
        return self.out(h)


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(64, 32), torch.randint(0, 4, (64,)))


def get_loss(out, x, labels):
    return nn.functional.cross_entropy(out, labels)
