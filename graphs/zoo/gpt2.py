"""GPT-2-style Transformer decoder (Radford et al. 2019), written so torch.fx traces it.

Token and learned position embeddings; pre-LayerNorm blocks of causal multi-head
self-attention (plain matmul/softmax with a causal mask buffer, no fused kernels) and a
4× GELU MLP; a final LayerNorm; the language-model head tied to the token embedding, as
in GPT-2. The paper preset is GPT-2 small: 12 layers, width 768, 12 heads, 50,257-token
vocabulary, 1,024 positions (124M parameters), here with batch 4 at the full context.
Dropout is left out so that outputs (and profiles) are deterministic.

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
    check_positive_int,
    next_token_batch,
    next_token_loss,
    resolve,
    seeded,
)

NAME = "gpt2"


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Sizes of the GPT-2 model and of its example batch (``seq_len <= n_positions``)."""

    vocab: int
    n_positions: int
    width: int
    layers: int
    heads: int
    seq_len: int
    batch_size: int


PRESETS: dict[str, GPT2Config] = {
    "small": GPT2Config(vocab=512, n_positions=32, width=32, layers=2, heads=4, seq_len=16, batch_size=2),
    "paper": GPT2Config(vocab=50_257, n_positions=1024, width=768, layers=12, heads=12, seq_len=1024, batch_size=4),
}


def config(size: str = "small", **overrides: object) -> GPT2Config:
    """The preset for ``size`` with overrides (``layers``, ``width``, ``heads``, ``seq_len``, ``batch_size``)
    applied and checked."""
    cfg = resolve(PRESETS, size, NAME, **overrides)
    for name in ("vocab", "n_positions", "width", "layers", "heads", "seq_len", "batch_size"):
        check_positive_int(NAME, name, getattr(cfg, name))
    if cfg.width % cfg.heads:
        raise ZooArgumentError(f"{NAME}: width {cfg.width} must be divisible by heads {cfg.heads}")
    if cfg.seq_len > cfg.n_positions:
        raise ZooArgumentError(f"{NAME}: seq_len {cfg.seq_len} exceeds the {cfg.n_positions} positions of the model")
    return cfg


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``i`` sees positions ``<= i``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.width, self.head_dim = heads, width, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [batch, seq, width]`` and the additive causal ``mask [seq, seq]`` → ``[batch, seq, width]``."""
        # batch and seq are read from the input (proxies under fx); the widths are Python ints
        batch, seq = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).split(self.width, dim=2)
        q = q.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        weights = F.softmax(scores + mask, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, seq, self.width)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One block on ``x [batch, seq, width]`` with the additive causal ``mask``."""
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 decoder: ``forward(tokens)`` → logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self._init_weights(cfg)

    def _init_weights(self, cfg: GPT2Config) -> None:
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [batch, seq]`` → logits; ``targets`` only rides along to ``get_loss`` and is not read."""
        # positions and mask are built from the input's length (a proxy under fx), once per forward
        seq = tokens.shape[1]
        positions = torch.arange(seq, device=tokens.device)
        mask = torch.full((seq, seq), float("-inf"), device=tokens.device).triu(1)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x, mask)
        # the LM head shares the token-embedding matrix (weight tying, as GPT-2)
        return F.linear(self.ln_f(x), self.wte.weight)


def get_model(size: str = "small", layers: int | None = None, width: int | None = None,
              heads: int | None = None) -> nn.Module:
    """GPT-2 at ``size`` ("small": 2 tiny layers; "paper": GPT-2 small, 124M parameters), seeded;
    ``layers``, ``width`` and ``heads`` override the preset's (a mid-size model for CPU runs)."""
    cfg = config(size, layers=layers, width=width, heads=heads)
    with seeded(MODEL_SEED):
        return GPT2(cfg)


def get_example_inputs(size: str = "small", seq_len: int | None = None,
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)``, both ``[batch, seq_len]`` int64; targets are the tokens shifted by one."""
    cfg = config(size, seq_len=seq_len, batch_size=batch_size)
    return next_token_batch(cfg.vocab, cfg.batch_size, cfg.seq_len)


def get_loss(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits [batch, seq, vocab]`` against ``targets``."""
    return next_token_loss(logits, targets)


def get_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (β₂ = 0.95, weight decay 0.1, learning rate 6e-4), the usual GPT-2-small recipe."""
    return torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
