"""A ConvNeXt-style network: depthwise 7x7 convolutions, a channels-last LayerNorm via permute, layer
scale and stochastic depth drawn with ``torch.rand`` (3 stages of 2 blocks, widths 64-256, batch 16 of
64x64 images). The split check replays the full batch's random draws in its parts
(envs.runtime.random_replay; benchmarks/results/model_styles.md).
"""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d, drop=0.1):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(1e-6 * torch.ones(d))
        self.drop = drop

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pw2(nn.functional.gelu(self.pw1(self.ln(h))))
        h = h.permute(0, 3, 1, 2)
        if self.training and self.drop > 0:
            keep = (torch.rand(x.shape[0], 1, 1, 1) > self.drop).to(x.dtype) / (1 - self.drop)
            h = h * keep
        return x + h


class Net(nn.Module):
    def __init__(self, dims=(64, 128, 256), depth=2):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 4, stride=4)
        layers = []
        for i, d in enumerate(dims):
            if i:
                layers.append(nn.Conv2d(dims[i - 1], d, 2, stride=2))
            layers += [Block(d) for _ in range(depth)]
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], 10)

    def forward(self, x, y=None):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,)))


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y)
