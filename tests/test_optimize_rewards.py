"""optimize's reward modes on real devices: measured, hybrid (recalibrating) and their refusals.

The fast tests run the whole optimize over the two rank devices ``cpu:0,cpu:1`` with a
deterministic stand-in for the worker processes (the link ping-pong is faked too), so
they check the wiring — what is measured, when, and what decides — in seconds. The slow
ones run the real worker processes end to end.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import placer
from envs.gym.measured_rewards import MeasuredReward
from envs.runtime.measurer import MeasureResult
from graphs.errors import PlacerError
from placer.measuring.confirm import CONFIRM_RUNS, CONFIRM_TOP
from placer.measuring.hybrid_rounds import HYBRID_ROUNDS
from placer.measuring.measurer import PlacementMeasurer
from placer.options import OptionError
from tests.helpers.measurers import ClosableFake, fixed_links

DEVICES = "cpu:0,cpu:1"
MODEL = "zoo:rnnlm"  # 36 ops in 6 groups: a tiny real model
BASELINES = ("single", "expert", "round_robin", "m_etf")


class FakeWorkers(ClosableFake):
    """Stands in for the measuring worker processes: a step time from the op placement.

    cpu:0 is the faster device; each op on cpu:1 adds more, each device change in op order
    costs a transfer; everything on cpu:1 runs "out of memory", and placements with
    exactly two ops on cpu:0 make the backend raise (a broken worker).
    """

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.calls: Counter = Counter()
        self.batches = 0
        self.interrupt_after = interrupt_after

    def time_of(self, placement: dict[str, str]) -> MeasureResult:
        devs = [placement[k] for k in sorted(placement)]
        on1 = sum(d == "cpu:1" for d in devs)
        if on1 == len(devs):
            return MeasureResult(step_time=math.inf, valid=False, reason="CUDA out of memory (fake)")
        changes = sum(a != b for a, b in zip(devs, devs[1:]))
        return MeasureResult(step_time=2e-3 + 3e-3 * on1 / len(devs) + 1e-4 * changes)

    def measure(self, placements):
        self.batches += 1
        if self.interrupt_after is not None and self.batches > self.interrupt_after:
            raise KeyboardInterrupt
        # Every placement of the batch was sent to the workers, also those after one that breaks them.
        self.calls.update(tuple(sorted(p.items())) for p in placements)
        out = []
        for p in placements:
            if sum(d == "cpu:0" for d in p.values()) == 2:
                raise RuntimeError("worker rank 1 died (fake)")
            out.append(self.time_of(p))
        return out


def _run(tmp_path, reward, budget, backend, **kw):
    return placer.optimize(MODEL, devices=DEVICES, reward=reward, budget=budget, out_dir=tmp_path / "out",
                           baselines=BASELINES, progress=False, verbose=0, measurer=backend,
                           cache_dir=tmp_path / "cache", **kw)


def test_measured_mode_rewards_are_the_measured_times_of_every_distinct_placement(tmp_path, fake_links, monkeypatch):
    evaluated: list[np.ndarray] = []
    original = MeasuredReward._evaluate

    def spy(self, rows):
        evaluated.extend(np.array(r) for r in rows)
        return original(self, rows)

    monkeypatch.setattr(MeasuredReward, "_evaluate", spy)
    workers = FakeWorkers()
    result = _run(tmp_path, "measured", "40", workers)

    m = result.measurement
    assert result.reward == "measured" and m.reward == "measured"
    # Every distinct placement the search evaluated (and the measured reference) ran exactly once.
    searched = {r.row.tobytes() for r in m.records if r.phase == "search"}
    assert searched >= {r.tobytes() for r in evaluated}
    assert len(searched) - len({r.tobytes() for r in evaluated}) <= 1  # + the single-device reference
    # Once each, but the final confirmation's runs of the leading placements and the single devices.
    confirmed = [r for r in m.records if r.phase == "confirm"]
    assert 0 < len(confirmed) <= CONFIRM_RUNS * (CONFIRM_TOP + 2)
    assert sum(workers.calls.values()) == m.count and len(workers.calls) == m.placements
    assert sum(v - 1 for v in workers.calls.values()) <= len(confirmed)
    assert len(evaluated) > len({r.tobytes() for r in evaluated})  # repeats happened and were free
    # The search's best is a measured time of the fake devices, not a simulated one.
    times = {r.step_time for r in m.records if r.valid}
    assert result.search.best_step_time in times
    assert result.source == "measured" and result.step_time == min(times)
    # Failures are invalid placements with their reason, never a crash.
    reasons = {r.reason for r in m.records if not r.valid}
    assert any("out of memory" in r for r in reasons)
    table = result.table
    assert set(table.loc[table["source"] == "measured", "method"]) >= {"placer (moves)"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Measurements" in report and f"**{m.count} runs of {m.placements} distinct placements**" in report
    assert "real devices, winner **measured**" in report
    saved = json.loads((tmp_path / "out" / "measurements.json").read_text())
    assert saved["measurements"] == m.count and saved["reward"] == "measured"


def test_hybrid_mode_recalibrates_during_the_search_and_the_measured_fastest_wins(tmp_path, fake_links):
    workers = FakeWorkers()
    # A budget of 1,000 placements: every hybrid round runs, however loaded the machine is.
    result = _run(tmp_path, "hybrid", "1000", workers, agent="hierarchical")

    m = result.measurement
    assert result.reward == "hybrid"
    assert len(m.rounds) == HYBRID_ROUNDS
    assert m.search_calibrations >= 1  # the search continued on a recalibrated simulator
    # Placements measured after the first calibration (round 0 calibrates from the seeds)
    # were predicted by it first; all on one device on cpu:1 is among them (a round's
    # candidate or confirmed at the end), invalid with its reason: out of memory, or the
    # failure of the batch it was measured in (a fake worker that raises).
    # A run again at the end (confirm) was in the calibration's data: no prediction to test.
    seen: set[bytes] = set()
    first_runs, again = [], []
    for r in m.records:
        key = np.asarray(r.row).tobytes()
        (again if key in seen else first_runs).append(r)
        seen.add(key)
    later = [r for r in first_runs if r.phase != "round 0"]
    assert later and any(r.predicted is not None for r in later)
    if not m.calibrations_set_aside:  # a fit set aside after one was taken leaves none to predict with
        assert all(r.predicted is not None for r in later)
    assert again and all(r.predicted is None for r in again)
    on_cpu1 = [r for r in later if set(np.asarray(r.row).tolist()) == {1}]
    assert on_cpu1 and not on_cpu1[0].valid
    assert "out of memory" in on_cpu1[0].reason or "worker rank 1 died" in on_cpu1[0].reason
    confirmed = [r for r in m.records if r.phase == "confirm"]
    assert sum(v - 1 for v in workers.calls.values()) <= len(confirmed) <= CONFIRM_RUNS * (CONFIRM_TOP + 2)
    # The fake machine has no noise: the placements run twice measured the same both times.
    assert m.repeats is not None and m.repeats["n"] >= 1 and m.repeats["max"] == 0.0
    # Only measured times decide, and the winner is the fastest measured candidate.
    measured_rows = result.table[result.table["source"] == "measured"]
    assert result.source == "measured"
    assert result.step_time == pytest.approx(measured_rows["step_time"].min())
    fake_time = workers.time_of(result.placement.assignment).step_time
    assert result.step_time == pytest.approx(fake_time)
    cal = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert cal["devices"] == ["cpu:0", "cpu:1"] and len(cal["rounds"]) == HYBRID_ROUNDS
    assert cal["after"]["n"] == sum(r.valid for r in m.records)
    assert cal["after"]["mape"] <= cal["before"]["mape"] + 1e-9
    report = (tmp_path / "out" / "report.md").read_text()
    assert "recalibrated" in report and "Spearman" in report


@pytest.mark.slow
def test_simulated_mode_on_real_devices_only_confirms_the_best_few(tmp_path, fake_links):
    workers = FakeWorkers()
    result = _run(tmp_path, "simulated", "300", workers)
    m = result.measurement
    assert result.reward == "simulated" and m.search_calibrations == 0 and not m.rounds
    assert {r.phase for r in m.records} == {"confirm"}
    assert result.source == "measured"


def test_real_devices_default_to_hybrid_and_clusters_to_simulated(tmp_path, fake_links):
    result = placer.optimize(MODEL, devices=DEVICES, budget="20", baselines=("single",), progress=False, verbose=0,
                             check=False, measurer=FakeWorkers(), cache_dir=tmp_path / "cache")
    assert result.reward == "hybrid" and result.measurement.reward == "hybrid"
    simulated = placer.optimize(MODEL, cluster="4xK40", budget="20", baselines=("single",), progress=False,
                                verbose=0, check=False, cache_dir=tmp_path / "cache")
    assert simulated.reward == "simulated" and simulated.measurement is None


def test_ctrl_c_during_measured_search_keeps_the_best_on_disk(tmp_path, fake_links):
    workers = FakeWorkers(interrupt_after=2)  # reference and seeds measured, then Ctrl-C
    result = _run(tmp_path, "measured", "200", workers)
    assert result.search.stop_reason == "interrupted"
    assert not [r for r in result.measurement.records if r.phase == "confirm"]  # no runs after Ctrl-C
    assert (tmp_path / "out" / "placement.json").exists()
    assert (tmp_path / "out" / "best_placement.json").exists()
    header = (tmp_path / "out" / "report.md").read_text()
    assert f"winner **{'measured' if result.source == 'measured' else 'not measured'}**" in header


class _StubMeasurer:
    """What HybridRounds needs of a PlacementMeasurer (best(), calibration()) and of its
    hybrid reward model (measure_best(), calibrations), in one object."""

    def __init__(self):
        self.rounds_run, self.records, self.phase = 0, [], "search"
        self.calibrations = 0
        self.hybrid = None

    def measure_best(self):
        self.rounds_run += 1
        return 1

    def best(self):
        return None

    def calibration(self):
        return None


def test_hybrid_rounds_follow_the_budget_and_leave_the_search_its_share_of_time():
    from placer.measuring.hybrid_rounds import HybridRounds
    from placer.search.budget import parse_budget
    from placer.search.tracker import SearchProgress

    stub = _StubMeasurer()
    rounds = HybridRounds(stub, parse_budget("60s"), rounds=3, reward_model=stub)
    at = lambda evaluated, wall: SearchProgress(evaluated, wall, 1.0, True, None)  # noqa: E731
    rounds(at(12, 0.5))
    assert stub.rounds_run == 1  # round 0 at once: the seeds calibrate the simulator
    rounds(at(500, 10.0))
    assert stub.rounds_run == 1  # round 1 is due at 1/3 of the budget
    rounds.measuring_s = 15.0  # round 0 took 15 s
    rounds(at(900, 25.0))
    assert stub.rounds_run == 1  # due, but measuring took 15 of 25 s: search on
    rounds(at(1500, 31.0))
    assert stub.rounds_run == 2 and [r["phase"] for r in rounds.log] == ["round 0", "round 1"]
    rounds(at(1500, 45.0))
    assert stub.rounds_run == 2  # no new batch since the last round
    rounds(at(3000, 60.0))
    assert stub.rounds_run == 2  # the budget is spent


def test_hybrid_rounds_under_a_placement_budget_all_run_however_long_measuring_took():
    from placer.measuring.hybrid_rounds import HybridRounds
    from placer.search.budget import parse_budget
    from placer.search.tracker import SearchProgress

    stub = _StubMeasurer()
    rounds = HybridRounds(stub, parse_budget("3000"), rounds=3, reward_model=stub)
    at = lambda evaluated, wall: SearchProgress(evaluated, wall, 1.0, True, None)  # noqa: E731
    rounds(at(12, 0.5))
    rounds.measuring_s = 50.0  # measuring took most of the wall time: a loaded machine
    rounds(at(1000, 60.0))
    rounds(at(2000, 70.0))
    assert stub.rounds_run == 3  # placements, not seconds, decide when a round runs


@pytest.mark.parametrize("kwargs, message", [
    (dict(reward="measured", cluster="4xK40"), "needs real devices"),
    (dict(reward="hybrid", cluster="4xK40"), "needs real devices"),
    (dict(reward="hybrid", devices=DEVICES, agent="sequential"),
     re.escape("sequential agent runs several environments with a simulator each; use --reward measured or "
               "another --agent (moves, hierarchical, reinforce, flat)")),
    (dict(reward="fast", devices=DEVICES), "unknown reward mode"),
])
def test_bad_reward_combinations_are_refused_before_any_work(kwargs, message, fake_links):
    with pytest.raises(OptionError, match=message):
        placer.optimize(MODEL, budget="10", **kwargs)


def test_measuring_an_in_memory_module_is_refused_with_the_way_out():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(OptionError, match="model file or 'zoo:<name>'.*reward 'simulated' or pass measurer="):
        placer.optimize(model, (torch.randn(3, 4),), devices=DEVICES, reward="measured", budget="10")


def test_cli_refuses_measured_reward_on_a_simulated_cluster(capsys):
    from placer.cli.main import main

    code = main(["optimize", MODEL, "--cluster", "4xK40", "--reward", "hybrid", "--budget", "10"])
    assert code != 0
    assert "needs real devices" in capsys.readouterr().err


@pytest.mark.slow
def test_group_placements_are_expanded_and_measured_by_one_real_worker(tmp_path):
    """The single-process path (``--devices cpu,cuda:0``) through a real Measurer: two
    virtual devices of a preset both run on this machine's CPU."""
    from envs.hardware.loading import load_cluster
    from envs.runtime.measure import SingleProcessMeasurer
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare

    prepared = prepare(MODEL, profile=False)
    cluster = load_cluster("4xK40")  # virtual GPUs: each runs on the real device it maps to (the CPU here)
    problem = compile_problem(prepared.grouping.graph, cluster)
    with SingleProcessMeasurer(MODEL, devices=cluster.real_device_map(), warmup=1, repeats=2) as backend:
        pm = PlacementMeasurer(backend, problem, prepared.grouping.expand, "one worker")
        rows = np.stack([np.zeros(problem.num_nodes, dtype=np.int64), np.arange(problem.num_nodes) % 2])
        first = pm.measure_rows(rows)
        again = pm.measure_rows(rows[::-1])
        assert all(r.valid and r.step_time > 0 for r in first)
        assert [a.step_time for a in again] == [f.step_time for f in first[::-1]]
        assert len(pm.records) == 2
        assert pm.requests == 4 and backend.worker_starts == 1


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["measured", "hybrid"])
def test_optimize_cli_on_two_cpu_workers(tmp_path, reward):
    out = tmp_path / "out"
    budget = "24" if reward == "measured" else "20s"
    proc = subprocess.run(
        [sys.executable, "-m", "placer", "optimize", MODEL, "--devices", DEVICES, "--reward", reward,
         "--budget", budget, "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "measurements.json").read_text())
    assert saved["reward"] == reward and saved["measurements"] >= 3
    assert f"reward {reward}:" in proc.stdout
    if reward == "hybrid":
        assert saved["search_calibrations"] >= 1 and (out / "calibration.json").exists()
    placement = json.loads((out / "placement.json").read_text())
    assert placement["metadata"]["source"] == "measured"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reward", ["measured", "hybrid"])
def test_optimize_measures_on_cpu_and_a_gpu(tmp_path, reward):
    result = placer.optimize(MODEL, devices="cpu,cuda:0", reward=reward, budget="16" if reward == "measured" else "20s",
                             out_dir=tmp_path / "out", baselines=BASELINES, progress=False, verbose=0)
    m = result.measurement
    assert m.description.startswith("one worker process") and m.count >= 2
    assert result.source == "measured"
    if reward == "hybrid":
        assert m.search_calibrations >= 1


class _RanksIgnoreTheInput(FakeWorkers):
    """FakeWorkers whose runtime holds the model input on every rank, as the distributed one does."""

    def __init__(self, ignored):
        super().__init__()
        self.ignored_nodes = frozenset(ignored)

    def time_of(self, placement):
        return super().time_of({k: v for k, v in placement.items() if k not in self.ignored_nodes})


def test_rows_that_differ_only_in_an_ignored_group_are_one_program_measured_once():
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare
    from placer.measuring.confirm import confirm_candidates
    from placer.report.compare import Candidate

    prepared = prepare(MODEL, profile=False)
    problem = compile_problem(prepared.grouping.graph, rank_cluster(DEVICES, links=fixed_links(DEVICES)))
    inputs = [op for op in prepared.captured.graph.nodes
              if prepared.captured.graph.nodes[op].get("op") == "placeholder"]
    backend = _RanksIgnoreTheInput(inputs)
    pm = PlacementMeasurer(backend, problem, prepared.grouping.expand, "fake ranks")
    alone = [i for i, g in enumerate(problem.node_names) if g in pm.ignored_nodes]
    assert alone, "rnnlm's input placeholder has a group of its own"
    a = np.zeros(problem.num_nodes, dtype=np.int64)
    a[len(a) // 2:] = 1
    twin = a.copy()
    twin[alone] = 1 - twin[alone]
    other = 1 - a
    first, again = pm.measure_rows(np.stack([a, twin]))
    assert again is first and len(backend.calls) == 1 and pm.lookup(twin) is first
    # The final confirmation measures the fastest distinct programs: the twin is not one.
    cands = [Candidate(method=m, row=r)
             for m, r in (("x", a), ("x twin", twin), ("y", other))]
    confirm_candidates(pm, cands, top=2)
    # a's program twice more and y twice (the confirmation's two runs), the twin never.
    assert len(backend.calls) == 2 and sum(backend.calls.values()) == 5
    assert cands[0].measured_step_time == cands[1].measured_step_time == pm.lookup(a).step_time


class _DriftingWorkers(FakeWorkers):
    """FakeWorkers on a machine that slows down by 10% with every call."""

    def measure(self, placements):
        out = super().measure(placements)
        return [MeasureResult(step_time=r.step_time * 1.1 ** (self.batches - 1)) if r.valid else r for r in out]


def test_the_confirmation_runs_the_leaders_again_beside_the_single_devices_and_keeps_that_runs_figures(tmp_path):
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare
    from placer.measuring.confirm import confirm_candidates, measured_speedups, single_device_rows
    from placer.report.compare import Candidate

    prepared = prepare(MODEL, profile=False)
    problem = compile_problem(prepared.grouping.graph, rank_cluster(DEVICES, links=fixed_links(DEVICES)))
    backend = _DriftingWorkers()
    pm = PlacementMeasurer(backend, problem, prepared.grouping.expand, "fake ranks")
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 2, problem.num_nodes) for _ in range(3)]
    searched = pm.measure_rows(np.stack(rows))  # the search's figures, call 1
    confirm_candidates(pm, [Candidate(method=f"m{i}", row=r) for i, r in enumerate(rows)], top=2,
                       extra_rows=single_device_rows(problem))
    assert backend.batches == 3  # the leaders and the single devices: one call per run, two runs
    leaders = sorted(range(3), key=lambda i: searched[i].step_time)[:2]
    for i in range(3):
        runs = (searched[i].step_time * 1.1, searched[i].step_time * 1.21) if i in leaders else ()
        expected = sum(runs) / 2 if runs else searched[i].step_time
        assert pm.lookup(rows[i]).step_time == pytest.approx(expected)
        if math.isfinite(expected):
            assert pm.lookup(rows[i]).runs == pytest.approx(runs)
    assert len(pm.records) == 3 + 2 * (2 + 2)  # the log keeps every run
    table = pd.DataFrame({"method": ["m0"], "step_time": [pm.lookup(rows[0]).step_time], "source": ["measured"]})
    single = pm.lookup(single_device_rows(problem)[0]).step_time
    assert measured_speedups(table, pm)["speedup_vs_single"][0] == pytest.approx(single / table["step_time"][0])


class _LuckyOnce(FakeWorkers):
    """FakeWorkers that time one placement 20% fast the first time it runs (a lucky run)."""

    def __init__(self, lucky):
        super().__init__()
        self.lucky = tuple(sorted(lucky.items()))

    def measure(self, placements):
        out = super().measure(placements)
        return [MeasureResult(step_time=r.step_time * 0.8)
                if tuple(sorted(p.items())) == self.lucky and self.calls[self.lucky] == 1 else r
                for p, r in zip(placements, out)]


class _Recording(FakeWorkers):
    """FakeWorkers that log the order of the placements of each call."""

    def __init__(self):
        super().__init__()
        self.orders = []

    def measure(self, placements):
        self.orders.append([tuple(sorted(p.items())) for p in placements])
        return super().measure(placements)


def test_the_confirmation_runs_twice_the_second_time_in_reverse_order_and_a_failed_run_invalidates():
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare

    prepared = prepare(MODEL, profile=False)
    problem = compile_problem(prepared.grouping.graph, rank_cluster(DEVICES, links=fixed_links(DEVICES)))
    backend = _Recording()
    pm = PlacementMeasurer(backend, problem, prepared.grouping.expand, "fake ranks")
    rows = np.zeros((2, problem.num_nodes), dtype=np.int64)
    rows[1, -1] = 1
    got = pm.confirm_rows(rows, runs=2)
    assert len(backend.orders) == 2 and backend.orders[1] == backend.orders[0][::-1]
    for rec in got:
        assert len(rec.runs) == 2 and rec.step_time == pytest.approx(sum(rec.runs) / 2)
        assert pm.lookup(rec.row) is rec
    assert len(pm.records) == 4  # each run is in the log; the means are not runs

    class _FailsSecondTime(FakeWorkers):
        def measure(self, placements):
            out = super().measure(placements)
            return [MeasureResult(step_time=math.inf, valid=False, reason="worker died")
                    if self.batches == 2 and i == 0 else r for i, r in enumerate(out)]

    pm = PlacementMeasurer(_FailsSecondTime(), problem, prepared.grouping.expand, "fake ranks")
    first, second = pm.confirm_rows(rows, runs=2)
    # The second run is reversed: its first placement is rows[1].
    assert second.valid is False and second.reason == "worker died" and first.valid
    with pytest.raises(PlacerError, match="at least one run"):
        pm.confirm_rows(rows, runs=0)


def test_the_search_keeps_the_placement_fastest_in_the_confirmation_not_its_luckiest_run():
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare
    from placer.measuring.confirm import confirm_candidates
    from placer.report.compare import Candidate

    prepared = prepare(MODEL, profile=False)
    problem = compile_problem(prepared.grouping.graph, rank_cluster(DEVICES, links=fixed_links(DEVICES)))
    fast, slow = np.zeros(problem.num_nodes, dtype=np.int64), np.zeros(problem.num_nodes, dtype=np.int64)
    fast[-1], slow[-2:] = 1, 1
    expand = prepared.grouping.expand
    backend = _LuckyOnce(expand(problem.array_to_placement(slow)))
    pm = PlacementMeasurer(backend, problem, expand, "fake ranks")
    first_fast, first_slow = pm.measure_rows(np.stack([fast, slow]))
    assert first_slow.step_time < first_fast.step_time  # the lucky run made the slower one the search's best
    search = Candidate(method="placer (moves)", row=slow.copy())
    confirm_candidates(pm, [search], contenders=[fast, slow], search=search)
    assert np.array_equal(search.row, fast)
    assert search.measured_step_time == pm.lookup(fast).step_time < pm.lookup(slow).step_time


class _SecondDeviceAloneIsFaster(FakeWorkers):
    """FakeWorkers where the whole model on cpu:1 runs (and fastest of all), unlike the base's."""

    def time_of(self, placement):
        if set(placement.values()) == {"cpu:1"}:
            return MeasureResult(step_time=1e-3)
        return super().time_of(placement)


def test_single_becomes_the_fastest_single_device_of_the_confirmation():
    """The simulator's fastest single device (cpu:0) ran slower than cpu:1 alone in the final
    run: the row named "single" took cpu:0's figure and lost to a placement that cpu:1 alone beat."""
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare
    from placer.measuring.confirm import confirm_candidates, single_device_rows
    from placer.report.compare import Candidate

    prepared = prepare(MODEL, profile=False)
    problem = compile_problem(prepared.grouping.graph, rank_cluster(DEVICES, links=fixed_links(DEVICES)))
    pm = PlacementMeasurer(_SecondDeviceAloneIsFaster(), problem, prepared.grouping.expand, "fake ranks")
    on0, on1 = single_device_rows(problem)
    single = Candidate(method="single", row=on0.copy())
    other = Candidate(method="m", row=np.concatenate([on0[:-1], on1[-1:]]))
    confirm_candidates(pm, [single, other], extra_rows=single_device_rows(problem), single=single)
    assert np.array_equal(single.row, on1) and single.measured_step_time == pytest.approx(1e-3)
    # Without the single devices in the run there is nothing to choose from: the row stays.
    kept = Candidate(method="single", row=on0.copy())
    confirm_candidates(pm, [kept, other], single=kept)
    assert np.array_equal(kept.row, on0)
