"""Faults around measurement: a killed parent, a hang past the budget, stale job files,
SIGTERM and Ctrl-C of ``placer`` — with real processes and small models.

Also the pieces every measurer shares: the cache, the step timer, the supervisor's sweep.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import pytest

from envs.runtime.measure import BUDGET_CUT, BUDGET_SPENT, SingleProcessMeasurer
from envs.runtime.measurer import MeasureCache, MeasureResult
from envs.runtime.step_timer import median_step_time, time_steps
from envs.runtime.supervisor import JOB_DIR_PREFIX, make_job_dir, report_rank_failure, sweep_stale_job_dirs
from tests.helpers.measurers import ClosableFake
from tests.helpers.processes import process_gone, wait_gone

ROOT = Path(__file__).resolve().parents[1]

SLEEPY_MODEL = textwrap.dedent(
    '''
    import time
    import torch
    import torch.nn as nn

    _FLAG = None

    def get_model(flag=""):
        global _FLAG
        _FLAG = flag
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def get_example_inputs(flag=""):
        return (torch.randn(4, 8),)

    def get_loss(output, *inputs):
        if _FLAG and open(_FLAG).read().strip() == "sleep":
            time.sleep(600)
        return output.pow(2).mean()
    '''
)


@pytest.fixture()
def sleepy(tmp_path):
    model = tmp_path / "sleepy_model.py"
    model.write_text(SLEEPY_MODEL)
    flag = tmp_path / "flag"
    flag.write_text("ok")
    return model, flag


def _python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_measure_worker_dies_when_its_parent_is_killed(sleepy):
    """SIGKILL of the process that owns the measurer (placer) leaves no worker behind."""
    model, flag = sleepy
    parent = _python(textwrap.dedent('''
        import sys, time
        from envs.runtime.measure import SingleProcessMeasurer
        m = SingleProcessMeasurer(sys.argv[1], model_args={"flag": sys.argv[2]}, num_threads=1)
        m.start()
        print(m.pid, flush=True)
        time.sleep(600)
    '''), str(model), str(flag))
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), parent.stderr.read()
        worker = int(line)
        assert not process_gone(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_gone([worker], timeout_s=15.0), f"measure worker {worker} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# 9 s, most of it the deadline it waits for; a hung measurement's own time-out stays in the
# default suite.
@pytest.mark.slow
def test_the_deadline_cuts_a_hung_measurement_and_later_ones_do_not_run(sleepy):
    """The run's budget bounds every measurement: a hang ends at the deadline, not at the
    (long) per-placement time-out, and neither result is cached (they say nothing of the placement)."""
    model, flag = sleepy
    with SingleProcessMeasurer(model, model_args={"flag": str(flag)}, warmup=0, repeats=1, timeout_s=300,
                               num_threads=1) as m:
        names = m.node_names
        first, second = {n: "cpu" for n in names}, {n: "cpu" for n in names}
        second[names[1]] = "cpu:0"
        flag.write_text("sleep")
        m.deadline = time.monotonic() + 3.0
        start = time.monotonic()
        hung, skipped = m.measure([first, second])
        assert time.monotonic() - start < 30
        assert not hung.valid and hung.reason == BUDGET_CUT  # stopped by the deadline: not called a hang
        assert hung.budget_cut and not m.alive
        assert not skipped.valid and skipped.reason == BUDGET_SPENT and skipped.budget_cut
        flag.write_text("ok")
        m.deadline = None
        [again] = m.measure([first])
        assert again.valid and not again.cached


def test_job_dirs_of_dead_owners_are_swept_and_live_ones_kept(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    stale = tmp_path / f"{JOB_DIR_PREFIX}{dead_pid}-12345-abc"
    stale.mkdir()
    (stale / "job.pt").write_bytes(b"weights")
    mine = make_job_dir(tmp_path)
    assert mine.name.startswith(f"{JOB_DIR_PREFIX}{os.getpid()}-")
    assert not stale.exists(), "make_job_dir sweeps dirs of owners that are gone"
    # A pid that was reused by another process: the start time tells them apart.
    reused = tmp_path / f"{JOB_DIR_PREFIX}{os.getpid()}-1-xyz"
    reused.mkdir()
    unrelated = tmp_path / "placer-jobs-notes"
    unrelated.mkdir()
    assert sweep_stale_job_dirs(tmp_path) == [reused]
    assert mine.exists() and unrelated.exists()


def test_a_rank_failure_whose_first_line_only_introduces_its_cause_is_followed_by_the_cause(tmp_path):
    """torch's pipelining stage raises "[Stage 1] failed to run forward:" from the error: the job's
    reason stopped at the colon."""
    try:
        try:
            raise RuntimeError("the loss differentiates through the model")
        except RuntimeError as cause:
            raise RuntimeError("[Stage 1] failed to run forward:\n  args: ...") from cause
    except RuntimeError as exc:
        report_rank_failure(tmp_path, 1, exc, show_traceback=False)
    first = (tmp_path / "error-1.txt").read_text().splitlines()[0]
    assert first == ("RuntimeError: [Stage 1] failed to run forward: RuntimeError: the loss differentiates "
                     "through the model")


def test_the_cache_keys_on_model_devices_and_protocol_and_skips_budget_cuts():
    runs = []

    def run(todo):
        runs.append(list(todo))
        return [MeasureResult(step_time=0.01 * (i + 1)) for i in todo]

    cache = MeasureCache(["cpu:0", "cpu:1"], {"warmup": 1, "repeats": 3})
    cache.set_fingerprint("model-a")
    a, b = {"x": "cpu:0", "y": "cpu:1"}, {"x": "cpu:1", "y": "cpu:1"}
    keys = [cache.key(a), cache.key(b), cache.key(dict(reversed(list(a.items()))))]
    assert keys[0] == keys[2] != keys[1]
    first = cache.measure(keys, run)
    assert runs == [[0, 1]] and [r.cached for r in first] == [False, False, True]
    assert cache.measure(keys[:1], run)[0].cached and runs == [[0, 1]]
    assert MeasureCache(["cpu:0"], {"warmup": 1, "repeats": 3}).key(a) != keys[0]  # other devices
    assert MeasureCache(["cpu:0", "cpu:1"], {"warmup": 2, "repeats": 3}).key(a) != keys[0]  # other protocol
    cache.set_fingerprint("model-b")  # another model: old results describe it no more
    assert len(cache) == 0
    cut = MeasureResult(step_time=float("inf"), valid=False, reason="timed out", budget_cut=True)
    cache.put("k", cut)
    assert cache.get("k") is None


def test_the_step_timer_times_only_the_steps_after_warmup_between_syncs():
    events = []
    clock = iter(range(100))

    def step():
        events.append(("step", next(clock)))
        time.sleep(0.002)

    timed = time_steps(step, warmup=2, repeats=3, sync=lambda: events.append(("sync",)),
                       on_timing=lambda: events.append(("timing",)))
    assert len(timed.times) == 3 and all(t >= 0.002 for t in timed.times)
    assert events.index(("timing",)) == 6  # after two warm-up steps, each between two syncs
    assert [e for e in events if e[0] == "step"] == [("step", i) for i in range(5)]
    assert events.count(("sync",)) == 10
    assert median_step_time([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        time_steps(step, warmup=0, repeats=0)


class _Cycle:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_the_timed_steps_freeze_what_existed_before_them_but_still_collect_what_they_make():
    before = gc.get_freeze_count()
    seen = []

    def step():
        ref = weakref.ref(_Cycle())  # garbage made by this step, freed only by a collection
        gc.collect()  # a full collection inside the step: cheap when the old objects are frozen
        seen.append((gc.get_freeze_count(), ref() is None))

    time_steps(step, warmup=2, repeats=3)
    assert [count == before for count, _ in seen] == [True, True, False, False, False]  # frozen while timed only
    assert all(freed for _, freed in seen)  # the timed steps' own cycles are still collected
    assert gc.get_freeze_count() == before  # released afterwards


def _optimize_until_best(args, out: Path, sig: int, timeout_s: float = 240.0):
    """Start ``placer optimize``, send ``sig`` once the search has saved a best placement."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "placer", "optimize", *args, "--out", str(out), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not (out / "best_placement.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the search never saved a best placement"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_optimize_keep_the_best_and_exit_non_zero(tmp_path, sig, status):
    """SLURM, docker stop and systemd send SIGTERM: handled like Ctrl-C, the results so far
    are written, and the exit status says the run was interrupted."""
    out = tmp_path / "out"
    code, _, stderr = _optimize_until_best(["zoo:rnnlm", "--cluster", "4xK40", "--budget", "10m",
                                            "--baselines", "single", "--no-check"], out, sig)
    assert code == status, stderr[-2000:]
    assert f"interrupted by {signal.Signals(sig).name}" in stderr
    placement = json.loads((out / "placement.json").read_text())
    assert placement["assignment"]


