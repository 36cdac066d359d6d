"""Models whose forward takes keyword inputs (a Hugging Face style ``model(**batch)``), for the integration tests."""

from __future__ import annotations

import torch


class Masked(torch.nn.Module):
    """``forward(x, past=None, mask=None)``: a batch ``{"x": ..., "mask": ...}`` leaves ``past`` at its default."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)

    def forward(self, x, past=None, mask=None):
        return self.b(torch.relu(self.a(x)) * mask)
