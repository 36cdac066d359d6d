"""Two local CPU worker processes on loopback (gloo): numerics against one process, and failures.

Each job starts two interpreters that import torch (seconds each on a loaded 2-core
machine), so every test runs several placements in one job.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from envs.runtime.distributed.launcher import WorkerGroup, free_port, run_job, write_job
from envs.runtime.distributed.measure import DistributedMeasurer
from envs.runtime.distributed.stage_state import module_tensors, owned_paths, tensor_bytes
from envs.runtime.measurer import MeasureError
from envs.runtime.split import split_by_rank
from graphs.pipeline import prepare

DEVICES = "cpu:0,cpu:1"
STEPS = 3


def _prepared(name: str):
    return prepare(f"zoo:{name}", {"size": "small"}, profile=False)


def _placements(prep):
    """A contiguous split and a module-aligned random one (groups keep modules whole)."""
    groups = list(prep.grouping.graph.nodes)
    rng = random.Random(1)
    half = prep.grouping.expand({g: int(i >= len(groups) // 2) for i, g in enumerate(groups)})
    rand = prep.grouping.expand({g: rng.randrange(2) for g in groups})
    return half, rand


def _reference(prep, steps: int = STEPS):
    """Single-process training at one thread, as the workers run.

    The thread count changes the reduction order of convolutions; ResNet's small config
    trains chaotically enough that this 1e-6 difference grows to O(1) in three steps.
    """
    spec = prep.spec
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(prep, spec, steps)
    finally:
        torch.set_num_threads(threads)


def _train(prep, spec, steps):
    gm = copy.deepcopy(prep.captured.gm)
    gm.train()
    opt = spec.optimizer_fn(gm.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = spec.loss_fn(gm(*spec.example_inputs), *spec.example_inputs)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: p.detach() for k, p in gm.named_parameters()}


def _check_model(name: str) -> None:
    prep = _prepared(name)
    half, rand = _placements(prep)
    tasks = [{"kind": "train", "ranks": half, "steps": STEPS}, {"kind": "train", "ranks": rand, "steps": STEPS}]
    out = run_job(prep.spec, f"zoo:{name}", DEVICES, tasks, model_args={"size": "small"},
                  fingerprint=prep.captured.fingerprint, timeout_s=240, load_timeout_s=240,
                  captured=prep.captured)
    assert out.ok, out.error
    ref_losses, ref_params = _reference(prep)
    for task, per_rank in zip(tasks, out.results):
        assert per_rank is not None
        _check_each_rank_holds_only_its_stages(prep, task["ranks"], per_rank)
        losses = [r["losses"] for r in per_rank if r["losses"][0] is not None]
        assert len(losses) == 1, "exactly one rank computes the loss"
        assert losses[0] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        params = {}
        for r in per_rank:
            assert not set(params) & set(r["params"]), "a parameter is owned by two ranks"
            params.update(r["params"])
        assert set(params) == set(ref_params)
        for k, p in ref_params.items():
            torch.testing.assert_close(params[k], p, rtol=1e-4, atol=1e-5, msg=f"parameter {k}")
    # The random placement really goes back and forth between the ranks.
    assert int(out.results[1][0]["describe"].split()[0]) >= 2


def _check_each_rank_holds_only_its_stages(prep, ranks, per_rank) -> None:
    """Bytes of model tensors each worker holds = those of its own stages; they add up to
    the model once (no tensor on two ranks); the optimizer state is sized by the stage."""
    gm = prep.captured.gm
    plan = split_by_rank(gm, ranks, 2)
    every = dict(module_tensors(gm))
    total = tensor_bytes(every.values())
    expected = [tensor_bytes(every[p] for p in owned_paths(plan, r)) for r in range(2)]
    assert all(0 < e < total for e in expected), "the test placement must give each rank a part of the weights"
    assert sum(expected) == total
    for r, res in enumerate(per_rank):
        assert res["built_on"] == "meta"
        assert res["held_bytes"] == expected[r]
        assert res["resident_bytes"] == expected[r], f"rank {r} holds tensors of another rank's stages"
        own_param_bytes = tensor_bytes(res["params"].values())
        # Adagrad (rnnlm) / Adam keep one or two tensors per parameter, plus scalar steps.
        assert own_param_bytes <= res["optimizer_state_bytes"] <= 2 * own_param_bytes + 4096


def test_rnnlm_two_workers_match_one_process():
    _check_model("rnnlm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "resnet50"])
def test_zoo_two_workers_match_one_process(name):
    _check_model(name)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is already dead; only its parent's wait() removes it.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] == "Z"


def test_killed_worker_is_reported_and_nothing_is_left(tmp_path):
    prep = _prepared("rnnlm")
    half, _ = _placements(prep)
    tasks = [{"kind": "measure", "ranks": half, "warmup": 0, "repeats": 1},
             {"kind": "measure", "ranks": half, "warmup": 0, "repeats": 100000}]
    write_job(tmp_path, prep.spec, "zoo:rnnlm", {"size": "small"}, DEVICES, tasks)
    with WorkerGroup(tmp_path, DEVICES) as group:
        group.start()
        first, why = group.wait_task(0, 240)
        assert first is not None, why
        os.kill(group.pids[1], signal.SIGKILL)
        start = time.monotonic()
        res, why = group.wait_task(1, 120)
        assert res is None
        assert "rank 1" in why and "SIGKILL" in why
        assert time.monotonic() - start < 60, "the dead worker was not noticed promptly"
        pids = group.pids
    assert all(_gone(p) for p in pids), "a worker outlived the job"


def _workers_of(job_dir) -> list[int]:
    """Live processes whose command line names ``job_dir`` (zombies excluded)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except OSError:
            continue
        if str(job_dir) in cmd and not _gone(int(pid)):
            found.append(int(pid))
    return found


