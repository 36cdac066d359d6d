"""Attentional NMT encoder–decoder in the style of GNMT (Wu et al. 2016), unrolled over time.

Encoder: source embedding; layer 1 bidirectional (a forward and a backward LSTM whose
outputs are concatenated); layers 2..L unidirectional, with residual connections from
layer 3 on. Decoder: target embedding; L LSTM layers; the bottom layer's output queries a
normalized Bahdanau attention over the encoder outputs, and the context is fed to every
decoder layer at that step and to the bottom layer at the next one (GNMT's attention
wiring); residual connections from layer 3; a large-vocabulary softmax projection.

Every time step of every layer is a separate call of that layer's cell (see
:mod:`graphs.zoo.recurrent`), so the decoder's shared cells show up as one module called
``tgt_len`` times. The paper preset is the 8-layer GNMT (hidden 1024, 32k word-piece
vocabulary, 50-token sentences, batch 128) with op-level cells. Sentence length: 50
source and 50 target tokens, the length GNMT's reference configuration trains with
(TensorFlow NMT's ``standard_hparams/wmt16_gnmt_8_layer.json``: ``src_max_len`` =
``tgt_max_len`` = 50, ``num_units`` 1024, ``batch_size`` 128); it is not raised to inflate
the graph. Counted on the meta device (``layers`` 8, 50 + 50 tokens): 16,172 fx nodes —
forward ops, each carrying its backward and its parameters' update as costs — and 30,801
ops as a training graph counts them (16,165 forward ops + 14,576 backward autograd nodes
+ 60 parameter updates), the form of the TensorFlow training graphs the placement papers
report ("over 80,000 operations" for theirs, which also hold TF's bookkeeping ops: Const,
Identity, shape and gradient-aggregation nodes). ``layers`` (2, 4, 8, …) can be passed at any size:
``get_model(size="paper", layers=4)``. All sentences are full length (no padding masks),
as in the fixed-length benchmarks of the placement literature.

Model file: ``get_example_inputs`` → ``(source, target_in, target_out)``;
``get_loss`` is the cross-entropy of the logits against ``target_out``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from graphs.zoo.presets import (
    MODEL_SEED,
    ZooArgumentError,
    check_choice,
    check_positive_int,
    random_tokens,
    resolve,
    seeded,
)
from graphs.zoo.recurrent import CELL_KINDS, make_cell, run_layer, step

NAME = "nmt"
RESIDUAL_FROM = 2  # 0-based index of the first layer with a residual connection ("from layer 3")


@dataclasses.dataclass(frozen=True)
class NMTConfig:
    """Sizes of the NMT model and of its example batch (source and target vocabularies are equal in size)."""

    vocab: int
    hidden: int
    layers: int
    src_len: int
    tgt_len: int
    batch_size: int
    cell: str


PRESETS: dict[str, NMTConfig] = {
    "small": NMTConfig(vocab=300, hidden=16, layers=2, src_len=5, tgt_len=5, batch_size=3, cell="lstmcell"),
    "paper": NMTConfig(vocab=32_000, hidden=1024, layers=8, src_len=50, tgt_len=50, batch_size=128, cell="gates"),
}


def config(size: str = "small", **overrides: object) -> NMTConfig:
    """The preset for ``size`` with overrides applied and checked."""
    cfg = resolve(PRESETS, size, NAME, **overrides)
    for name in ("vocab", "hidden", "layers", "src_len", "tgt_len", "batch_size"):
        check_positive_int(NAME, name, getattr(cfg, name))
    if cfg.layers < 2:
        raise ZooArgumentError(f"{NAME}: layers must be at least 2 (a bidirectional layer and one more), got {cfg.layers}")
    check_choice(NAME, "cell", cfg.cell, CELL_KINDS)
    return cfg


class NormalizedBahdanauAttention(nn.Module):
    """Additive attention with a weight-normalised score vector (as in GNMT).

    ``score(q, k_s) = g · (v / ‖v‖) · tanh(W_k k_s + W_q q + b)``, softmax over source steps.
    The key projection and the normalised ``v`` are computed once per sentence
    (:meth:`prepare`); :meth:`forward` runs once per decoder step.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.v = nn.Parameter(torch.randn(hidden) / hidden**0.5)
        self.g = nn.Parameter(torch.tensor(1.0 / hidden**0.5))

    def prepare(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys ``[batch, src, hidden]`` and the scaled unit score vector ``[hidden]``."""
        return self.key(memory) + self.bias, self.g * self.v / self.v.norm()

    def forward(self, query: torch.Tensor, keys: torch.Tensor, v: torch.Tensor,
                memory: torch.Tensor) -> torch.Tensor:
        """Context ``[batch, hidden]`` for ``query [batch, hidden]`` over ``memory [batch, src, hidden]``."""
        energy = torch.tanh(keys + self.query(query).unsqueeze(1))
        weights = F.softmax(torch.matmul(energy, v), dim=1)
        return torch.bmm(weights.unsqueeze(1), memory).squeeze(1)


class GNMT(nn.Module):
    """GNMT-style encoder–decoder with unrolled LSTM layers; ``forward(source, target_in)`` → logits."""

    def __init__(self, cfg: NMTConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.src_len, self.tgt_len, self.hidden = cfg.src_len, cfg.tgt_len, h
        self.src_embedding = nn.Embedding(cfg.vocab, h)
        self.tgt_embedding = nn.Embedding(cfg.vocab, h)
        self.enc_fwd = make_cell(cfg.cell, h, h)
        self.enc_bwd = make_cell(cfg.cell, h, h)
        # layer 2 reads the concatenated bidirectional output (2h); the rest read h
        self.encoder = nn.ModuleList(make_cell(cfg.cell, 2 * h if i == 1 else h, h) for i in range(1, cfg.layers))
        # every decoder layer reads [its input ; attention context]
        self.decoder = nn.ModuleList(make_cell(cfg.cell, 2 * h, h) for _ in range(cfg.layers))
        self.attention = NormalizedBahdanauAttention(h)
        self.projection = nn.Linear(h, cfg.vocab)

    def encode(self, source: torch.Tensor) -> torch.Tensor:
        """``source [batch, src_len]`` → encoder outputs ``[batch, src_len, hidden]``."""
        emb = self.src_embedding(source)
        steps = [emb[:, t] for t in range(self.src_len)]
        fwd = run_layer(self.enc_fwd, steps)
        bwd = run_layer(self.enc_bwd, steps, reverse=True)
        steps = [torch.cat([f, b], dim=1) for f, b in zip(fwd, bwd)]
        for index, cell in enumerate(self.encoder, start=1):
            outputs = run_layer(cell, steps)
            if index >= RESIDUAL_FROM:
                outputs = [o + x for o, x in zip(outputs, steps)]
            steps = outputs
        return torch.stack(steps, dim=1)

    def forward(self, source: torch.Tensor, target_in: torch.Tensor,
                target_out: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``[batch, tgt_len, vocab]``.

        ``target_out`` is accepted so the example inputs can carry it to ``get_loss``; it is not read.
        """
        memory = self.encode(source)
        keys, v = self.attention.prepare(memory)
        emb = self.tgt_embedding(target_in)
        context = emb.new_zeros(emb.shape[0], self.hidden)
        states: list = [None] * len(self.decoder)
        outputs = []
        for t in range(self.tgt_len):
            x, states[0] = step(self.decoder[0], torch.cat([emb[:, t], context], dim=1), states[0])
            context = self.attention(x, keys, v, memory)
            for index in range(1, len(self.decoder)):
                out, states[index] = step(self.decoder[index], torch.cat([x, context], dim=1), states[index])
                x = out + x if index >= RESIDUAL_FROM else out
            outputs.append(x)
        return self.projection(torch.stack(outputs, dim=1))


def get_model(size: str = "small", layers: int | None = None, cell: str | None = None,
              src_len: int | None = None, tgt_len: int | None = None) -> nn.Module:
    """The NMT model at ``size`` ("small" or "paper"), ``layers`` deep (default: 2 small, 8 paper); seeded."""
    cfg = config(size, layers=layers, cell=cell, src_len=src_len, tgt_len=tgt_len)
    with seeded(MODEL_SEED):
        return GNMT(cfg)


def get_example_inputs(size: str = "small", src_len: int | None = None, tgt_len: int | None = None,
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source [b, src_len], target_in [b, tgt_len], target_out [b, tgt_len])`` token ids, seeded.

    ``target_in`` is the target sentence shifted right (teacher forcing), ``target_out`` the sentence.
    """
    cfg = config(size, src_len=src_len, tgt_len=tgt_len, batch_size=batch_size)
    source = random_tokens(cfg.vocab, cfg.batch_size, cfg.src_len + cfg.tgt_len + 1)
    target = source[:, cfg.src_len:]
    return source[:, : cfg.src_len].contiguous(), target[:, :-1].contiguous(), target[:, 1:].contiguous()


def get_loss(logits: torch.Tensor, source: torch.Tensor, target_in: torch.Tensor,
             target_out: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of ``logits [batch, tgt_len, vocab]`` against ``target_out``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_out.reshape(-1))


def get_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with learning rate 2e-4, GNMT's first training phase."""
    return torch.optim.Adam(params, lr=2e-4)
