"""Models of every shape run in worker processes. One only torch.export can capture: its
GraphModule pickles (the job file) and takes train(), so its placements are measured over
ranks and its DDP runs, instead of every measurement failing. One whose input is a dict: DDP
shards every tensor in it."""

from __future__ import annotations

import io

import pytest
import torch

from envs.runtime.distributed.measure import DistributedMeasurer
from envs.runtime.pipeline.launcher import run_training
from graphs.graph_inputs import placeholder_values
from graphs.pipeline import prepare
from tests.helpers.model_files import COUNTING_MODEL, DICT_MODEL


def _prepared(tmp_path):
    path = tmp_path / "counting.py"
    path.write_text(COUNTING_MODEL)
    prep = prepare(str(path), profile=False)
    assert prep.captured.method == "export"
    return str(path), prep


def test_an_exported_graph_pickles_and_takes_train(tmp_path):
    _, prep = _prepared(tmp_path)
    gm = prep.captured.gm
    gm.train()
    torch.save(gm, io.BytesIO())


# 8 s; an exported graph measured over ranks and its DDP stay in the default suite with nested
# inputs (test_nested_inputs_reach_the_leaf_placeholders_of_a_placement_measured_over_ranks and the
# DDP case of test_nested_inputs_reach_the_graphs_leaf_placeholders_and_the_loss_as_the_model_takes_them).
@pytest.mark.slow
def test_an_exported_models_placement_is_measured_over_ranks_and_its_ddp_runs(tmp_path):
    path, prep = _prepared(tmp_path)
    nodes = [n for n in prep.captured.graph.nodes]
    half = {n: f"cpu:{int(i >= len(nodes) // 2)}" for i, n in enumerate(nodes)}
    m = DistributedMeasurer(path, {}, "cpu:0,cpu:1", warmup=1, repeats=2, spec=prep.spec, captured=prep.captured,
                            fingerprint=prep.captured.fingerprint)
    try:
        [res] = m.measure([half])
    finally:
        m.close()
    assert res.valid, res.reason
    gm = prep.captured.gm
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(names, prep.spec.example_inputs))
    run = run_training(gm, inputs, world=2, steps=2, loss_fn=prep.spec.loss_fn, timeout_s=120)
    assert len(run.losses) == 2
    from envs.sim.pipeline_layout import Pipeline, PipelineError

    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pipe = Pipeline((tuple(compute[:len(compute) // 2]), tuple(compute[len(compute) // 2:])), ("cpu:0", "cpu:1"), 2,
                    "1f1b")
    # torch.export writes the counter back at the graph's end (copy_ into the buffer): any cut
    # leaves the update in stage 1 and the buffer in stage 0, where it would land on a copy.
    with pytest.raises(PipelineError, match="updates 'calls' in place, but stage 0 holds it"):
        run_training(gm, inputs, pipe, steps=2, loss_fn=prep.spec.loss_fn, timeout_s=120)


@pytest.mark.parametrize("pipelined", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["DDP", "2-stage pipeline"])
def test_a_model_whose_input_is_a_dict_runs_as_ddp_or_a_pipeline_like_one_process(tmp_path, pipelined):
    import copy

    path = tmp_path / "tied.py"
    path.write_text(DICT_MODEL)
    prep = prepare(str(path), profile=False)
    gm = prep.captured.gm
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(names, prep.spec.example_inputs))
    if pipelined:
        from envs.sim.pipeline_layout import Pipeline

        compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        cut = len(compute) // 2
        pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 2, "1f1b")
        run = run_training(gm, inputs, pipe, steps=3, loss_fn=prep.spec.loss_fn, timeout_s=120)
    else:
        run = run_training(gm, inputs, world=2, steps=3, loss_fn=prep.spec.loss_fn, timeout_s=120)
    model = copy.deepcopy(prep.spec.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for _ in range(3):
        opt.zero_grad()
        loss = prep.spec.loss_fn(model(*prep.spec.example_inputs), *prep.spec.example_inputs)
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
    assert run.losses == pytest.approx(expected, rel=1e-5)


NESTED_MODEL = """
import torch
from torch import nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.heads = nn.ModuleDict({"cls": nn.Linear(32, 3), "reg": nn.Linear(32, 1)})

    def forward(self, views, task="cls"):
        a, b = views
        # a head chosen by name: torch.fx cannot index by a Proxy; torch.export bakes "cls",
        # flattens the pair, and keeps the unused "reg" head's parameters
        return self.heads[task](torch.cat([self.enc(a), self.enc(b)], -1))


def get_model():
    torch.manual_seed(0)
    return Pair()


def get_example_inputs():
    torch.manual_seed(1)
    return ((torch.randn(8, 8), torch.randn(8, 8)), "cls", torch.randint(0, 3, (8,)))


def get_loss(out, views, task, y):
    return nn.functional.cross_entropy(out, y)
"""


@pytest.mark.parametrize("pipelined", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["DDP", "2-stage pipeline"])
def test_nested_inputs_reach_the_graphs_leaf_placeholders_and_the_loss_as_the_model_takes_them(tmp_path, pipelined):
    """torch.export's graph takes the pair as two placeholders: paired with the top-level inputs,
    the pair reached an op whole and the last stage's loss missed an input (KeyError 'target');
    DDP waited for the unused head's gradients ("Expected to have finished reduction")."""
    import copy

    path = tmp_path / "pair.py"
    path.write_text(NESTED_MODEL)
    prep = prepare(str(path), profile=False)
    gm, spec = prep.captured.gm, prep.spec
    assert prep.captured.method == "export"
    inputs = placeholder_values(gm, spec.example_inputs)
    assert list(inputs) == ["views_0", "views_1", "task", "target"]
    if pipelined:
        from envs.sim.pipeline_layout import Pipeline

        compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        cut = len(compute) // 2
        pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe")
        run = run_training(gm, inputs, pipe, steps=2, loss_fn=spec.loss_fn, timeout_s=120)
    else:
        run = run_training(gm, inputs, world=2, steps=2, loss_fn=spec.loss_fn, timeout_s=120)
    model = copy.deepcopy(spec.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # run_training's default optimizer
    expected = []
    for _ in range(2):
        opt.zero_grad()
        loss = spec.loss_fn(model(*spec.example_inputs), *spec.example_inputs)
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
    assert run.losses == pytest.approx(expected, rel=1e-5)


def test_nested_inputs_reach_the_leaf_placeholders_of_a_placement_measured_over_ranks(tmp_path):
    path = tmp_path / "pair.py"
    path.write_text(NESTED_MODEL)
    prep = prepare(str(path), profile=False)
    nodes = list(prep.captured.graph.nodes)
    half = {n: f"cpu:{int(i >= len(nodes) // 2)}" for i, n in enumerate(nodes)}
    m = DistributedMeasurer(str(path), {}, "cpu:0,cpu:1", warmup=1, repeats=2, spec=prep.spec,
                            captured=prep.captured, fingerprint=prep.captured.fingerprint)
    try:
        [res] = m.measure([half])
    finally:
        m.close()
    # it failed with "aten::linear() Expected a value of type 'Tensor' ... found type 'tuple'"
    assert res.valid, res.reason
