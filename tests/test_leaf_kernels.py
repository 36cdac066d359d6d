"""A leaf module that runs a whole block is charged a launch per kernel it dispatches, not one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from envs.hardware.loading import load_cluster
from envs.sim.cost_model import DEFAULT_ROOFLINE, roofline_parts
from graphs.capture import capture


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.rnn(self.layer(x))[0])


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return capture(_Blocks(), (torch.randn(2, 5, 32),)).graph


def test_a_transformer_layer_called_whole_counts_the_kernels_its_forward_dispatches(graph):
    # 3 addmm (the attention's in- and out-projection, the feed-forward's first), mm, 2 bmm, the
    # softmax, 2 layer norms, relu, the residual adds...: a dozen or more, not one
    assert graph.nodes["layer"]["num_ops"] >= 10


def test_layers_without_submodules_and_recurrent_modules_keep_one_launch(graph):
    """A linear is one addmm everywhere; an LSTM is one cuDNN call on a GPU, which this CPU
    build's decomposition (a dozen ops a step) does not show."""
    assert "num_ops" not in graph.nodes["head"] and "num_ops" not in graph.nodes["rnn"]


def test_the_roofline_charges_the_host_a_launch_per_kernel(graph):
    gpu = load_cluster("4xK40").devices[1]
    launch = DEFAULT_ROOFLINE[gpu.kind].launch_overhead_s
    attrs = graph.nodes["layer"]
    assert roofline_parts(attrs, gpu, DEFAULT_ROOFLINE[gpu.kind])[2] == pytest.approx(attrs["num_ops"] * launch)
