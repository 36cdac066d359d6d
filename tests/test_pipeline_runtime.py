"""Pipelined placements on torch.distributed.pipelining (envs.runtime.pipeline): same numbers as the unsplit model.

Each test starts 2-4 gloo processes on 127.0.0.1 (a few seconds each on this machine).
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from envs.runtime.pipeline.launcher import PipelineJob, PipelineRunError, run_training
from envs.runtime.pipeline.stages import split_stages
from envs.sim.pipeline_layout import Pipeline, PipelineError
from tests.helpers.runtime_models import B, Chain, D, Skip, model_and_batch, sequence_first_batch, stages_of


def reference(gm, batch, steps=3):
    model = copy.deepcopy(gm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], None
    for step in range(steps):
        opt.zero_grad()
        loss = model(batch["x"], batch["y"])
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(float(loss.detach()))
        opt.step()
    return losses, grads, dict(model.named_parameters())


def assert_same(run, ref):
    losses, grads, params = ref
    assert run.losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert set(run.grads) == set(grads)
    for n in grads:
        torch.testing.assert_close(run.grads[n], grads[n], rtol=1e-5, atol=1e-7)
    for n in params:
        torch.testing.assert_close(run.params[n], params[n].detach(), rtol=1e-5, atol=1e-6)


SGD = ("sgd", {"lr": 0.1, "momentum": 0.9})


class SparseFeatures(nn.Module):
    """A bag of features per sample as a sparse COO (batch, vocabulary) tensor (torch.sparse.mm)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(50, D) * 0.1)
        self.head = nn.Linear(D, 5)

    def forward(self, x, y):
        return F.cross_entropy(self.head(torch.relu(torch.sparse.mm(x, self.proj))), y)


def sparse_features_batch():
    g = torch.Generator().manual_seed(1)
    rows = torch.arange(B).repeat_interleave(3)
    x = torch.sparse_coo_tensor(torch.stack([rows, torch.randint(0, 50, (3 * B,), generator=g)]),
                                torch.rand(3 * B, generator=g), (B, 50)).coalesce()
    return {"x": x, "y": torch.randint(0, 5, (B,), generator=g)}


@pytest.mark.parametrize("layout", ["pipeline", pytest.param("ddp", marks=pytest.mark.slow),
                                    pytest.param("hybrid", marks=pytest.mark.slow)])
def test_a_sparse_input_is_cut_into_micro_batches_and_replicas_as_dense_ones_are(layout):
    """torch.distributed.pipelining cuts inputs with tensor_split, which has no sparse kernel (the
    rank crashed: "Could not run 'aten::as_strided' with arguments from the 'SparseCPU' backend"):
    the schedule hands a sparse input whole and each stage takes its micro-batch's rows; DDP's
    replicas, and a hybrid's, take their share by the same cut."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(SparseFeatures())
    batch = sparse_features_batch()
    replicas = (("cpu:2", "cpu:3"),) if layout == "hybrid" else ()
    pipe = Pipeline(stages_of(gm, {"head"}), ("cpu:0", "cpu:1"), 2 if replicas else 4, "1f1b", replicas)
    run = run_training(gm, batch, None if layout == "ddp" else pipe, world=2 if layout == "ddp" else None, steps=3,
                       optimizer=SGD, timeout_s=120)
    assert_same(run, reference(gm, batch))


@pytest.mark.parametrize("cls, schedule, cuts", [
    (Chain, "gpipe", {"l3"}),
    pytest.param(Skip, "1f1b", {"l2"}, marks=pytest.mark.slow),
])
def test_two_stage_pipeline_trains_like_the_unsplit_model_on_the_full_batch(cls, schedule, cuts):
    gm, batch = model_and_batch(cls)
    pipe = Pipeline(stages_of(gm, cuts), ("cpu:0", "cpu:1"), 4, schedule)
    run = run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=120)
    assert_same(run, reference(gm, batch))
    # Each rank holds its own stage's parameters, not the whole model's (it kept them all).
    from envs.runtime.pipeline.stages import split_stages

    own = [sum(p.numel() * p.element_size() for p in spec.gm.parameters()) for spec in split_stages(gm, pipe)]
    # (less what the ranks' imports of model files another test loaded in this process hold)
    for rank in (0, 1):
        assert own[rank] <= run.held_param_bytes[rank] < own[rank] + own[1 - rank], run.held_param_bytes
    # Every rank listens (gloo; rank 0 also the store), and only on loopback.
    assert sorted(run.listening) == [0, 1] and all(run.listening.values())
    assert all(addr == "127.0.0.1" for addrs in run.listening.values() for addr in addrs)


def test_interleaved_pipeline_with_a_skip_over_three_boundaries_trains_the_same():
    gm, batch = model_and_batch(Skip)
    pipe = Pipeline(stages_of(gm, {"l2", "l3", "head"}), ("cpu:0", "cpu:1", "cpu:0", "cpu:1"), 4,
                    "interleaved_1f1b")
    specs = split_stages(gm, pipe)
    assert [s.recv for s in specs][1:] == [["relu"], ["relu", "relu_1"], ["add"]]
    assert_same(run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=120), reference(gm, batch))


class Transposed(nn.Module):
    """The value crossing the boundary is a transpose: a strided view of its storage."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(D, D), nn.Linear(2, 2), nn.Linear(D, 5)

    def forward(self, x, y):
        t = self.l1(x).view(-1, 2, D // 2).transpose(1, 2)
        u = self.l2(t).reshape(-1, D)
        return F.cross_entropy(self.head(u), y)


@pytest.mark.slow
def test_a_strided_view_crossing_a_boundary_is_sent_and_received_contiguous():
    """gloo sends and receives only contiguous tensors: the stage before sends the view
    contiguous and the stage after must receive it into a contiguous buffer (it crashed with
    "input tensor has to be contiguous" when the buffer kept the view's strides)."""
    gm, batch = model_and_batch(Transposed)
    pipe = Pipeline(stages_of(gm, {"l2"}), ("cpu:0", "cpu:1"), 2, "gpipe")
    assert_same(run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=120), reference(gm, batch))


