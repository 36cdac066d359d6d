"""The numerical check of an applied placement catches a placement that changes the model."""

import copy
import random

import pytest
import torch

from envs.runtime.check import check_placement
from graphs.capture import capture
from graphs.pipeline import load_source


def _module_aligned(captured, devices, seed=0):
    rnd = random.Random(seed)
    by_module, assignment = {}, {}
    for n, d in captured.graph.nodes(data=True):
        key = d.get("module") or n
        assignment[n] = by_module.setdefault(key, rnd.choice(devices))
    return assignment


@pytest.mark.parametrize("name", ["gpt2", "rnnlm"])
def test_a_random_placement_of_a_zoo_model_computes_the_same(name):
    spec = load_source(f"zoo:{name}")
    cap = capture(spec.model, spec.example_inputs, name=name)
    report = check_placement(spec, cap, _module_aligned(cap, ["a", "b", "c"]), real_devices={"a": "cpu", "b": "cpu", "c": "cpu"})
    assert report.ok, report.describe()
    assert report.compared_grads == sum(1 for p in spec.model.parameters() if p.requires_grad)


def test_a_changed_model_is_reported_as_different():
    spec = load_source("zoo:gpt2")
    cap = capture(spec.model, spec.example_inputs, name="gpt2")
    object.__setattr__(cap, "gm", copy.deepcopy(cap.gm))  # the gm shares weights with the model: unshare
    with torch.no_grad():  # other weights (a random change: a constant shift would cancel in LayerNorm)
        for p in cap.gm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
            break
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert not report.ok
    assert "DIFFERENT" in report.describe()
