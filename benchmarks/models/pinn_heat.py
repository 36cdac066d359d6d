"""A physics-informed network: the residual u_t - 0.1 u_xx of the heat equation, its derivatives
taken by torch.autograd.grad in forward (benchmarks/results/model_styles.md, "Fourth round"). What
a grad differentiates is one group and one stage (graphs.ops.differentiated_regions); measured
over two processes, before: 10 of 16 placements failed ("The differentiated Tensor ... appears to
not have been used in the graph"), both pipelines failed and DDP stalled on the output bias, which
gets no gradient.
"""
import torch
from torch import nn


class PINN(nn.Module):
    """u(x, t) with the residual of the heat equation u_t - 0.1 u_xx, by autograd in forward."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    def forward(self, xt):
        xt = xt.requires_grad_(True)
        u = self.net(xt)
        du = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
        u_x, u_t = du[:, :1], du[:, 1:]
        u_xx = torch.autograd.grad(u_x.sum(), xt, create_graph=True)[0][:, :1]
        return u_t - 0.1 * u_xx

def get_model():
    torch.manual_seed(0)
    return PINN()

def get_example_inputs():
    torch.manual_seed(1)
    return (torch.rand(256, 2),)

def get_loss(residual, xt):
    return residual.pow(2).mean()
