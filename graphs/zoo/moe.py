"""Sparsely-gated mixture-of-experts language model (Shazeer et al. 2017), traceable dispatch.

Embedding → LSTM layer (unrolled over time) → MoE layer applied to every time step at
once → LSTM layer → softmax over the vocabulary, as the paper's One-Billion-Word models
(512-unit LSTMs, experts that are one-hidden-layer ReLU networks of 1,024 units, top-4
gating). The paper preset has 128 experts and, like :mod:`graphs.zoo.rnnlm`, a
100,000-word vocabulary instead of ~800k so that it fits a few GB.

The dispatch has no data-dependent Python control flow, so torch.fx traces it: the gate
scores every expert, keeps the top ``k`` (softmax over the kept scores, the rest zero —
``topk`` + ``scatter``), and each expert receives a fixed-size buffer of ``capacity``
tokens built with a one-hot dispatch tensor (the GShard formulation). Tokens beyond an
expert's capacity are dropped by that expert (the residual connection carries them on).
Each expert is its own submodule, called once, so experts can be spread across devices.
The capacity is fixed when the model is built, from the preset's tokens per batch:
``ceil(capacity_factor · k · batch · seq_len / experts)``. The gate noise and the
load-balancing losses of the paper are training aids left out here so that outputs and
profiles are deterministic.

Model file: ``get_example_inputs`` → ``(tokens, targets)``; ``get_loss`` is next-token
cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from graphs.zoo.presets import (
    MODEL_SEED,
    ZooArgumentError,
    check_choice,
    check_positive_int,
    next_token_batch,
    next_token_loss,
    resolve,
    seeded,
)
from graphs.zoo.recurrent import CELL_KINDS, make_cell, run_layer

NAME = "moe"


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sizes of the MoE language model, its gating, and its example batch."""

    vocab: int
    hidden: int
    experts: int
    expert_hidden: int
    k: int
    capacity_factor: float
    seq_len: int
    batch_size: int
    cell: str

    @property
    def capacity(self) -> int:
        """Tokens each expert takes per batch."""
        tokens = self.batch_size * self.seq_len
        return max(1, math.ceil(self.capacity_factor * self.k * tokens / self.experts))


PRESETS: dict[str, MoEConfig] = {
    "small": MoEConfig(vocab=500, hidden=16, experts=4, expert_hidden=32, k=2, capacity_factor=1.25,
                       seq_len=4, batch_size=3, cell="lstmcell"),
    "paper": MoEConfig(vocab=100_000, hidden=512, experts=128, expert_hidden=1024, k=4, capacity_factor=1.25,
                       seq_len=20, batch_size=64, cell="gates"),
}


def config(size: str = "small", **overrides: object) -> MoEConfig:
    """The preset for ``size`` with overrides (``experts``, ``k``, ``cell``, ``seq_len``, ``batch_size``) applied."""
    cfg = resolve(PRESETS, size, NAME, **overrides)
    for name in ("vocab", "hidden", "experts", "expert_hidden", "k", "seq_len", "batch_size"):
        check_positive_int(NAME, name, getattr(cfg, name))
    if cfg.k > cfg.experts:
        raise ZooArgumentError(f"{NAME}: k={cfg.k} experts per token exceeds the {cfg.experts} experts")
    if not isinstance(cfg.capacity_factor, (int, float)) or cfg.capacity_factor <= 0:
        raise ZooArgumentError(f"{NAME}: capacity_factor must be a positive number, got {cfg.capacity_factor!r}")
    check_choice(NAME, "cell", cfg.cell, CELL_KINDS)
    return cfg


