"""``placer apply`` on pipelined placements: run through torch.distributed.pipelining when the
stage devices are worker processes, refused in one line when the pipeline cannot run."""

from __future__ import annotations

import json

import pytest

from envs.sim.pipeline_layout import Pipeline
from graphs.capture import capture
from graphs.pipeline import load_source
from placer.cli.main import main
from placer.placement_file import Placement, save_placement
from tests.helpers.model_files import CHAIN_MLP

MODEL = CHAIN_MLP


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
    assert "pipelined (2 stages, 1f1b, M=4); run by torch.distributed.pipelining, in 2 processes" in out
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


@pytest.mark.slow  # 4 processes, 15 s; the runtime's hybrid test and apply's two-process pipeline stay in the suite
def test_apply_runs_a_pipeline_x_ddp_hybrid_over_four_worker_processes_with_the_unpipelined_losses(
        model_file, tmp_path, capsys):
    """2 stages x 2 replicas: each replica on half the batch, gradients averaged per stage;
    the same losses as the placement's steps un-pipelined in one process on the whole batch."""
    path = _pipelined(model_file, tmp_path / "placement.json", devices=("cpu:0", "cpu:1"), microbatches=2,
                      replicas=(("cpu:2", "cpu:3"),))
    assert main(["apply", str(model_file), str(path), "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "devices: replica 0: cpu:0 (stage 0), cpu:1 (stage 1); replica 1: cpu:2 (stage 0), cpu:3 (stage 1)" in out
    assert "pipelined (2 stages x 2 replicas, 1f1b, M=2): each replica on 1/2 of the batch" in out
    assert "in 4 processes" in out
    hybrid = [float(x) for x in out.split("losses: ")[1].split("\n")[0].removeprefix("first ").split(", last ")]
    sim = _pipelined(model_file, tmp_path / "sim.json", devices=("gpu0", "gpu1"), microbatches=2,
                     replicas=(("gpu2", "gpu3"),), simulated=True)
    assert main(["apply", str(model_file), str(sim), "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "the placement, pipelined (2 stages x 2 replicas, 1f1b, M=2), is not run as one" in out
    plain = [float(x) for x in out.split("losses: ")[1].split("\n")[0].removeprefix("first ").split(", last ")]
    assert hybrid == pytest.approx(plain, rel=1e-5)


def test_a_hybrid_whose_replicas_times_microbatches_do_not_divide_the_batch_exits_2_in_one_line(
        model_file, tmp_path, capsys):
    path = _pipelined(model_file, tmp_path / "placement.json", devices=("cpu:0", "cpu:1"), microbatches=3,
                      schedule="gpipe", replicas=(("cpu:2", "cpu:3"),))
    assert main(["apply", str(model_file), str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 replicas x 3 micro-batches do not divide the batch of 8" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_pipeline_over_simulated_devices_runs_unpipelined_and_says_so(model_file, tmp_path, capsys):
    path = _pipelined(model_file, tmp_path / "placement.json", devices=("gpu0", "gpu1"), simulated=True)
    doc = json.loads(path.read_text())
    assert doc["pipeline"]["devices"] == ["gpu0", "gpu1"]
    assert main(["apply", str(model_file), str(path), "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "the placement, pipelined (2 stages, 1f1b, M=4), is not run as one: its devices (gpu0, gpu1) are a " \
           "simulated cluster's" in out
    assert "step time: median" in out


def test_apply_runs_an_unpipelined_placement_over_worker_processes_as_optimize_measured_it(model_file, tmp_path,
                                                                                            capsys):
    """It ran in apply's own process with torch's default threads, calling the ranks virtual
    devices, at a time 5-40x off optimize's measurement (walkthrough)."""
    spec = load_source(str(model_file), {})
    captured = capture(spec.model, spec.example_inputs, name=spec.name)
    ops = list(captured.graph.nodes)
    cut = len(ops) // 2
    assignment = {op: ("cpu:0" if i < cut else "cpu:1") for i, op in enumerate(ops)}
    path = tmp_path / "placement.json"
    save_placement(Placement(assignment, captured.fingerprint, ["cpu:0", "cpu:1"], {"simulated_cluster": False}), path)
    assert main(["apply", str(model_file), str(path), "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "devices: cpu:0, cpu:1" in out
    assert "un-pipelined over 2 worker processes (1 thread each), as optimize measured it" in out
    ranks = out.split("losses: ")[1].split("\n")[0]
    # The same steps in one process (the placement over simulated devices) give the same losses.
    sim = _pipelined(model_file, tmp_path / "sim.json", devices=("gpu0", "gpu1"), simulated=True)
    assert main(["apply", str(model_file), str(sim), "--steps", "2", "--warmup", "1"]) == 0
    assert capsys.readouterr().out.split("losses: ")[1].split("\n")[0] == ranks
