"""An MLP with forward hooks written as lambdas in __init__: one rescales a block's output,
one clamps the head's input (benchmarks/results/model_styles.md, "Fourth round"). The hooks reach
the worker processes by value (graphs.portable_graph); before, every measured pipeline and DDP of
the model failed: "Can't pickle local object 'Net.__init__.<locals>.<lambda>'".
"""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
    def forward(self, x):
        return F.relu(self.fc(x))

class Net(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(6))
        self.head = nn.Linear(d, 10)
        # a forward hook that rescales a block's output, a pre-hook that clamps a leaf's input
        self.blocks[2].register_forward_hook(lambda m, i, o: o * 0.5)
        self.head.register_forward_pre_hook(lambda m, i: (i[0].clamp(max=1.0),))
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)

def get_model():
    torch.manual_seed(0)
    return Net()

def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(64, 256), torch.randint(0, 10, (64,)))

def get_loss(out, x, y):
    return F.cross_entropy(out, y)