class Expert(nn.Module):
    """One expert: a one-hidden-layer ReLU network ``hidden → expert_hidden → hidden``."""

    def __init__(self, hidden: int, expert_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, expert_hidden)
        self.fc2 = nn.Linear(expert_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [tokens, hidden]`` → ``[tokens, hidden]``."""
        return self.fc2(F.relu(self.fc1(x)))


class MoELayer(nn.Module):
    """Top-k gated mixture of experts with fixed-capacity dispatch; ``[tokens, hidden]`` → same."""

    def __init__(self, hidden: int, experts: int, expert_hidden: int, k: int, capacity: int) -> None:
        super().__init__()
        self.k, self.capacity = k, capacity
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, expert_hidden) for _ in range(experts))

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch and combine tensors ``[tokens, experts, capacity]`` for ``x [tokens, hidden]``.

        ``dispatch[t, e, c]`` is 1 when token ``t`` sits in slot ``c`` of expert ``e``;
        ``combine`` is the same with the gate weight of that token for that expert.
        """
        logits = self.gate(x)
        top = torch.topk(logits, self.k, dim=1)
        weights = F.softmax(top[0], dim=1)
        gates = torch.zeros_like(logits).scatter(1, top[1], weights)
        chosen = torch.zeros_like(logits).scatter(1, top[1], 1.0)
        # slot of each token in each chosen expert: tokens are served in order, first come first
        position = (torch.cumsum(chosen, dim=0) - 1.0) * chosen
        kept = chosen * (position < self.capacity).to(x.dtype)
        slots = F.one_hot(position.clamp(max=self.capacity - 1).long(), self.capacity).to(x.dtype)
        dispatch = slots * kept.unsqueeze(-1)
        return dispatch, dispatch * gates.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture output for ``x [tokens, hidden]``: the gate-weighted sum of the chosen experts' outputs."""
        dispatch, combine = self.routing(x)
        expert_inputs = torch.einsum("tec,td->ecd", dispatch, x)
        outputs = torch.stack([expert(expert_inputs[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("tec,ecd->td", combine, outputs)


class MoELM(nn.Module):
    """Embedding → unrolled LSTM → MoE (residual) on all steps → unrolled LSTM → vocabulary logits."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.seq_len, self.hidden = cfg.seq_len, cfg.hidden
        self.embedding = nn.Embedding(cfg.vocab, cfg.hidden)
        self.lstm1 = make_cell(cfg.cell, cfg.hidden, cfg.hidden)
        self.moe = MoELayer(cfg.hidden, cfg.experts, cfg.expert_hidden, cfg.k, cfg.capacity)
        self.lstm2 = make_cell(cfg.cell, cfg.hidden, cfg.hidden)
        self.softmax = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [batch, seq_len]`` → logits ``[batch, seq_len, vocab]``; ``targets`` ride along unread."""
        emb = self.embedding(tokens)
        steps = run_layer(self.lstm1, [emb[:, t] for t in range(self.seq_len)])
        seq = torch.stack(steps, dim=1)
        flat = seq.reshape(-1, self.hidden)
        mixed = (flat + self.moe(flat)).reshape(seq.shape)
        steps = run_layer(self.lstm2, [mixed[:, t] for t in range(self.seq_len)])
        return self.softmax(torch.stack(steps, dim=1))


def get_model(size: str = "small", experts: int | None = None, k: int | None = None, cell: str | None = None,
              seq_len: int | None = None, batch_size: int | None = None) -> nn.Module:
    """The MoE language model at ``size`` ("small" or "paper"), seeded so every call is identical.

    ``seq_len`` and ``batch_size`` fix the unroll length and the experts' capacity.
    """
    cfg = config(size, experts=experts, k=k, cell=cell, seq_len=seq_len, batch_size=batch_size)
    with seeded(MODEL_SEED):
        return MoELM(cfg)


def get_example_inputs(size: str = "small", seq_len: int | None = None,
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)``, both ``[batch, seq_len]`` int64; targets are the tokens shifted by one."""
    cfg = config(size, seq_len=seq_len, batch_size=batch_size)
    return next_token_batch(cfg.vocab, cfg.batch_size, cfg.seq_len)


def get_loss(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [batch, seq, vocab]`` against ``targets``."""
    return next_token_loss(logits, targets)


def get_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (β₁ = 0.9, β₂ = 0.999) at learning rate 1e-3, as Shazeer et al. trained the MoE LMs."""
    return torch.optim.Adam(params, lr=1e-3)
