"""forward(input_ids, attention_mask=None, token_type_ids=None, **kwargs) with a dict batch that
leaves token_type_ids out and carries keys forward does not name ('labels', 'idx'), as a Hugging
Face-style dataset gives them (benchmarks/results/model_styles.md, "Fifth round"). Refused before
(`552f541`): 'labels' and 'idx' are now the loss's targets, with a warning that they do not reach
forward's **kwargs.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, words=800, width=64):
        super().__init__()
        self.emb = nn.Embedding(words, width)
        self.typ = nn.Embedding(2, width)
        self.enc = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        h = self.emb(input_ids)
        if token_type_ids is not None:
            h = h + self.typ(token_type_ids)
        h = torch.tanh(self.enc(h))
        if attention_mask is None:
            return self.head(h.mean(1))
        mask = attention_mask[..., None].to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    ids = torch.randint(0, 800, (16, 20))
    mask = torch.ones(16, 20, dtype=torch.long)
    mask[:, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (16,)), "idx": torch.arange(16)}


def get_loss(out, input_ids, attention_mask, token_type_ids, labels, idx):
    return F.cross_entropy(out, labels)
