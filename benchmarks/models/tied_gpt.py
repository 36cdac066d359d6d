"""A GPT in the nanoGPT style: 6 pre-norm blocks of width 256 over F.scaled_dot_product_attention,
an output head tied to the token embedding (``head.weight = tok.weight``), 8,000 words, batch 32 x 64
tokens (benchmarks/results/model_styles.md). Model arguments ``vocab``, ``width``, ``layers``, ``batch`` for
smaller runs. The tie no longer fuses the model into one group
(graphs.tied_layers).
"""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d=256, h=4):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q = q.view(b, t, self.h, d // self.h).transpose(1, 2)
        k = k.view(b, t, self.h, d // self.h).transpose(1, 2)
        v = v.view(b, t, self.h, d // self.h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return x


class LM(nn.Module):
    def __init__(self, vocab=8000, d=256, layers=6, t=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, t, d))
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])  # 4 heads
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx, y=None):
        x = self.tok(idx) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def get_model(vocab=8000, width=256, layers=6):
    torch.manual_seed(0)
    return LM(int(vocab), int(width), int(layers))


def get_example_inputs(vocab=8000, batch=32):
    torch.manual_seed(1)
    return (torch.randint(0, int(vocab), (int(batch), 64)), torch.randint(0, int(vocab), (int(batch), 64)))


def get_loss(out, idx, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
