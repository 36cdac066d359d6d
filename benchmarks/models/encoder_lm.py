"""A causal language model on ``nn.TransformerEncoder`` (batch first): 12 layers of width 512,
8,000 words, 16 sequences of 32 tokens, 46 M parameters. placer captures the stack one node per
layer (graphs.transformer_stacks), so its layers can be placed and pipelined apart
(benchmarks/results/model_styles.md). Model arguments ``layers``, ``width``, ``vocab``,
``dropout``.
"""

import torch
from torch import nn


class EncoderLM(nn.Module):
    def __init__(self, vocab=8000, width=512, layers=12, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=dropout,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.size(1))
        return self.out(self.enc(self.emb(tokens), mask=mask, is_causal=True))


def get_model(vocab=8000, width=512, layers=12, dropout=0.0):
    torch.manual_seed(0)
    return EncoderLM(vocab, width, layers, dropout)


def get_example_inputs(vocab=8000, width=512, layers=12, dropout=0.0):
    torch.manual_seed(1)
    return (torch.randint(0, vocab, (16, 32)),)


def get_loss(out, tokens):
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.size(-1)), tokens[:, 1:].reshape(-1))
