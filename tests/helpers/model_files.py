"""Small model files (the model-file contract of graphs.model_file) that tests write to disk."""

from __future__ import annotations

import textwrap

#: Two parallel branches after an encoder: a model whose placement can put the branches apart.
BRANCHING_NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
            self.left = nn.Linear(64, 64)
            self.right = nn.Linear(64, 64)
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            h = self.encoder(x)
            return self.head(torch.cat([torch.tanh(self.left(h)), torch.relu(self.right(h))], dim=1))


    def get_model():
        torch.manual_seed(0)
        return Net()


    def get_example_inputs():
        torch.manual_seed(1)
        return (torch.randn(16, 32),)
    """
)

#: A five-layer MLP chain (batch 8): the smallest model a 2-stage pipeline can split.
CHAIN_MLP = textwrap.dedent("""
    import torch

    def get_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                   torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def get_example_inputs():
        torch.manual_seed(1)
        return (torch.randn(8, 16),)
    """)


#: A two-layer MLP on a batch of 4: the quickest model optimize runs end to end.
TINY_MLP = (
    "import torch\n"
    "def get_model():\n"
    "    torch.manual_seed(0)\n"
    "    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))\n"
    "def get_example_inputs():\n"
    "    return (torch.randn(4, 8),)\n"
)

#: A small convolution net without BatchNorm: 4 data-parallel replicas of 8 samples each compute
#: the full batch's gradients, and on 4xV100-nvlink DDP is its fastest layout.
SMALL_CNN = textwrap.dedent(
    """
    import torch
    from torch import nn


    def get_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


    def get_example_inputs():
        torch.manual_seed(0)
        return (torch.randn(32, 3, 32, 32),)
    """
)

#: A model only torch.export captures (it reassigns a buffer), with a loss that needs the output as
#: the model returns it (a tensor method, not a flat tuple).
COUNTING_MODEL = """
import torch
from torch import nn


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.inner = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        self.calls = self.calls + 1  # a reassigned buffer: fx loses it, torch.export keeps it
        return self.head(torch.relu(self.inner(x)))


def get_model():
    torch.manual_seed(0)
    return Counting()


def get_example_inputs():
    torch.manual_seed(0)
    return (torch.randn(8, 8),)


def get_loss(out, x):
    return out.pow(2).mean()  # a tensor method: the output must reach it as the model returns it
"""

#: A language model whose input is a dict and whose head's weight is the embedding's, under
#: another name (out.weight = emb.weight).
DICT_MODEL = """
import torch
from torch import nn
import torch.nn.functional as F


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, batch):
        h = self.emb(batch["ids"])
        return {"logits": self.out(h + F.gelu(self.proj(h)))}


def get_model():
    torch.manual_seed(0)
    return TiedLM()


def get_example_inputs():
    g = torch.Generator().manual_seed(1)
    return ({"ids": torch.randint(0, 50, (4, 6), generator=g), "targets": torch.randint(0, 50, (4, 6), generator=g)},)


def get_loss(output, batch):
    return F.cross_entropy(output["logits"].reshape(-1, 50), batch["targets"].reshape(-1))
"""


#: Two 2048-wide layers, 16 MiB of weights: a model whose check (two copies with gradients and
#: Adam's moments, ~130 MiB) does not fit a few tens of MiB of host memory.
WIDE_MLP = textwrap.dedent("""
    import torch

    def get_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048))

    def get_example_inputs():
        return (torch.randn(4, 2048),)
    """)

# A custom autograd Function, which only a leaf module keeps (torch.fx cannot trace the
# no_grad region around it, torch.export would replace its backward): the model cannot be
# captured at all without ``--leaf Scaled``.
FUNCTION_MODEL = textwrap.dedent("""
    import torch
    from torch import nn


    class Halve(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 0.5

        @staticmethod
        def backward(ctx, g):
            return g * 0.5


    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            with torch.no_grad():
                self.calls += 1
            return Halve.apply(x)


    def get_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), Scaled(), nn.Tanh(), nn.Linear(16, 2))


    def get_example_inputs():
        return (torch.randn(4, 16),)
    """)
