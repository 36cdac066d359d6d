"""A classifier over sparse bag-of-words features: the input is a sparse COO (batch, vocabulary)
tensor, one row per sample (torch.sparse.mm; benchmarks/results/model_styles.md, "Seventh round").
Before commit 65dda56 the micro-batch profile ended placer with a traceback (a sparse tensor cannot
be narrowed), and torch.distributed.pipelining could not cut it into micro-batches.
"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(2000, 64) * 0.02)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, bow):
        return self.mlp(torch.sparse.mm(bow, self.proj))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    b = 32
    rows = torch.arange(b).repeat_interleave(10)
    cols = torch.randint(0, 2000, (b * 10,))
    bow = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(b * 10), (b, 2000)).coalesce()
    return (bow, torch.randint(0, 5, (b,)))


def get_loss(out, bow, y):
    return nn.functional.cross_entropy(out, y)
