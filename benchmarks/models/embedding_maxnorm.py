"""An embedding with max_norm, which renormalises the rows it looks up in place, in forward
(benchmarks/results/model_styles.md, "Fifth round"). Under DDP each replica renormalises the rows of
its own samples and parameters are never synchronised (torch's DDP over two gloo processes: the
tables 12.5 apart after 3 steps); the split check passed it before `e6ad516` and now refuses replicas.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 64, max_norm=1.0)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))

    def forward(self, ids):
        return self.mlp(self.emb(ids).mean(1))


def get_model():
    torch.manual_seed(0)
    model = Net()
    model.emb.weight.data.mul_(3.0)  # rows above max_norm: the forward renormalises those it looks up
    return model


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randint(0, 1000, (32, 20)), torch.randint(0, 2, (32,)))


def get_loss(out, ids, y):
    return F.cross_entropy(out, y)
