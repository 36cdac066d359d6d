"""Cached profiles are keyed by what the ops compute, not by the graph's shape alone."""

import torch
from torch import nn

from graphs.capture import capture
from graphs.fingerprint import computation_key


def _key(model: nn.Module, inputs: tuple) -> tuple[str, str]:
    cap = capture(model, inputs, name="m")
    return cap.fingerprint, computation_key(cap.gm)


def test_a_sparse_embedding_or_a_frozen_layer_changes_the_profile_key_not_the_fingerprint():
    idx = torch.randint(0, 100, (4, 3))

    def model(sparse: bool = False, frozen: bool = False) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.EmbeddingBag(100, 8, sparse=sparse), nn.Linear(8, 2))
        m[1].requires_grad_(not frozen)
        return m

    dense, sparse, frozen = _key(model(), (idx,)), _key(model(sparse=True), (idx,)), _key(model(frozen=True), (idx,))
    assert dense[0] == sparse[0] == frozen[0]  # the same nodes: a placement fits all three
    assert len({dense[1], sparse[1], frozen[1]}) == 3
    assert _key(model(), (idx,)) == dense  # and stable


def test_a_constant_argument_changes_the_profile_key():
    class Scaled(nn.Module):
        def __init__(self, k: int):
            super().__init__()
            self.lin, self.k = nn.Linear(8, 8), k

        def forward(self, x):
            return nn.functional.avg_pool1d(self.lin(x).unsqueeze(1), self.k).sum()

    x = torch.randn(2, 8)
    assert _key(Scaled(2), (x,))[1] != _key(Scaled(4), (x,))[1]