def test_ddp_over_two_processes_trains_like_the_unsplit_model():
    gm, batch = model_and_batch(Skip)
    run = run_training(gm, batch, None, world=2, steps=3, optimizer=SGD, timeout_s=120)
    assert_same(run, reference(gm, batch))


@pytest.mark.parametrize("pipelined", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["pipeline", "ddp"])
def test_sequence_first_inputs_are_split_along_their_batch_dimension_and_train_like_the_unsplit_model(pipelined):
    gm, batch = sequence_first_batch()
    pipe = Pipeline(stages_of(gm, {"head"}), ("cpu:0", "cpu:1"), 2, "gpipe") if pipelined else None
    run = run_training(gm, batch, pipe, world=None if pipelined else 2, steps=3, optimizer=SGD, timeout_s=120,
                       batch_dim=1)
    assert_same(run, reference(gm, batch))


@pytest.mark.parametrize("cls, schedule, cuts", [
    # 4 processes each (8-20 s): the default suite trains hybrids of 2 stages x 2 replicas in
    # tests/test_replica_batch_norm.py and tests/test_frozen_parameters.py
    pytest.param(Chain, "1f1b", {"l3"}, marks=pytest.mark.slow),
    pytest.param(Skip, "gpipe", {"l2"}, marks=pytest.mark.slow),
])
def test_a_pipeline_x_ddp_hybrid_of_two_stages_by_two_replicas_trains_like_the_unsplit_model(cls, schedule, cuts):
    """4 processes: replica 0's stages on cpu:0, cpu:1 and replica 1's on cpu:2, cpu:3, each on
    half the batch in 2 micro-batches over its own process group; each stage's gradients
    averaged over its two copies: the full batch's loss, gradients and parameters, and the
    replicas' copies stay equal (tied_gap lists every parameter, each held by 2 ranks, at 0)."""
    gm, batch = model_and_batch(cls)
    pipe = Pipeline(stages_of(gm, cuts), ("cpu:0", "cpu:1"), 2, schedule, (("cpu:2", "cpu:3"),))
    run = run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=180)
    assert sorted(run.rank_cpu_times) == [0, 1, 2, 3]
    assert_same(run, reference(gm, batch))
    assert set(run.tied_gap) == {n for n, _ in gm.named_parameters()}
    assert max(run.tied_gap.values()) <= 1e-6


