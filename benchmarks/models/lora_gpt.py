"""A GPT (6 blocks of width 384, causal-mask buffer, manual attention, tied head) fine-tuned with LoRA:
the base weights, embeddings, MLPs and output projections frozen, rank-8 adapters on the attention's
input projection trained (batch 16 x 128 tokens). Frozen parameters get no gradient, optimizer state
or all-reduce in the simulator (benchmarks/results/model_styles.md).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, i, o, r=8):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.weight.requires_grad_(False)
        self.base.bias.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(r, i) / math.sqrt(i))
        self.b = nn.Parameter(torch.zeros(o, r))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


class Attention(nn.Module):
    def __init__(self, d, h, t):
        super().__init__()
        self.h = h
        self.qkv = LoRALinear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(t, t)).view(1, 1, t, t))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        return self.proj((att @ v).transpose(1, 2).contiguous().view(b, t, d))


class Block(nn.Module):
    def __init__(self, d, h, t):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, h, t)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=8000, d=384, h=6, layers=6, t=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(Block(d, h, t) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.head.weight
        for p in list(self.wte.parameters()) + list(self.wpe.parameters()):
            p.requires_grad_(False)
        for blk in self.blocks:
            for m in (blk.mlp, blk.attn.proj):
                for p in m.parameters():
                    p.requires_grad_(False)

    def forward(self, idx, y=None):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def get_model():
    torch.manual_seed(0)
    return GPT()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randint(0, 8000, (16, 128)), torch.randint(0, 8000, (16, 128)))


def get_loss(out, idx, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
