"""A DLRM-style recommender: 8 EmbeddingBag tables of 200,000 x 64 (410 MB), bottom and top MLPs, the
pairwise interaction of the embeddings, batch 512 of 8 tables x 4 indices. Model argument
``sparse=1`` gives the tables sparse gradients, as DLRM trains them (benchmarks/results/model_styles.md).
"""
import torch
from torch import nn


class DLRM(nn.Module):
    def __init__(self, tables=8, rows=200_000, dim=64, dense=13, sparse=False):
        super().__init__()
        self.emb = nn.ModuleList([nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse) for _ in range(tables)])
        self.bottom = nn.Sequential(nn.Linear(dense, 256), nn.ReLU(), nn.Linear(256, dim), nn.ReLU())
        n = tables + 1
        self.top = nn.Sequential(nn.Linear(dim + n * (n - 1) // 2, 512), nn.ReLU(), nn.Linear(512, 1))
        self.tables = tables

    def forward(self, dense, idx, y=None):
        z = self.bottom(dense)
        embs = [e(idx[:, i, :]) for i, e in enumerate(self.emb)]
        t = torch.stack([z] + embs, dim=1)
        inter = torch.bmm(t, t.transpose(1, 2))
        iu = torch.triu_indices(t.shape[1], t.shape[1], offset=1)
        flat = inter[:, iu[0], iu[1]]
        return self.top(torch.cat([z, flat], dim=1)).squeeze(1)


def get_model(rows=200_000, sparse=0, tables=8):
    torch.manual_seed(0)
    return DLRM(tables=int(tables), rows=int(rows), sparse=bool(int(sparse)))


def get_example_inputs(rows=200_000, tables=8):
    torch.manual_seed(1)
    b = 512
    return (torch.randn(b, 13), torch.randint(0, int(rows), (b, int(tables), 4)), torch.rand(b))


def get_loss(out, dense, idx, y):
    return nn.functional.binary_cross_entropy_with_logits(out, y)


def get_optimizer(params):
    return torch.optim.SGD(params, lr=0.01)  # takes sparse gradients (Adam does not)
