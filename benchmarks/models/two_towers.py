"""Two independent MLP towers on one input, summed: a model whose halves can run at once on two
workers (6 layers of width 512 each, GELU, batch 256; ~2 x 3 M parameters). Used to show the
one-process reference of a measured run over CPU workers (docs/distributed.md).
"""

import torch
from torch import nn


def tower(width, depth):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


class Towers(nn.Module):
    def __init__(self, width=512, depth=6):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.left = tower(width, depth)
        self.right = tower(width, depth)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.left(h) + self.right(h))


def get_model():
    torch.manual_seed(0)
    return Towers()


def get_example_inputs():
    return (torch.randn(256, 64),)