@pytest.mark.slow
def test_hung_job_times_out_and_is_killed(tmp_path):
    prep = _prepared("rnnlm")
    half, _ = _placements(prep)
    tasks = [{"kind": "measure", "ranks": half, "warmup": 0, "repeats": 1},
             {"kind": "measure", "ranks": half, "warmup": 0, "repeats": 100000}]
    start = time.monotonic()
    out = run_job(prep.spec, "zoo:rnnlm", DEVICES, tasks, model_args={"size": "small"},
                  timeout_s=3, load_timeout_s=240, job_dir=tmp_path)
    assert out.results[0] is not None and out.results[1] is None
    assert out.failed_task == 1 and "timed out after 3s" in out.error
    assert time.monotonic() - start < 240
    assert _workers_of(tmp_path) == [], "a worker outlived the job"


def test_measured_messages_are_the_plans_crossings():
    """Each timed step sends one message per tensor leaf crossing forward and one per
    gradient coming back; the measurer reports them per rank with the time spent waiting."""
    from envs.runtime.distributed.runtime import value_meta

    prep = _prepared("rnnlm")
    half, _ = _placements(prep)
    m = DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES, warmup=1, repeats=2,
                            spec=prep.spec, captured=prep.captured, fingerprint=prep.captured.fingerprint)
    [res] = m.measure([{n: f"cpu:{r}" for n, r in half.items()}])
    assert res.valid, res.reason
    detail = m.details[res.placement_hash]
    gm = copy.deepcopy(prep.captured.gm).train()
    meta = value_meta(gm, prep.spec.example_inputs)
    plan = split_by_rank(gm, half, 2)
    expected = [0, 0]
    for t in plan.transfers:
        if t.src_rank != t.dst_rank:
            leaves = meta[t.value][1]
            expected[t.src_rank] += sum(1 for x in leaves if x.is_tensor)
            expected[t.dst_rank] += sum(1 for x in leaves if x.needs_grad)
    assert min(expected) > 0
    assert detail["messages_sent"] == expected
    assert all(w >= 0 for w in detail["recv_wait_s"]) and all(c > 0 for c in detail["cpu_s"])


