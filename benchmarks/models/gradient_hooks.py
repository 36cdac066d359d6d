"""Gradient hooks: a full backward hook on a block that scales the gradient into it and a hook on a
weight that clips its gradient (benchmarks/results/model_styles.md, "Fifth round"). torch pickles a
tensor without its hooks, so before `ac4e177` a pipeline stage in another process trained on the
unclipped gradient.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, d=128):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(4))
        self.head = nn.Linear(d, 10)
        self.blocks[1].register_full_backward_hook(lambda m, gin, gout: (gin[0] * 0.25,))
        self.blocks[0].fc.weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(64, 128), torch.randint(0, 10, (64,)))


def get_loss(out, x, y):
    return F.cross_entropy(out, y)
