"""A 2-layer LSTM language model in torch's default sequence-first layout, tokens of shape
(time, batch): 12 steps x 256 sequences, hidden 1,024, 20,000 words. ``batch_dim = 1`` tells
placer that the batch is dim 1, so DDP replicas and pipeline micro-batches split sequences, not
time (benchmarks/results/model_styles.md). Model argument ``hidden`` (and ``vocab``, ``batch``)
for smaller runs.
"""

import torch
from torch import nn

batch_dim = 1


class LM(nn.Module):
    def __init__(self, vocab=20000, hidden=1024):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=2)  # sequence-first, as torch's default
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):  # (time, batch)
        h, _ = self.rnn(self.emb(tokens))
        return self.out(h)


def get_model(vocab=20000, hidden=1024, batch=256):
    torch.manual_seed(0)
    return LM(vocab, hidden)


def get_example_inputs(vocab=20000, hidden=1024, batch=256):
    torch.manual_seed(1)
    return (torch.randint(0, vocab, (12, batch)),)


def get_loss(output, tokens):
    return nn.functional.cross_entropy(output[:-1].reshape(-1, output.size(-1)), tokens[1:].reshape(-1))
