"""Two views of a sample as one nested input, and a head chosen by name from an ``nn.ModuleDict``
(batch 64; benchmarks/results/model_styles.md). torch.fx cannot index the dict by a Proxy, so
torch.export captures it: its graph takes the pair as two placeholders (graphs.graph_inputs) and
keeps the unchosen head, so DDP over processes needs ``find_unused_parameters``.
"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256))
        self.heads = nn.ModuleDict({"cls": nn.Linear(512, 10), "reg": nn.Linear(512, 1)})

    def forward(self, views, task="cls"):
        a, b = views
        return self.heads[task](torch.cat([self.enc(a), self.enc(b)], -1))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return ((torch.randn(64, 32), torch.randn(64, 32)), "cls", torch.randint(0, 10, (64,)))


def get_loss(out, views, task, labels):
    return nn.functional.cross_entropy(out, labels)