def test_measure_timeout_must_be_a_positive_time(capsys):
    from placer.cli.main import main

    assert main(["optimize", "zoo:rnnlm", "--measure-timeout", "0"]) == 2
    assert "--measure-timeout: must be a positive time" in capsys.readouterr().err
    assert main(["optimize", "zoo:rnnlm", "--measure-timeout", "soon"]) == 2
    assert "expected seconds like 30, 90s or 5m" in capsys.readouterr().err


class _DeadlineBackend(ClosableFake):
    """A measurer of op placements that honours ``deadline`` like the real ones: past it,
    nothing runs (BUDGET_SPENT, not cached)."""

    def __init__(self):
        self.deadline = None
        self.deadlines_seen = []
        self.runs = 0

    def measure(self, placements):
        self.deadlines_seen.append(self.deadline)
        out = []
        for _ in placements:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                out.append(MeasureResult(step_time=float("inf"), valid=False, reason=BUDGET_SPENT, budget_cut=True))
            else:
                self.runs += 1
                out.append(MeasureResult(step_time=1e-3))
        return out


def test_the_budget_spares_the_first_measurement_and_cut_runs_are_answered_not_kept():
    """A budget shorter than the workers' start-up still measures the reference; after it,
    placements past the deadline come back invalid, are not logged as measured, and run
    when asked again without a deadline (the confirming phase)."""
    import numpy as np

    from placer.measuring.measurer import PlacementMeasurer
    from tests.helpers.problems import random_problem

    problem = random_problem(n=6, d=2, seed=1)
    backend = _DeadlineBackend()
    pm = PlacementMeasurer(backend, problem, lambda groups: groups, "fake")
    pm.set_deadline(time.monotonic() - 1.0)  # already spent
    rows = np.stack([np.zeros(6, dtype=np.int64), np.ones(6, dtype=np.int64)])
    [first] = pm.measure_rows(rows[:1])
    assert first.valid and backend.deadlines_seen == [None]  # the reference is spared
    [late] = pm.measure_rows(rows[1:])
    assert not late.valid and late.reason == BUDGET_SPENT
    assert len(pm.records) == 1 and pm.lookup(rows[1]) is None
    pm.set_deadline(None)
    [again] = pm.measure_rows(rows[1:])
    assert again.valid and backend.runs == 2 and pm.lookup(rows[1]) is again
    # Stopped mid-run by the deadline: not an invalid placement of the log either.
    n = len(pm.records)
    backend.measure = lambda placements: [MeasureResult(step_time=float("inf"), valid=False, reason=BUDGET_CUT,
                                                        budget_cut=True) for _ in placements]
    [stopped] = pm.measure_rows(np.array([[0, 1, 0, 1, 0, 1]]))
    assert not stopped.valid and stopped.reason == BUDGET_CUT and len(pm.records) == n