def test_a_hybrid_whose_replicas_times_microbatches_do_not_divide_the_batch_is_refused_before_starting():
    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 3, "gpipe", (("cpu:2", "cpu:3"),))
    with pytest.raises(PipelineError, match="2 replicas x 3 micro-batches do not divide the batch of 8"):
        run_training(gm, batch, pipe)


def test_microbatches_that_do_not_divide_the_batch_are_refused_before_starting():
    gm, batch = model_and_batch(Chain)
    with pytest.raises(PipelineError, match="3 micro-batches do not divide the batch of 8"):
        run_training(gm, batch, Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 3, "gpipe"))


def test_a_dead_stage_process_ends_the_job_naming_its_rank_and_nothing_is_left_running():
    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "1f1b")
    job = PipelineJob(gm, batch, 2, pipe, 100000, SGD, None, 1, 120.0, "127.0.0.1")
    pids = job.pids
    try:
        deadline = time.monotonic() + 90
        while not (job.ready(0) and job.ready(1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(PipelineRunError, match=r"rank 1 crashed \(signal 9, SIGKILL\)"):
            job.wait()
    finally:
        job.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_the_documented_torchrun_example_runs_a_pipelined_job_on_one_host(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from envs.runtime.pipeline.launcher import read_results, write_job

    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "1f1b")
    write_job(tmp_path, gm, batch, pipe, steps=3, optimizer=SGD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    # docs/distributed.md, "Pipelines and DDP": the same command.
    cmd = [sys.executable, "-m", "envs.runtime.torchrun", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "envs.runtime.pipeline.worker", str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same(read_results(tmp_path, 2), reference(gm, batch))


@pytest.mark.parametrize("replicas", [(), pytest.param((("cpu:2", "cpu:3"),), marks=pytest.mark.slow)],
                         ids=["one replica", "two replicas"])  # 4 processes, 18 s: hybrids are in the default suite above
def test_gpt2_with_its_embedding_tied_to_the_head_across_two_processes_trains_like_the_unsplit_model(replicas):
    """GPT-2's ``wte.weight`` is read by the embedding (stage 0) and the head (stage 1): each
    process holds a copy, their gradients are summed before the optimizer step, and the copies
    stay equal over 3 steps; loss, gradients and parameters match the unsplit model. With two
    replicas (4 processes, 2 samples each) the tied sum within each replica composes with the
    average over replicas: the four copies of ``wte.weight`` stay equal too."""
    from graphs.pipeline import prepare

    prep = prepare("zoo:gpt2", model_args={"batch_size": 4}, profile=False)
    gm = prep.captured.gm
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    batch = dict(zip(names, prep.spec.example_inputs))
    loss_fn = prep.spec.loss_fn
    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = next(i for i, n in enumerate(compute) if n.startswith("blocks_1"))
    pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 2, "1f1b", replicas)
    specs = split_stages(gm, pipe)
    assert all("wte.weight" in dict(s.gm.named_parameters()) for s in specs)

    run = run_training(gm, batch, pipe, steps=3, optimizer=SGD, loss_fn=loss_fn, timeout_s=180)

    torch.set_num_threads(1)
    model = copy.deepcopy(gm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], {}
    for step in range(3):
        opt.zero_grad()
        args = [batch[k] for k in names]
        loss = loss_fn(model(*args), *args)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(float(loss.detach()))
        opt.step()
    if replicas:  # every parameter has a copy per replica; all copies stay equal
        assert set(run.tied_gap) == set(grads) and max(run.tied_gap.values()) <= 1e-5
    else:
        assert run.tied_gap == {"wte.weight": 0.0}
    assert run.losses == pytest.approx(losses, rel=1e-5)
    assert set(run.grads) == set(grads)
    for n in grads:
        torch.testing.assert_close(run.grads[n], grads[n], rtol=1e-4, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(run.params[n], p.detach(), rtol=1e-4, atol=1e-5)


class NamesItsLabelsTarget(Chain):
    """A forward whose labels are called ``target``, as ``schedule.step(..., target=...)`` names
    the schedule's own loss target."""

    def forward(self, x, target):
        return super().forward(x, target)


@pytest.mark.slow
def test_a_model_input_named_like_a_keyword_of_the_schedule_reaches_the_stages():
    """``target`` (and ``losses``) are keywords of ``schedule.step``: handed over by name, the
    labels were taken as the schedule's target and the job failed on its first step."""
    gm, batch = model_and_batch(NamesItsLabelsTarget)
    batch = {"x": batch["x"], "target": batch["y"]}
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 2, "gpipe")
    run = run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=120)
    assert_same(run, reference(gm, {"x": batch["x"], "y": batch["target"]}))


class Sized(Chain):
    """``x.size(0)`` is computed in stage 0 and read in stage 1: an int crosses the boundary."""

    def forward(self, x, y):
        b = x.size(0)
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h)).reshape(b, 2, D // 2)
        return F.cross_entropy(self.head(h.reshape(b, D)), y)


def test_a_size_crossing_a_stage_boundary_is_rebuilt_as_a_constant_not_sent():
    gm, batch = model_and_batch(Sized)
    pipe = Pipeline(stages_of(gm, {"l2"}), ("cpu:0", "cpu:1"), 4, "gpipe")
    assert "size" in split_stages(gm, pipe)[1].recv
    assert_same(run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=120), reference(gm, batch))


