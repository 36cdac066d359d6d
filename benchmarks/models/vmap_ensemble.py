"""A model ensemble run with torch.func, as PyTorch's model-ensembling tutorial does: the members'
parameters stacked (stack_module_state) as parameters of the model, a template member kept on
meta, and vmap over functional_call in forward (benchmarks/results/model_styles.md, "Eighth
round"). Before the twenty-ninth round: simulated, a traceback after the search ("Cannot copy out
of meta tensor"); over `cpu:0,cpu:1` the one-process reference, DDP and every pipeline failed, and
the check after them raised "backward() called inside a functorch transform" (a pipeline probe that
failed inside the inlined vmap left functorch's stack one level deep). `1dcffe6`, `b591985`, `4bcb620`.
"""
import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class Ensemble(nn.Module):
    def __init__(self, members=4):
        super().__init__()
        torch.manual_seed(0)
        nets = [nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)) for _ in range(members)]
        params, _ = stack_module_state(nets)
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in params.items()})
        self.names = list(params)
        self.base = copy.deepcopy(nets[0]).to("meta")
    def forward(self, x):
        stacked = {n: self.params[n.replace(".", "_")] for n in self.names}
        def one(p, x):
            return functional_call(self.base, p, (x,))
        return vmap(one, in_dims=(0, None))(stacked, x).mean(0)


def get_model():
    return Ensemble()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(32, 16), torch.randint(0, 3, (32,)))


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y)
