"""Models whose eval mode runs other ops than their training mode, for the eval-mode tests."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth as vision models write it: the identity in eval mode."""
    if p == 0.0 or not training:
        return x
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * mask / (1 - p)


class StochasticDepth(nn.Module):
    """Residual blocks that drop their branch at random in training mode, then BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + drop_path(torch.relu(block(x)), 0.5, self.training)
        return self.head(self.norm(x))