class Positives(Chain):
    """Stage 1 receives the rows of h whose input starts positive: how many depends on the data."""

    def forward(self, x, y):
        h = self.l1(x)
        kept = h[x[:, 0] > 0]
        return self.head(kept).sum() + 0 * y.sum()


def positives_batch():
    """Micro-batch 0 (of 2) keeps its 4 rows, micro-batch 1 none."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Positives())
    x = torch.randn(B, D)
    x[:, 0] = torch.tensor([1.0] * (B // 2) + [-1.0] * (B // 2))
    return gm, {"x": x, "y": torch.zeros(B, dtype=torch.long)}


def test_a_stage_output_whose_shape_depends_on_the_data_is_refused_before_starting_naming_it():
    gm, batch = positives_batch()
    pipe = Pipeline(stages_of(gm, {"head"}), ("cpu:0", "cpu:1"), 2, "gpipe")
    with pytest.raises(PipelineError, match=r"stage 0 output 'getitem_1' has shape \[0, 16\] float32 on micro-batch 1 "
                                            r"but shape \[4, 16\] float32 on micro-batch 0"):
        run_training(gm, batch, pipe)


def test_the_stage_module_checks_each_sent_shape_against_the_plan():
    from envs.runtime.pipeline.stages import StageModule, boundary_metas, microbatch

    gm, batch = positives_batch()
    pipe = Pipeline(stages_of(gm, {"head"}), ("cpu:0", "cpu:1"), 2, "gpipe")
    spec = split_stages(gm, pipe)[0]
    planned = boundary_metas(gm, microbatch(batch, 0, 2), {"getitem_1"})
    stage = StageModule(spec, False, 2, ["x", "y"], planned=planned)
    assert [t.shape for t in stage(**microbatch(batch, 0, 2))] == [torch.Size([4, D])]
    with pytest.raises(PipelineError, match=r"stage 0 output 'getitem_1' has shape \[0, 16\] float32 on micro-batch 1, "
                                            r"planned shape \[4, 16\] float32"):
        stage(**microbatch(batch, 1, 2))


def test_an_unknown_schedule_is_refused_naming_the_ones_that_exist():
    gm, _ = model_and_batch(Chain)
    with pytest.raises(PipelineError, match=r"unknown pipeline schedule 'zero_bubble'; expected one of "
                                            r"\['gpipe', '1f1b', 'interleaved_1f1b'\]"):
        Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "zero_bubble")


def gpt2_on_tiny_cpus(replicas=()):
    """GPT-2 (batch 4) cut before ``blocks_1`` into a 2-stage gpipe pipeline (M=2) over
    cpu:0, cpu:1 (and ``replicas``), with a problem whose CPUs hold 16 KiB each: ``(prep,
    pipeline, problem)``."""
    from envs.hardware.cluster import Device, Link, make_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare

    prep = prepare("zoo:gpt2", model_args={"batch_size": 4}, profile=False)
    gm = prep.captured.gm
    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = next(i for i, n in enumerate(compute) if n.startswith("blocks_1"))
    pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe", replicas)
    n = 2 * (1 + len(replicas))
    tiny = [Device(f"cpu:{i}", "cpu", 2**14, 1e11, 1e10, real_device="cpu") for i in range(n)]
    links = [Link(f"cpu:{a}", f"cpu:{b}", 1e-4, 1e9) for a in range(n) for b in range(a + 1, n)]
    problem = compile_problem(prep.captured.graph, make_cluster(tiny, links, name="ranks", simulated=False))
    return prep, pipe, problem


def run_refused(prep, pipe, problem):
    gm = prep.captured.gm
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    run_training(gm, dict(zip(names, prep.spec.example_inputs)), pipe, loss_fn=prep.spec.loss_fn, problem=problem)


def test_a_stage_that_does_not_fit_its_device_is_refused_before_starting():
    prep, pipe, problem = gpt2_on_tiny_cpus()
    # Both stages overfill 16 KiB; the message names the one furthest over, stage and device.
    with pytest.raises(PipelineError, match=r"stage\(s\) \[(0|1)\] do not fit cpu:\1: they need .* GiB .* the device "
                                            r"has 0.00 GiB"):
        run_refused(prep, pipe, problem)


def test_a_hybrid_whose_stages_do_not_fit_their_devices_is_refused_before_starting():
    prep, pipe, problem = gpt2_on_tiny_cpus((("cpu:2", "cpu:3"),))
    with pytest.raises(PipelineError, match=r"the pipeline x DDP hybrid does not fit: cpu:\d needs .* GiB"):
        run_refused(prep, pipe, problem)


def test_a_rendezvous_port_in_use_is_refused_before_any_process_starts():
    import socket

    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "gpipe")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(PipelineRunError, match=f"cannot listen on 127.0.0.1:{port} for the rendezvous: "
                                                   "Address already in use"):
            run_training(gm, batch, pipe, port=port)


def test_the_distributed_measurer_measures_pipelined_placements_through_the_pipelining_engine():
    from envs.runtime.distributed.measure import DistributedMeasurer

    m = DistributedMeasurer("zoo:gpt2", {"batch_size": 4}, "cpu:0,cpu:1", warmup=1, repeats=2, timeout_s=120)
    gm = m.captured.gm
    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = next(i for i, n in enumerate(compute) if n.startswith("blocks_1"))
    stages = (tuple(compute[:cut]), tuple(compute[cut:]))
    pipe = Pipeline(stages, ("cpu:0", "cpu:1"), 2, "1f1b")
    uneven = Pipeline(stages, ("cpu:0", "cpu:1"), 3, "gpipe")
    ok, refused = m.measure_pipelines([pipe, uneven])
    assert ok.valid and len(ok.times) == 2 and 0 < ok.step_time < 60
    assert "2 worker processes (1 thread(s) each), torch.distributed.pipelining" == ok.note
    assert not refused.valid and "3 micro-batches do not divide the batch of 4" in refused.reason
    assert m.jobs == 2
    again = m.measure_pipelines([pipe])[0]
    assert again.cached and again.step_time == ok.step_time and m.jobs == 2


class CarriesItsState(nn.Module):
    """Truncated backpropagation through time: the LSTM state comes in as (layers, batch, hidden)
    beside (batch, time, features) inputs, its batch on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(D, D, num_layers=2, batch_first=True), nn.Linear(D, 5)

    def forward(self, x, h0, c0, y):
        out, (h, c) = self.rnn(x, (h0, c0))
        return F.cross_entropy(self.head(out[:, -1] + h[-1]), y)


