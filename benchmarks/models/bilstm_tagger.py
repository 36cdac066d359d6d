"""A 2-layer bidirectional nn.LSTM tagger (benchmarks/results/model_styles.md, "Fifth round"). Its
profile read 50 + 345 ms for an LSTM a training step runs in 53 ms before `6aa9178`: the profile's
timed optimizer steps, undone only at the end, drove the gates into denormal floats.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, words=2000, width=128, hidden=128, tags=17):
        super().__init__()
        self.emb = nn.Embedding(words, width, padding_idx=0)
        self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, dropout=0.1, batch_first=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        return self.out(h)


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 2000, (32, 40))
    ids[:, 30:] = 0
    tags = torch.randint(0, 17, (32, 40))
    tags[:, 30:] = -100
    return (ids, tags)


def get_loss(out, ids, tags):
    return F.cross_entropy(out.reshape(-1, 17), tags.reshape(-1), ignore_index=-100)
