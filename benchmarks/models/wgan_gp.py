"""A WGAN-GP critic: get_loss penalises the gradient of the output by the input
(torch.autograd.grad with create_graph; benchmarks/results/model_styles.md, "Fifth round"). It runs
in one process and as DDP; a placement or pipeline over worker processes cuts the graph the loss
differentiates through, and since `0bc9818` says so. Over `cpu:0,cpu:1` a placement that keeps the
whole model on one worker runs too (before the twenty-eighth round's fix even that one did not, and
placer recommended DDP at 5.19 ms where one process ran the step in 1.25 ms).
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