@pytest.mark.slow
def test_a_state_input_holding_the_batch_on_another_dimension_is_cut_along_it_and_trains_like_the_unsplit_model():
    """The state's dim 0 is the layer count: passed whole, every micro-batch's LSTM refused it
    ("Expected hidden[0] size (2, 4, 16), got [2, 8, 16]") and such models' pipelines and DDP were set aside."""
    torch.manual_seed(0)
    from graphs.capture import capture

    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, 3, D, generator=g), "h0": torch.randn(2, B, D, generator=g),
             "c0": torch.randn(2, B, D, generator=g), "y": torch.randint(0, 5, (B,), generator=g)}
    gm = capture(CarriesItsState(), tuple(batch.values())).gm
    pipe = Pipeline(stages_of(gm, {"getitem_4"}), ("cpu:0", "cpu:1"), 2, "gpipe")
    run = run_training(gm, batch, pipe, steps=3, optimizer=SGD, timeout_s=120)
    model = copy.deepcopy(gm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(*batch.values())
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert run.losses == pytest.approx(losses, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(run.params[n], p.detach(), rtol=1e-5, atol=1e-6)


class _HeatResidual(nn.Module):
    """A physics-informed net: its loss is a derivative of its output by its input, so the output
    layer's bias gets no gradient though forward reads it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, xt):
        xt = xt.requires_grad_(True)
        du = torch.autograd.grad(self.net(xt).sum(), xt, create_graph=True)[0]
        return du[:, 1:] - 0.1 * du[:, :1]


def test_ddp_of_a_model_whose_loss_leaves_a_read_parameter_without_gradient_trains_like_the_unsplit_model():
    """DDP's reducer waited for the bias's gradient: 'Expected to have finished reduction in the
    prior iteration' (find_unused_parameters was set only for parameters no op reads)."""
    from envs.runtime.gradient_reach import parameters_without_gradient
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _HeatResidual(), torch.rand(8, 2)
    gm = capture(model, (x,)).gm

    def loss_fn(out, xt):
        return out.pow(2).mean()

    assert parameters_without_gradient(gm, (x.clone(),), loss_fn) == ["net.2.bias"]
    run = run_training(gm, {"xt": x}, world=2, steps=2, loss_fn=loss_fn, optimizer=SGD, timeout_s=120)
    reference_model = copy.deepcopy(model)
    opt = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn(reference_model(x.clone()), x)
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
    assert run.losses == pytest.approx(expected, rel=1e-5)


class _SpareHead(nn.Module):
    """Two stages' worth of layers and a second head whose output the loss ignores: its
    parameters are read, yet get no gradient."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 5)
        self.spare = nn.Linear(D, 3)

    def forward(self, x, y):  # y: the loss's labels
        h = torch.relu(self.l2(torch.relu(self.l1(x))))
        return self.l3(h), self.spare(h)


def _first_output_loss(out, x, y):
    return F.cross_entropy(out[0], y)


def test_only_the_stages_holding_a_parameter_without_gradient_search_for_it(tmp_path):
    """DDP's find_unused_parameters costs every step (MLPs of 200-800 parameters over 2 gloo
    processes: 1.04-1.26x the step without it), and every stage replica of a pipeline x DDP hybrid paid it.
    The job now lists the parameters the loss reaches none of; a stage searches only if it holds one."""
    from envs.runtime.pipeline.launcher import _reached_by_no_loss, write_job

    torch.manual_seed(0)
    gm = fx.symbolic_trace(_SpareHead())
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, D, generator=g), "y": torch.randint(0, 5, (B,), generator=g)}
    hybrid = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 2, "gpipe", (("cpu:2", "cpu:3"),))
    job = torch.load(write_job(tmp_path / "a", gm, batch, hybrid, loss_fn=_first_output_loss), weights_only=False)
    assert sorted(job["unused_parameters"]) == ["spare.bias", "spare.weight"]
    ddp_job = torch.load(write_job(tmp_path / "c", gm, batch, None, loss_fn=_first_output_loss), weights_only=False)
    assert sorted(ddp_job["unused_parameters"]) == ["spare.bias", "spare.weight"]  # DDP's replicas read it too
    chain, chain_batch = model_and_batch(Chain)
    chained = Pipeline(stages_of(chain, {"l3"}), ("cpu:0", "cpu:1"), 2, "gpipe", (("cpu:2", "cpu:3"),))
    assert torch.load(write_job(tmp_path / "b", chain, chain_batch, chained), weights_only=False)["unused_parameters"] == []
    # where the model cannot run a forward here (on meta), every stage searches, as before
    assert _reached_by_no_loss(copy.deepcopy(gm).to("meta"), batch, _first_output_loss) is None


@pytest.mark.slow
def test_a_hybrid_with_a_parameter_without_gradient_trains_like_the_unsplit_model():
    """The stage holding the spare head searches for it (its reducer would otherwise wait: 'Expected
    to have finished reduction in the prior iteration'); the other stage does not."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_SpareHead())
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, D, generator=g), "y": torch.randint(0, 5, (B,), generator=g)}
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 2, "gpipe", (("cpu:2", "cpu:3"),))
    run = run_training(gm, batch, pipe, steps=2, loss_fn=_first_output_loss, optimizer=SGD, timeout_s=180)
    ref = copy.deepcopy(gm)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for _ in range(2):
        opt.zero_grad()
        loss = _first_output_loss(ref(batch["x"], batch["y"]), batch["x"], batch["y"])
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
    assert run.losses == pytest.approx(expected, rel=1e-5)