def test_placements_that_move_only_a_model_input_are_one_run(monkeypatch):
    """Every rank holds the model inputs (envs.runtime.split), so a placement that moves only
    an input runs the program of the one that does not: it is answered from the cache."""
    from envs.runtime.measurer import MeasureResult

    prep = _prepared("rnnlm")
    m = DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES, spec=prep.spec, captured=prep.captured,
                            fingerprint=prep.captured.fingerprint)
    inputs = [n.name for n in prep.captured.gm.graph.nodes if n.op == "placeholder"]
    assert m.ignored_nodes == frozenset(inputs) and inputs
    runs: list[int] = []
    monkeypatch.setattr(m, "_run", lambda ranks, keys: runs.append(len(ranks)) or
                        [MeasureResult(step_time=1e-3 * (i + 1)) for i in range(len(ranks))])
    half, _ = _placements(prep)
    base = {n: f"cpu:{r}" for n, r in half.items()}
    def flip(placement, nodes):
        return {**placement, **{n: ("cpu:1" if placement[n] == "cpu:0" else "cpu:0") for n in nodes}}

    first, twin = m.measure([base, flip(base, inputs)])
    assert runs == [1] and twin.step_time == first.step_time
    m.measure([flip(base, [next(n for n in base if n not in inputs)])])  # an op moved: another program
    assert runs == [1, 1]


@pytest.mark.slow
def test_a_short_step_is_timed_often_enough_to_fill_the_minimum_time():
    prep = _prepared("rnnlm")
    half, _ = _placements(prep)
    placement = {n: f"cpu:{r}" for n, r in half.items()}
    m = DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES, warmup=2, repeats=2, min_timed_s=0.2,
                            max_repeats=30, spec=prep.spec, captured=prep.captured,
                            fingerprint=prep.captured.fingerprint)
    [res] = m.measure([placement])
    # rnnlm's small step takes a few ms: 0.2 s holds more than the 2 asked for, the cap 30 at most.
    assert res.valid and 2 < len(res.times) <= 30
    with pytest.raises(MeasureError, match="max_repeats >= repeats"):
        DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES, repeats=5, max_repeats=3)
    with pytest.raises(MeasureError, match="time-outs must be positive"):
        DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES, timeout_s=-1)


def test_a_training_job_times_enough_steps_for_its_expected_step():
    m = DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES, repeats=5, min_timed_s=0.5, max_repeats=200)
    assert m.timed_steps(None) == 5 and m.timed_steps(1.0) == 5
    assert m.timed_steps(0.003) == 167 and m.timed_steps(1e-6) == 200


def test_measurer_refuses_unknown_devices():
    m = DistributedMeasurer("zoo:rnnlm", {"size": "small"}, DEVICES)
    with pytest.raises(MeasureError, match="not among the workers"):
        m.measure([{"x": "cuda:3"}])


@pytest.mark.slow
def test_two_hosts_on_two_loopback_addresses_started_by_torchrun(tmp_path):
    """The several-hosts recipe of docs/distributed.md, with 127.0.0.1 and 127.0.0.2 as the
    two hosts: one torchrun per host (node ranks 0 and 1), host-qualified devices, and the
    rank on 127.0.0.2 listening on that address. Numerics equal the single process."""
    prep = _prepared("rnnlm")
    half, _ = _placements(prep)
    devices = "127.0.0.1:cpu:0,127.0.0.2:cpu:0"
    write_job(tmp_path, prep.spec, "zoo:rnnlm", {"size": "small"}, devices,
              [{"kind": "train", "ranks": half, "steps": STEPS}], timeout_s=120,
              fingerprint=prep.captured.fingerprint, captured=prep.captured)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = []
    try:
        for node, addr in enumerate(("127.0.0.1", "127.0.0.2")):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "envs.runtime.torchrun", "--nnodes=2", f"--node-rank={node}",
                 "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                 f"--local-addr={addr}", "-m", "envs.runtime.distributed.worker", str(tmp_path)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    per_rank = [torch.load(tmp_path / f"result-0-{r}.pt", weights_only=False) for r in range(2)]
    assert "127.0.0.2" in per_rank[1]["listening_on"], per_rank[1]["listening_on"]
    ref_losses, ref_params = _reference(prep)
    [losses] = [r["losses"] for r in per_rank if r["losses"][0] is not None]
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    params = {**per_rank[0]["params"], **per_rank[1]["params"]}
    for k, p in ref_params.items():
        torch.testing.assert_close(params[k], p, rtol=1e-4, atol=1e-5, msg=f"parameter {k}")


