"""Small fx models trained through the pipeline runtime's tests: a chain of layers, one with a skip, a batch, stage cuts."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

B, D = 8, 16


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 5)

    def forward(self, x, y):
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h))
        h = torch.relu(self.l3(h))
        return F.cross_entropy(self.head(h), y)


class Skip(Chain):
    """h1 is read again by the last stage: it crosses (is relayed over) every boundary."""

    def forward(self, x, y):
        h1 = torch.relu(self.l1(x))
        h2 = torch.relu(self.l2(h1))
        h3 = torch.relu(self.l3(h2)) + h1
        return F.cross_entropy(self.head(h3), y)


class SequenceFirst(nn.Module):
    """A GRU over inputs of shape (time, batch, features), torch's default layout: the batch is
    dim 1 (``batch_dim = 1``); cut along dim 0, every part would start the recurrence afresh."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.rnn, self.head = nn.Linear(D, D), nn.GRU(D, D), nn.Linear(D, 5)

    def forward(self, x, y):
        h, _ = self.rnn(torch.tanh(self.l1(x)))
        return F.cross_entropy(self.head(h).reshape(-1, 5), y.reshape(-1))


#: Time steps of :class:`SequenceFirst`'s batch (a multiple of 2, so a cut along time would run too).
T = 6


def sequence_first_batch():
    """:class:`SequenceFirst` traced, and a batch of ``B`` sequences of ``T`` steps, batch on dim 1."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(SequenceFirst())
    g = torch.Generator().manual_seed(1)
    return gm, {"x": torch.randn(T, B, D, generator=g), "y": torch.randint(0, 5, (T, B), generator=g)}


def model_and_batch(cls):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(cls())
    g = torch.Generator().manual_seed(1)
    return gm, {"x": torch.randn(B, D, generator=g), "y": torch.randint(0, 5, (B,), generator=g)}


def stages_of(gm, cuts):
    """Compute nodes in program order, cut before the named nodes."""
    names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    out, cur = [], []
    for n in names:
        if n in cuts and cur:
            out.append(tuple(cur))
            cur = []
        cur.append(n)
    return tuple(out + [tuple(cur)])


class ActivationUpdatedAfterItIsRead(nn.Module):
    """``h.mul_(2.0)`` after ``h`` was read: a stage cut between the read and the update must
    not send the old values, nor update what another stage received."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        y = h.sum(1, keepdim=True)
        h.mul_(2.0)
        return self.c(h) + y


class MaskUpdatedAfterItIsRead(nn.Module):
    """A mask (no gradient) read by the second rank, then halved in place and read again."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        m = (x > 0).float()
        y = self.a(x) + m
        m.mul_(0.5)
        return self.c(y * m)
