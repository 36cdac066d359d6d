"""Deep supervision from a forward hook that stores an intermediate activation on the model
(benchmarks/results/model_styles.md, "Sixth round"). Before the commit that added
graphs/stale_state.py, torch.fx baked the stored activation into the graph as a constant, the
tracers' fake tensors stayed on the model and the numerical check ended placer with a traceback.
"""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.aux = nn.Linear(64, 10)
        self.head = nn.Linear(64, 10)
        self.features = {}
        self.body[1].register_forward_hook(lambda m, i, o: self.features.__setitem__("mid", o))

    def forward(self, x):
        h = self.body(x)
        return self.head(h), self.aux(self.features["mid"])


def get_model():
    return Net()


def get_example_inputs():
    return (torch.randn(16, 32), torch.randint(0, 10, (16,)))


def get_loss(output, x, y):
    main, aux = output
    return nn.functional.cross_entropy(main, y) + 0.3 * nn.functional.cross_entropy(aux, y)
