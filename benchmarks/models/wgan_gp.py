"""A WGAN-GP critic: get_loss penalises the gradient of the output by the input
(torch.autograd.grad with create_graph; benchmarks/results/model_styles.md, "Fifth round"). It runs
in one process and as DDP; a placement or pipeline over worker processes that cut the graph the
loss differentiates through could not run. Since the twenty-ninth round the capture finds that such
a loss differentiates through the model (graphs.loss_reach) and keeps the model one group: over
`cpu:0,cpu:1` every placement measured runs (0 invalid of 6; before, 10 of 16 invalid) and no pipeline
is tried (before, 4 of 4 failed).
"""
import torch
from torch import nn


def get_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256), nn.LeakyReLU(0.2),
                         nn.Linear(256, 1))


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(64, 64).requires_grad_(), torch.randn(64, 1).sign())


def get_loss(out, x, sign):
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (out * sign).mean() + 10 * ((grad.norm(dim=1) - 1) ** 2).mean()
