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


@pytest.mark.parametrize("pipelined", [False, True], ids=["DDP", "2-stage pipeline"])
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
