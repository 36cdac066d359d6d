"""``placer apply`` on pipelined placements: run through torch.distributed.pipelining when the
stage devices are worker processes, refused in one line when the pipeline cannot run."""

from __future__ import annotations

import json
import textwrap

import pytest

from envs.sim.pipeline import Pipeline
from graphs.capture import capture
from graphs.pipeline import load_source
from placer.cli.main import main
from placer.placement_file import Placement, save_placement

MODEL = textwrap.dedent("""
    import torch

    def get_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                   torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def get_example_inputs():
        torch.manual_seed(1)
        return (torch.randn(8, 16),)
    """)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "chain.py"
    path.write_text(MODEL)
    return path


def _pipelined(model_file, path, devices=("cpu:0", "cpu:1"), microbatches=4, schedule="1f1b", replicas=(),
               simulated=False):
    spec = load_source(str(model_file), {})
    captured = capture(spec.model, spec.example_inputs, name=spec.name)
    ops = list(captured.graph.nodes)
    cut = len(ops) // 2
    stages = (tuple(ops[:cut]), tuple(ops[cut:]))
    pipe = Pipeline(stages, tuple(devices), microbatches, schedule, replicas)
    all_devices = [*devices, *(d for r in replicas for d in r)]
    meta = {"simulated_cluster": simulated}
    if simulated:
        meta["real_devices"] = {d: "cpu" for d in all_devices}
    save_placement(Placement(pipe.assignment(), captured.fingerprint, all_devices, meta, pipeline=pipe), path)
    return path


def test_apply_runs_a_two_stage_pipeline_over_worker_processes_and_prints_its_step_time(model_file, tmp_path, capsys):
    path = _pipelined(model_file, tmp_path / "placement.json")
    assert main(["apply", str(model_file), str(path), "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "devices: cpu:0 (stage 0), cpu:1 (stage 1)" in out
    assert "pipelined: 2 stages, 4 micro-batches, 1f1b, run by torch.distributed.pipelining in 2 processes" in out
    assert "step time: median" in out and "(measured)" in out
    pipelined = out.split("losses: ")[1].split("\n")[0]
    # The same steps un-pipelined in one process (the placement over simulated devices) give
    # the same losses: the micro-batches' mean loss is the full batch's.
    sim = _pipelined(model_file, tmp_path / "sim.json", devices=("gpu0", "gpu1"), simulated=True)
    assert main(["apply", str(model_file), str(sim), "--steps", "2", "--warmup", "1"]) == 0
    assert capsys.readouterr().out.split("losses: ")[1].split("\n")[0] == pipelined
    first, last = (float(x) for x in pipelined.removeprefix("first ").split(", last "))
    assert first > 0 and last < first  # SGD on a fixed batch: the loss goes down


def test_a_pipeline_whose_microbatches_do_not_divide_the_batch_exits_2_in_one_line(model_file, tmp_path, capsys):
    path = _pipelined(model_file, tmp_path / "placement.json", microbatches=3, schedule="gpipe")
    assert main(["apply", str(model_file), str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "3 micro-batches do not divide the batch of 8" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_pipeline_x_ddp_hybrid_is_refused_in_one_line_saying_what_to_do(model_file, tmp_path, capsys):
    path = _pipelined(model_file, tmp_path / "placement.json", devices=("cpu:0", "cpu:1"), microbatches=2,
                      replicas=(("cpu:2", "cpu:3"),))
    assert main(["apply", str(model_file), str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pipeline x DDP hybrid (2 replicas of a 2-stage pipeline)" in err
    assert 'delete the pipeline\'s "replicas" field' in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_pipeline_over_simulated_devices_runs_unpipelined_and_says_so(model_file, tmp_path, capsys):
    path = _pipelined(model_file, tmp_path / "placement.json", devices=("gpu0", "gpu1"), simulated=True)
    doc = json.loads(path.read_text())
    assert doc["pipeline"]["devices"] == ["gpu0", "gpu1"]
    assert main(["apply", str(model_file), str(path), "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "the pipeline (2 stages, M=4, 1f1b) is not run as one: its devices ['gpu0', 'gpu1'] are a simulated " \
           "cluster's" in out
    assert "step time: median" in out


def test_the_pipeline_runtime_refuses_a_hybrid_before_starting_any_process(model_file):
    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline import PipelineError

    spec = load_source(str(model_file), {})
    captured = capture(spec.model, spec.example_inputs, name=spec.name)
    ops = list(captured.graph.nodes)
    pipe = Pipeline((tuple(ops[:2]), tuple(ops[2:])), ("cpu:0", "cpu:1"), 2, "gpipe", (("cpu:2", "cpu:3"),))
    names = [n.name for n in captured.gm.graph.nodes if n.op == "placeholder"]
    with pytest.raises(PipelineError, match=r"a pipeline x DDP hybrid \(2 replicas\) is not run by this runtime"):
        run_training(captured.gm, dict(zip(names, spec.example_inputs)), pipe, loss_fn=spec.loss_fn)
