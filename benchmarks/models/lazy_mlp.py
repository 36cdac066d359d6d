"""An MLP of lazy modules (``nn.LazyLinear``): its weights get their shapes from the first batch
(benchmarks/results/model_styles.md, "Fourth round"). placer runs the model once on the example
inputs, in eval mode, before anything reads its parameters (``graphs.lazy_modules``); before, every
command stopped with a traceback: "Attempted to use an uninitialized parameter".
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LazyLinear(256)
        self.b = nn.LazyLinear(256)
        self.c = nn.LazyLinear(10)
    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))

def get_model():
    torch.manual_seed(0)
    return Net()

def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(64, 300), torch.randint(0, 10, (64,)))

def get_loss(out, x, y):
    return F.cross_entropy(out, y)
