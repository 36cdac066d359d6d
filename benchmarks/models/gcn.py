"""Full-graph message passing (GCN style): 3 layers of width 256 over 2,000 nodes and 20,000 edges
with ``index_add_``; no batch dimension, so no batch split computes the same (the split check says
the parts cannot run; benchmarks/results/model_styles.md).
"""
import torch
from torch import nn

N, E = 2000, 20000


class Layer(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.lin = nn.Linear(i, o)

    def forward(self, x, src, dst, norm):
        msg = self.lin(x)[src] * norm.unsqueeze(1)
        out = torch.zeros(x.shape[0], msg.shape[1], dtype=msg.dtype)
        out.index_add_(0, dst, msg)
        return torch.relu(out)


class GCN(nn.Module):
    def __init__(self, d=128, h=256, c=7, layers=3):
        super().__init__()
        dims = [d] + [h] * (layers - 1)
        self.layers = nn.ModuleList(Layer(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(h, c)

    def forward(self, x, edge_index, norm, y=None):
        src, dst = edge_index[0], edge_index[1]
        for layer in self.layers:
            x = layer(x, src, dst, norm)
        return self.head(x)


def get_model():
    torch.manual_seed(0)
    return GCN()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(N, 128), torch.randint(0, N, (2, E)), torch.rand(E), torch.randint(0, 7, (N,)))


def get_loss(out, x, edge_index, norm, y):
    return nn.functional.cross_entropy(out, y)
