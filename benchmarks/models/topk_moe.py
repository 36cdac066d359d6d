"""A token-choice top-2 mixture of experts: a router, torch.topk, each expert given the tokens routed
to it (`nonzero` rows: sizes that depend on the data and change as the router trains) and
`index_add` back (benchmarks/results/model_styles.md, "Eighth round"). Over `cpu:0,cpu:1` every
un-pipelined run failed before `d2e716b` (the rank workers' capture on meta fell back to
torch.export: another graph, 24 of 24 invalid), then one crashed its rank (SIGABRT: gloo received a
routed batch of another size than planned) and 2 of 4 pipelines were refused; since the twenty-ninth
round's `shape_varies` rule (graphs.shape_dependence) a value of varying size stays with its
consumers, and `x[rows]` no longer counts as a view of `x`: 0 invalid of 22 runs, 2 pipelines.
"""
import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    def __init__(self, d=64, n=4):
        super().__init__()
        self.router = nn.Linear(d, n)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, d)) for _ in range(n))
    def forward(self, x):
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        w, idx = torch.topk(F.softmax(self.router(flat), dim=-1), 2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            mask = (idx == e)
            rows = mask.any(-1).nonzero().squeeze(-1)
            gate = (w * mask).sum(-1)[rows].unsqueeze(-1)
            out = out.index_add(0, rows, gate * expert(flat[rows]))
        return x + out.view(b, t, d)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 64)
        self.moe1, self.moe2 = MoE(), MoE()
        self.head = nn.Linear(64, 256)
    def forward(self, ids):
        return self.head(self.moe2(self.moe1(self.emb(ids))))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (8, 33))
    return (ids[:, :-1], ids[:, 1:])


def get_loss(out, ids, y):
    return F.cross_entropy(out.reshape(-1, 256), y.reshape(-1))
