"""prepare(): model source → capture → profile → group, and the 1,000-node speed requirement."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from torch import nn

from graphs.capture import capture
from graphs.errors import ModelFileError
from graphs.model_file import ModelSpec
from graphs.pipeline import load_source, prepare

needs_grouping = pytest.mark.skipif(importlib.util.find_spec("graphs.grouping") is None,
                                    reason="graphs.grouping (issue 2, grouping half) not there yet")


class Deep(nn.Module):
    """Residual MLP: 3 nodes per layer, so 333 layers give a ~1,000-node graph."""

    def __init__(self, layers: int = 333, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x)) + x
        return x


def test_load_source_forms(tmp_path):
    spec = ModelSpec(model=nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),))
    assert load_source(spec) is spec
    with pytest.raises(ModelFileError, match="already built"):
        load_source(spec, {"size": "paper"})
    with pytest.raises(ModelFileError, match="expected a model file path"):
        load_source(42)
    with pytest.raises(ModelFileError, match="unknown zoo model 'nope'"):
        load_source("zoo:nope")
    zoo = load_source("zoo:rnnlm", {"size": "small"})
    assert zoo.name == "rnnlm" and isinstance(zoo.model, nn.Module)


@needs_grouping
def test_prepare_spec_without_profile():
    spec = ModelSpec(model=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                     example_inputs=(torch.randn(3, 4),), name="mlp")
    prep = prepare(spec, profile=False)
    assert prep.spec is spec and prep.captured.graph.graph["name"] == "mlp"
    assert set(prep.grouping.op_to_group) == set(prep.captured.graph.nodes)
    assert prep.captured.graph.graph["profiled_kinds"] == []
    assert {"load", "capture", "group"} <= set(prep.seconds)


@needs_grouping
def test_prepare_zoo_with_profile(tmp_path):
    prep = prepare("zoo:rnnlm", model_args={"size": "small"}, devices=["cpu"], cache_dir=tmp_path)
    g = prep.captured.graph
    assert g.graph["profiled_kinds"] == ["cpu"]
    assert all("cpu" in d["time"] for _, d in g.nodes(data=True))
    assert sum(d["time"]["cpu"] for _, d in g.nodes(data=True)) > 0


@pytest.mark.slow  # a wall-clock bound: benchmarks/bench_capture.py --scale times it
def test_capture_of_1000_nodes_is_fast():
    model = Deep()
    start = time.perf_counter()
    cap = capture(model, (torch.randn(8, 32),))
    seconds = time.perf_counter() - start
    assert cap.graph.number_of_nodes() >= 1000
    assert seconds < 30, f"capture of {cap.graph.number_of_nodes()} nodes took {seconds:.1f} s"


@pytest.mark.slow
@needs_grouping
def test_capture_and_profile_of_1000_nodes_under_a_minute(tmp_path):
    spec = ModelSpec(model=Deep(), example_inputs=(torch.randn(8, 32),), name="deep")
    start = time.perf_counter()
    prep = prepare(spec, devices=["cpu"], cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    assert prep.captured.graph.number_of_nodes() >= 1000
    assert seconds < 60, f"capture + profile + group took {seconds:.1f} s ({prep.seconds})"
