"""A one-layer language model on nn.MultiheadAttention with a key padding mask and a causal
mask (benchmarks/results/model_styles.md, "Fourth round"). The FLOPs of the attention are read
from its query, key and value arguments; before, self-attention (h, h, h) with two masks was read
as (h, mask, mask) and capture stopped with an IndexError in graphs/flops.py.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, d=128, vocab=1000):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Linear(d, vocab)
    def forward(self, tokens, pad_mask):
        h = self.emb(tokens)
        L = tokens.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=tokens.device), 1)
        a, _ = self.attn(h, h, h, key_padding_mask=pad_mask, attn_mask=causal, need_weights=False)
        return self.ff(h + a)

def get_model():
    torch.manual_seed(0)
    return Net()

def get_example_inputs():
    torch.manual_seed(1)
    tokens = torch.randint(1, 1000, (32, 24))
    pad = torch.zeros(32, 24, dtype=torch.bool)
    pad[:, 20:] = True
    tokens[pad] = 0
    return (tokens, pad)

def get_loss(out, tokens, pad):
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=0)