def test_a_loss_from_a_scripts_main_module_or_a_vanished_package_travels_as_its_traced_graph(monkeypatch):
    """find_spec raised for a script's __main__ ('ValueError: __main__.__spec__ is None'), so
    write_job and run_training failed for a loss a user script defined."""
    import sys

    from envs.runtime.pipeline.launcher import _portable_loss

    def loss(out, x):
        return out.square().mean()

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    for module in ("__main__", "no_such_package.losses"):
        loss.__module__ = module
        portable = _portable_loss(loss)
        assert isinstance(portable, fx.GraphModule)
        assert torch.equal(portable(torch.ones(2), None), torch.tensor(1.0))


class _EnsembleLoss(nn.Module):
    """PyTorch's model-ensembling recipe, returning its loss: the members' parameters stacked,
    vmap over functional_call of a template member kept on meta."""

    def __init__(self) -> None:
        super().__init__()
        from torch.func import stack_module_state

        members = [nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 5)) for _ in range(3)]
        stacked, _ = stack_module_state(members)
        self.names = list(stacked)
        self.stacked = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in stacked.items()})
        self.base = copy.deepcopy(members[0]).to("meta")
        self.head = nn.Linear(5, 5)

    def forward(self, x, y):
        from torch.func import functional_call, vmap

        params = {n: self.stacked[n.replace(".", "_")] for n in self.names}
        logits = vmap(lambda p: functional_call(self.base, p, (x,)))(params).mean(0)
        return F.cross_entropy(self.head(logits), y)


