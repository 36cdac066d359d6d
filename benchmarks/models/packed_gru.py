"""A 2-layer GRU classifier over padded sequences packed with ``pack_padded_sequence`` (batch 64 of up to
40 tokens): the packing and the GRU sit in one submodule, run whole with ``--leaf Encoder``, since no
tracer records a packing (benchmarks/results/model_styles.md).
"""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class Encoder(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.gru = nn.GRU(d, d, num_layers=2, batch_first=True)

    def forward(self, x, lengths):
        _, h = self.gru(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return h[-1]


class Net(nn.Module):
    def __init__(self, vocab=5000, d=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = Encoder(d)
        self.out = nn.Linear(d, 4)

    def forward(self, tokens, lengths, y=None):
        return self.out(self.enc(self.emb(tokens), lengths))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randint(0, 5000, (64, 40)), torch.randint(5, 41, (64,)), torch.randint(0, 4, (64,)))


def get_loss(out, tokens, lengths, y):
    return nn.functional.cross_entropy(out, y)
