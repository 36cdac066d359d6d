"""RNN language model: embedding, two LSTM layers unrolled over time, large-vocabulary softmax.

The RNNLM of the device-placement literature (ColocRL, the hierarchical planner), after
Jozefowicz et al. 2016 ("Exploring the limits of language modeling"): 2 LSTM layers of
2048 units over a 20-step unroll. The One-Billion-Word vocabulary (~800k words) would make
the embedding and softmax alone 3.3 billion parameters (13 GB in fp32), so the paper
preset uses a 100,000-word vocabulary: ~310M parameters (1.2 GB), which leaves room for
gradients and optimizer state within a few GB while keeping the softmax the largest op.

Model file: ``get_model(size)``, ``get_example_inputs(size)`` → ``(tokens, targets)``,
``get_loss(logits, tokens, targets)`` (next-token cross-entropy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from graphs.zoo.presets import (
    MODEL_SEED,
    check_choice,
    check_positive_int,
    next_token_batch,
    next_token_loss,
    resolve,
    seeded,
)
from graphs.zoo.recurrent import CELL_KINDS, make_cell, run_layer

NAME = "rnnlm"


@dataclasses.dataclass(frozen=True)
class RNNLMConfig:
    """Sizes of the RNN language model and of its example batch."""

    vocab: int
    embed: int
    hidden: int
    layers: int
    seq_len: int
    batch_size: int
    cell: str


PRESETS: dict[str, RNNLMConfig] = {
    "small": RNNLMConfig(vocab=500, embed=16, hidden=32, layers=2, seq_len=6, batch_size=4, cell="lstmcell"),
    "paper": RNNLMConfig(vocab=100_000, embed=512, hidden=2048, layers=2, seq_len=20, batch_size=64, cell="gates"),
}


def config(size: str = "small", **overrides: object) -> RNNLMConfig:
    """The preset for ``size`` with overrides (``layers``, ``cell``, ``seq_len``, ``batch_size``) applied."""
    cfg = resolve(PRESETS, size, NAME, **overrides)
    for name in ("vocab", "embed", "hidden", "layers", "seq_len", "batch_size"):
        check_positive_int(NAME, name, getattr(cfg, name))
    check_choice(NAME, "cell", cfg.cell, CELL_KINDS)
    return cfg


class RNNLM(nn.Module):
    """Embedding → ``layers`` unrolled LSTM layers → linear softmax projection over the vocabulary.

    The unroll length is fixed at construction (``cfg.seq_len``), as in a static graph.
    """

    def __init__(self, cfg: RNNLMConfig) -> None:
        super().__init__()
        self.seq_len = cfg.seq_len
        self.embedding = nn.Embedding(cfg.vocab, cfg.embed)
        sizes = [cfg.embed] + [cfg.hidden] * cfg.layers
        self.cells = nn.ModuleList(make_cell(cfg.cell, sizes[i], sizes[i + 1]) for i in range(cfg.layers))
        self.softmax = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [batch, seq_len]`` → logits ``[batch, seq_len, vocab]``.

        ``targets`` is accepted so the example inputs can carry them to ``get_loss``; it is not read.
        """
        emb = self.embedding(tokens)
        steps = [emb[:, t] for t in range(self.seq_len)]
        for cell in self.cells:
            steps = run_layer(cell, steps)
        return self.softmax(torch.stack(steps, dim=1))


def get_model(size: str = "small", layers: int | None = None, cell: str | None = None,
              seq_len: int | None = None) -> nn.Module:
    """The RNN language model at ``size`` ("small" or "paper"), seeded so every call is identical."""
    cfg = config(size, layers=layers, cell=cell, seq_len=seq_len)
    with seeded(MODEL_SEED):
        return RNNLM(cfg)


def get_example_inputs(size: str = "small", seq_len: int | None = None,
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)``, both ``[batch, seq_len]`` int64; targets are the tokens shifted by one."""
    cfg = config(size, seq_len=seq_len, batch_size=batch_size)
    return next_token_batch(cfg.vocab, cfg.batch_size, cfg.seq_len)


def get_loss(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [batch, seq, vocab]`` against ``targets [batch, seq]``."""
    return next_token_loss(logits, targets)


def get_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adagrad with learning rate 0.2, as Jozefowicz et al. trained their LSTM language models."""
    return torch.optim.Adagrad(params, lr=0.2)
