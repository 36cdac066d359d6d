"""A loss that differentiates through the model cannot run where a stage boundary cuts the graph
(envs.runtime.gradient_reach.loss_of_a_cut_output): it says so instead of autograd's own words."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from envs.runtime.gradient_reach import loss_of_a_cut_output


def _gradient_penalty(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return out.mean() + ((g.norm(dim=1) - 1) ** 2).mean()


def test_a_gradient_penalty_on_a_cut_output_names_the_cut_and_what_runs_it():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 4, requires_grad=True)
    out = critic(x)
    whole = loss_of_a_cut_output(_gradient_penalty, out, (x,))  # the graph intact: it runs
    whole.backward()
    assert critic[0].weight.grad is not None
    cut = out.detach().requires_grad_()  # what the last stage receives
    with pytest.raises(RuntimeError, match=r"^the loss differentiates through the model .* expected DDP .* or a "
                                           r"placement in one process \(autograd: The differentiated Tensor"):
        loss_of_a_cut_output(_gradient_penalty, cut, (x,))


def test_other_errors_of_the_loss_pass_through_unchanged():
    def broken(out, y):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        loss_of_a_cut_output(broken, torch.zeros(2), (torch.zeros(2),))
