"""A CLIP-style contrastive pair: an image and a text MLP, a learnable temperature, logits of every
image against every text of the batch (width 512, batch 128; model arguments ``width``, ``batch``;
benchmarks/results/model_styles.md). Its forward takes the two inputs only; the loss builds its
labels from the batch. DDP and micro-batches change
what it computes (each part sees the pairs within it): the check names the ``matmul`` that pairs them.
"""
import torch
import torch.nn.functional as F
from torch import nn


def mlp(inputs, width, out):
    return nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, out))


class Clip(nn.Module):
    def __init__(self, width=512):
        super().__init__()
        self.image = mlp(256, width, 128)
        self.text = mlp(64, width, 128)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def forward(self, img, txt):
        a = F.normalize(self.image(img), dim=-1)
        b = F.normalize(self.text(txt), dim=-1)
        return self.logit_scale.exp() * a @ b.t()


def get_model(width=512):
    torch.manual_seed(0)
    return Clip(width)


def get_example_inputs(batch=128):
    torch.manual_seed(1)
    return (torch.randn(batch, 256), torch.randn(batch, 64))


def get_loss(logits, img, txt):
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