FROZEN_TEACHER = '''
import torch
import torch.nn as nn


class Distill(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.student(x) - self.teacher(x)


def get_model():
    torch.manual_seed(0)
    return Distill()


def get_example_inputs():
    return (torch.randn(8, 16, generator=torch.Generator().manual_seed(1)),)


def get_optimizer(params):
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
'''


def test_a_rank_holding_only_parameters_the_optimizer_leaves_out_trains_like_one_process(tmp_path):
    """The rank that holds the frozen teacher gets an empty list from the model's optimizer factory:
    torch.optim refused it ("optimizer got an empty parameter list") and the placement was invalid."""
    path = tmp_path / "distill.py"
    path.write_text(FROZEN_TEACHER)
    prep = prepare(str(path), {}, profile=False)
    ranks = {n: int(n.startswith("teacher")) for n in prep.captured.graph.nodes}
    assert 0 < sum(ranks.values()) < len(ranks)
    out = run_job(prep.spec, str(path), DEVICES, [{"kind": "train", "ranks": ranks, "steps": STEPS}],
                  fingerprint=prep.captured.fingerprint, timeout_s=240, load_timeout_s=240, captured=prep.captured)
    assert out.ok, out.error
    ref_losses, ref_params = _reference(prep)
    per_rank = out.results[0]
    losses = [r["losses"] for r in per_rank if r["losses"][0] is not None]
    assert losses[0] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    params = {k: v for r in per_rank for k, v in r["params"].items()}
    assert set(params) == set(ref_params) and any(k.startswith("teacher") for k in per_rank[1]["params"])
    for k, p in ref_params.items():
        torch.testing.assert_close(params[k], p, rtol=1e-4, atol=1e-5, msg=f"parameter {k}")


MODULE_LEVEL_TENSOR = '''
import torch
import torch.nn as nn

WEIGHTS = torch.tensor([1.0, 2.0, 0.5])  # made when the file is imported, read by the loss


def get_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def get_example_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y, weight=WEIGHTS)
'''


def _halves_train_like_one_process(path) -> list[str]:
    """Train the model file at ``path`` split in halves over two ranks; check the losses against one
    process and return where each rank built its skeleton."""
    prep = prepare(str(path), {}, profile=False)
    nodes = list(prep.captured.graph.nodes)
    ranks = {n: int(i >= len(nodes) // 2) for i, n in enumerate(nodes)}
    out = run_job(prep.spec, str(path), DEVICES, [{"kind": "train", "ranks": ranks, "steps": STEPS}],
                  fingerprint=prep.captured.fingerprint, timeout_s=240, load_timeout_s=240, captured=prep.captured)
    assert out.ok, out.error
    ref_losses, _ = _reference(prep)
    losses = [r["losses"] for r in out.results[0] if r["losses"][0] is not None]
    assert losses[0] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    return [r["built_on"] for r in out.results[0]]


def test_a_tensor_the_model_file_makes_at_import_is_a_real_one_on_the_ranks(tmp_path):
    """The ranks built the model on meta by importing the file under torch.device("meta"): the
    loss's module-level class weights were made on meta, and every placement over worker processes
    failed ("Tensor on device cpu is not on the expected device meta!")."""
    path = tmp_path / "weighted.py"
    path.write_text(MODULE_LEVEL_TENSOR)
    assert _halves_train_like_one_process(path) == ["meta", "meta"]  # the skeleton is still built on meta


MODULE_LEVEL_MODEL = '''
import torch
import torch.nn as nn

WEIGHTS = torch.tensor([1.0, 2.0, 0.5])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
g = torch.Generator().manual_seed(1)
example_inputs = (torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))


def get_loss(out, x, y):
    return nn.functional.cross_entropy(out, y, weight=WEIGHTS)
'''


def test_a_model_file_that_builds_its_model_at_import_trains_over_ranks_like_one_process(tmp_path):
    """`model = ...` at module level: built when the file is imported (no meta skeleton for it), once."""
    path = tmp_path / "module_level.py"
    path.write_text(MODULE_LEVEL_MODEL)
    assert _halves_train_like_one_process(path) == ["cpu", "cpu"]
