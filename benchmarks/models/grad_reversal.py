"""A domain-adversarial network: a feature MLP feeding a label head and, through a gradient-reversal
``torch.autograd.Function``, a domain head (batch 128; benchmarks/results/model_styles.md). The
Function is captured as one node that calls it, so its own backward runs (graphs.autograd_functions).
"""
import torch
from torch import nn


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.alpha * g, None


class Net(nn.Module):
    def __init__(self, width=512):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.label = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        self.domain = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))

    def forward(self, x, y=None, d=None):
        f = self.features(x)
        return self.label(f), self.domain(GradReverse.apply(f, 0.5))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(128, 256), torch.randint(0, 10, (128,)), torch.randint(0, 2, (128,)))


def get_loss(out, x, y, d):
    return nn.functional.cross_entropy(out[0], y) + nn.functional.cross_entropy(out[1], d)
