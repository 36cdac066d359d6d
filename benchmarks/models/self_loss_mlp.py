"""An MLP that computes its own loss from labels among its inputs and returns
{"logits": ..., "loss": ...}, as Hugging Face models do (benchmarks/results/model_styles.md,
"Fourth round"). Without get_loss the step trains on that "loss" (graphs.model_file.default_loss);
before, on the mean of the logits.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    def forward(self, x, labels=None):
        logits = self.body(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out

def get_model():
    torch.manual_seed(0)
    return Net()

def get_example_inputs():
    torch.manual_seed(1)
    return {"x": torch.randn(64, 32), "labels": torch.randint(0, 8, (64,))}
