"""Truncated backpropagation through time: a 2-layer LSTM LM (vocabulary 2,000, width 256, batch 32
of 35 tokens) that takes its state ``(layers, batch, hidden)`` as inputs beside ``(batch, time)``
tokens (benchmarks/results/model_styles.md). DDP shares and micro-batches cut the state along its
dim 1, the one of the batch's size (graphs.input_batch.batch_axis).
"""
import torch
import torch.nn.functional as F
from torch import nn


class LM(nn.Module):
    def __init__(self, vocab=2000, width=256, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, layers, batch_first=True)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids, h0, c0):
        y, (h, c) = self.rnn(self.emb(ids), (h0, c0))
        return self.out(y), h, c


def get_model():
    torch.manual_seed(0)
    return LM()


def get_example_inputs():
    torch.manual_seed(1)
    ids = torch.randint(0, 2000, (32, 35))
    return (ids, torch.zeros(2, 32, 256), torch.zeros(2, 32, 256), torch.roll(ids, -1, 1))


def get_loss(out, ids, h0, c0, targets):
    return F.cross_entropy(out[0].reshape(-1, out[0].shape[-1]), targets.reshape(-1))