@pytest.mark.parametrize("layout", ["pipeline", pytest.param("ddp", marks=pytest.mark.slow)])
def test_a_model_holding_a_template_on_meta_trains_in_a_pipeline_and_under_ddp(layout):
    """Every pipeline and DDP of the ensemble failed: its meta tensors were copied to the CPU
    ("Cannot copy out of meta tensor") and DDP refused parameters on two device types."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model = _EnsembleLoss()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, D, generator=g), "y": torch.randint(0, 5, (B,), generator=g)}
    gm = capture(model, (batch["x"], batch["y"])).gm
    names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pipe = Pipeline(stages_of(gm, {names[-3]}), ("cpu:0", "cpu:1"), 2, "gpipe") if layout == "pipeline" else None
    run = run_training(gm, batch, pipe, world=2 if layout == "ddp" else None, steps=3, optimizer=SGD,
                       timeout_s=120)
    ref = copy.deepcopy(gm)
    opt = torch.optim.SGD([p for p in ref.parameters() if not p.is_meta], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ref(batch["x"], batch["y"])
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert run.losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for name, p in ref.named_parameters():
        if p.is_meta:
            assert run.params[name].is_meta
        else:
            torch.testing.assert_close(run.params[name], p.detach(), rtol=1e-5, atol=1e-6)


class _InnerLoop(torch.nn.Module):
    """MAML's adaptation kept whole: a backward (autograd.grad) runs inside this module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lin.weight
        (g,) = torch.autograd.grad(torch.nn.functional.linear(x, w).pow(2).mean(), w, create_graph=True)
        return torch.nn.functional.linear(x, w - 0.1 * g)


def test_stage_boundaries_are_probed_through_a_leaf_module_that_differentiates_inside():
    """The boundary probe saved nothing for a backward, unless the graph showed an autograd.grad;
    one inside a leaf module failed it ("Output of saved tensor unpack_hook expected to be a Tensor"),
    and every pipeline of a MAML learner was measured invalid."""
    from envs.runtime.pipeline.stages import boundary_metas
    from graphs.capture import capture

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _InnerLoop(), torch.nn.Linear(4, 2))
    captured = capture(model, (torch.randn(6, 4),), leaf_modules=[_InnerLoop])
    metas = boundary_metas(captured.gm, {"input_1": torch.randn(3, 4)}, {"_1"})
    assert metas["_1"].is_meta and tuple(metas["_1"].shape) == (3, 4) and metas["_1"].requires_grad
