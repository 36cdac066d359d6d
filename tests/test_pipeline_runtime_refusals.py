"""What run_training refuses before any process starts, and how a rank refuses bad set-up (one line, exit 2)."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.fx as fx

import envs.runtime.pipeline.launcher as launcher
from envs.runtime.pipeline.launcher import PipelineRunError, run_training
from envs.runtime.pipeline.stages import boundary_metas
from envs.sim.pipeline_layout import Pipeline, PipelineError
from tests.helpers.runtime_models import Chain, model_and_batch, stages_of


@pytest.fixture
def no_process_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(launcher, "PipelineJob", refuse)


@pytest.mark.parametrize("change, match", [
    (lambda st: (st[0] + ("nope",), st[1]), r"names 1 node\(s\) the model does not have, e.g. \['nope'\]"),
    (None, r"pipeline devices: cannot read device 'gpu:0'"),
])
def test_a_pipeline_naming_unknown_nodes_or_devices_is_refused(no_process_starts, change, match):
    gm, batch = model_and_batch(Chain)
    stages = stages_of(gm, {"l3"})
    devices = ("cpu:0", "cpu:1") if change else ("gpu:0", "cpu:1")
    with pytest.raises(PipelineError, match=match):
        run_training(gm, batch, Pipeline(change(stages) if change else stages, devices, 2, "gpipe"))


def test_ddp_over_a_world_that_does_not_divide_the_batch_is_refused(no_process_starts):
    gm, batch = model_and_batch(Chain)
    with pytest.raises(PipelineError, match="DDP over 3 processes needs a batch divisible by 3; got 8"):
        run_training(gm, batch, None, world=3)


def test_an_unknown_optimizer_is_refused_naming_the_known_ones(no_process_starts):
    gm, batch = model_and_batch(Chain)
    with pytest.raises(PipelineError, match=r"unknown optimizer \('lbfgsx', \{\}\); expected .*'adam', 'adamw', 'sgd'"):
        run_training(gm, batch, None, world=2, optimizer=("lbfgsx", {}))


def test_a_host_that_does_not_resolve_and_a_port_given_as_text_are_refused(no_process_starts):
    gm, batch = model_and_batch(Chain)
    with pytest.raises(PipelineRunError, match="cannot resolve the rendezvous host 'no such host'"):
        run_training(gm, batch, None, world=2, host="no such host")
    with pytest.raises(PipelineRunError, match="expected an integer from 1 to 65535"):
        run_training(gm, batch, None, world=2, port="29500")  # type: ignore[arg-type]


def test_a_tuple_crossing_a_stage_boundary_is_refused_in_one_line():
    class TupleOut(torch.nn.Module):
        def forward(self, x):
            pair = torch.split(x, 2, dim=1)
            return pair[0].sum() + pair[1].sum()

    gm = fx.symbolic_trace(TupleOut())
    split = next(n.name for n in gm.graph.nodes if n.op == "call_function" and "split" in str(n.target))
    with pytest.raises(PipelineError) as info:
        boundary_metas(gm, {"x": torch.randn(2, 4)}, {split})
    assert str(info.value).count("\n") == 0 and "crosses a stage boundary but is a tuple" in str(info.value)


def test_probing_the_boundary_shapes_leaves_every_buffer_and_the_random_state_as_they_were():
    """The probe runs the caller's module, whose buffers are the user's model's: a
    non-persistent counter (not in the state_dict) advanced, and dropout drew from the global
    generator, so the pipeline trained from another state than the original."""
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.drop = torch.nn.Dropout(0.5)
            self.register_buffer("calls", torch.zeros(()), persistent=False)

        def forward(self, x):
            self.calls.add_(1)
            return self.drop(self.lin(x)) * self.calls

    from graphs.capture import capture

    model, x = Counting(), torch.randn(2, 4)
    gm = capture(model, (x,), name="counting").gm  # records the add_ (a plain fx trace runs it once)
    split = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "lin")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    boundary_metas(gm, {"x": x}, {split})
    assert float(gm.calls) == 0.0 and float(model.calls) == 0.0  # the user's model shares the buffer
    assert torch.equal(torch.get_rng_state(), before)


def test_the_boundary_probe_keeps_requires_grad_but_saves_nothing_for_a_backward():
    """Every rank runs the whole model once on a micro-batch to plan its boundaries; with
    autograd saving, that held every stage's activations on every rank before the first step
    (gpt2 at M=1: 140 MiB, above the step's own peak)."""
    from envs.runtime.pipeline.stages import boundary_metas
    from graphs.capture import capture

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    gm = capture(model, (torch.randn(4, 8),), name="chain").gm
    names = {n.name for n in gm.graph.nodes if n.op == "call_module"}
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        inputs = {n.name: torch.randn(4, 8) for n in gm.graph.nodes if n.op == "placeholder"}
        metas = boundary_metas(gm, inputs, names)
    assert packed == []
    assert all(m.device.type == "meta" and m.requires_grad for m in metas.values())


def test_a_cut_between_a_buffer_and_its_in_place_update_is_refused_naming_both():
    """The later stage received a copy of the running mean and updated that: the model's buffer
    stayed at 0, with no error (walkthrough, a hand-built cut given to run_training)."""
    from envs.runtime.pipeline.stages import split_stages
    from graphs.capture import capture

    class Ema(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(8, 16)
            self.l2 = torch.nn.Linear(16, 1)
            self.register_buffer("ema", torch.zeros(16))

        def forward(self, x):
            h = torch.relu(self.l1(x))
            self.ema.mul_(0.5).add_(0.5 * h.detach().mean(0))
            return self.l2(h)

    gm = capture(Ema(), (torch.randn(4, 8),), name="ema").gm
    names = [n.name for n in gm.graph.nodes]
    holder = next(n.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == "ema")
    update = next(n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "mul_")
    last = next(n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_")
    cut = names.index(holder) + 1  # the buffer in stage 0, its updates in stage 1
    pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe")
    with pytest.raises(PipelineError, match=rf"node '{update}' \(stage 1\) updates 'ema' in place, but stage 0 "
                                            "holds it: the update would land on a copy"):
        split_stages(gm, pipe)
    whole = names.index(last) + 1
    split_stages(gm, Pipeline((tuple(names[:whole]), tuple(names[whole:])), ("cpu:0", "cpu:1"), 2, "gpipe"))


def test_a_cut_between_an_in_place_update_and_another_read_of_the_same_buffer_is_refused():
    """Two get_attr nodes of one buffer read one tensor: a read in an earlier stage than the
    update sees that process's copy, which the update never reaches (stale from step 2 on).
    The check was keyed by get_attr node and let this cut through."""
    import torch.fx as fx

    from envs.runtime.pipeline.stages import split_stages

    root = torch.nn.Module()
    root.lin = torch.nn.Linear(4, 4)
    root.register_buffer("ema", torch.zeros(4))
    g = fx.Graph()
    x = g.placeholder("x")
    read = g.get_attr("ema")
    h = g.call_function(torch.add, (g.call_module("lin", (x,)), read))
    held = g.get_attr("ema")
    g.call_method("add_", (held, g.call_method("mean", (g.call_method("detach", (h,)), 0))))
    g.output(h)
    gm = fx.GraphModule(root, g)
    names = [n.name for n in gm.graph.nodes]
    cut = names.index(held.name)  # the first read in stage 0, the second get_attr and its update in stage 1
    pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe")
    with pytest.raises(PipelineError, match=rf"node '{read.name}' \(stage 0\) reads 'ema', which node 'add_' "
                                            r"\(stage 1\) updates in place: stage 0 would read its own copy"):
        split_stages(gm, pipe)
    split_stages(gm, Pipeline((tuple(names),), ("cpu:0",), 2, "gpipe"))


def test_a_job_runs_its_steps_after_the_warmup_with_the_older_objects_frozen_and_refuses_a_bad_warmup(tmp_path):
    from envs.runtime.pipeline.worker import _steps

    before = gc.get_freeze_count()
    frozen = [gc.get_freeze_count() > before for _ in _steps({"steps": 4, "warmup": 1})]
    assert frozen == [False, True, True, True] and gc.get_freeze_count() == before
    assert list(_steps({"steps": 2})) == [0, 1]  # a job file written before the field: every step timed
    gm, batch = model_and_batch(Chain)
    for bad in (-1, 3, 1.5, True):
        with pytest.raises(PipelineError, match=rf"warm-up steps must be a whole number from 0 to steps - 1 = 2; "
                                                rf"got warmup={bad!r}"):
            launcher.write_job(tmp_path, gm, batch, None, steps=3, warmup=bad)


def test_a_rank_that_cannot_serve_the_rendezvous_says_why_in_one_line_and_exits_2(tmp_path):
    gm, batch = model_and_batch(Chain)
    launcher.write_job(tmp_path, gm, batch, None, steps=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        done = subprocess.run([sys.executable, "-m", "envs.runtime.pipeline.worker", str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"rank 0: RendezvousError: rank 0 cannot serve the rendezvous on 127.0.0.1:{port}: "
                                   "Address already in use; expected a free port (set MASTER_PORT to another)")


# 12 s, most of it the time-out it waits for; the rank runtime's hung-rank naming stays in the
# default suite (tests/test_distributed_faults.py).
@pytest.mark.slow
def test_a_stopped_stage_process_is_named_when_the_job_times_out():
    import signal
    import time

    from envs.runtime.pipeline.launcher import PipelineJob

    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "1f1b")
    job = PipelineJob(gm, batch, 2, pipe, 100000, ("sgd", {"lr": 0.1}), None, 1, 10.0, "127.0.0.1")
    try:
        deadline = time.monotonic() + 90
        while not (job.ready(0) and job.ready(1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(job.pids[1], signal.SIGSTOP)
        with pytest.raises(PipelineRunError, match=r"had not finished; rank\(s\) \[1\] stopped \(SIGSTOP"):
            job.wait()
    finally:
        job.close()


def test_a_rank_maps_the_job_file_and_owns_only_the_tensors_it_keeps(tmp_path):
    """Every rank read the whole model into memory of its own (N ranks on one host, N copies)
    before freeing the stages it does not run; mapped, the load costs next to nothing until a
    rank copies out what it keeps."""
    import gc
    import sys

    from envs.runtime.pipeline.launcher import write_job
    from envs.runtime.pipeline.worker import load_job, own_memory
    from graphs.capture import capture

    if not sys.platform.startswith("linux"):
        pytest.skip("reads the resident size from /proc")

    def resident() -> int:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

    model = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 8))  # 32 MiB
    gm = capture(model, (torch.randn(2, 2048),), name="big").gm
    write_job(tmp_path, gm, {n.name: torch.randn(2, 2048) for n in gm.graph.nodes if n.op == "placeholder"}, None, 1)
    del gm
    gc.collect()
    before = resident()
    job = load_job(tmp_path)
    assert resident() - before < 8 * 2**20
    first = job["gm"].get_submodule("0")
    own_memory([first])  # what a rank keeps of stage 0: its Linear's 32 MiB
    assert resident() - before > 24 * 2**20
    torch.testing.assert_close(first.weight, model[0].weight)


def test_an_in_place_update_of_a_value_an_earlier_stage_made_is_refused_before_any_process_starts(no_process_starts):
    """The later stage receives the value as an autograd leaf: the update failed inside the
    job, once every rank had started ('[Stage 1] failed to run forward'; walkthrough)."""
    from graphs.capture import capture
    from tests.helpers.runtime_models import ActivationUpdatedAfterItIsRead

    x = torch.randn(4, 8)
    gm = capture(ActivationUpdatedAfterItIsRead(), (x,), name="updates").gm
    names = [n.name for n in gm.graph.nodes if n.op != "placeholder"]
    pipe = Pipeline(((names[0],), tuple(names[1:])), ("cpu:0", "cpu:1"), 2, "gpipe")
    with pytest.raises(PipelineError, match=r"node 'mul_' \(stage 1\) updates 'a' of stage 0 in place"):
        run_training(gm, {"x": x}, pipe, steps=1, loss_fn=lambda out, x: out.mean())
