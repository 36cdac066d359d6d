"""A layer whose activation is made sparse in forward (ReLU output .to_sparse()) and multiplied
by torch.sparse.mm (benchmarks/results/model_styles.md, "Seventh round"): a sparse tensor made
inside the graph, which torch.distributed's point-to-point send cannot carry; since commit
58b1161 the op that makes it is grouped with its consumers.
"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(32, 256)
        self.w = nn.Parameter(torch.randn(256, 64) * 0.05)
        self.l2 = nn.Linear(64, 4)

    def forward(self, x):
        s = torch.relu(self.l1(x) - 0.5).to_sparse()
        return self.l2(torch.sparse.mm(s, self.w))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    return (torch.randn(32, 32), torch.randint(0, 4, (32,)))


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y)
