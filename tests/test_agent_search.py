"""search(): budgets, best-so-far on disk, interruption, seeds, heuristic seeds, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from envs.sim.simulator import simulate_batch
from placer.options import OptionError
from placer.search.agents.registry import UnknownAgentError, agent_names, get_agent
from placer.search.config import SearchConfig, SearchError
from placer.search.search import load_policy, search
from placer.search.tracker import SearchProgress
from tests.helpers.agents import chain_problem, heuristics_miss_problem


@pytest.fixture(scope="module")
def problem():
    return chain_problem(12)


@pytest.mark.parametrize("agent", ["hierarchical", "flat", "reinforce"])
def test_budget_by_evaluations_is_respected(problem, agent):
    res = search(problem, agent=agent, budget=300, seed=0, num_envs=64, patience=None)
    assert res.stop_reason == "budget_placements"
    assert 300 - 64 < res.evaluated <= 300
    # The reported best is what the simulator says of the best row.
    sim = simulate_batch(problem, res.best_row[None])
    assert res.best_fits and sim.fits[0]
    assert sim.step_time[0] == pytest.approx(res.best_step_time)
    walls = [h[0] for h in res.history]
    bests = [h[2] for h in res.history]
    assert walls == sorted(walls) and bests == sorted(bests, reverse=True)


def test_interrupted_search_leaves_its_best_on_disk(problem, tmp_path):
    seen: list[SearchProgress] = []

    def interrupt(progress: SearchProgress):
        seen.append(progress)
        if progress.evaluated >= 192:
            raise KeyboardInterrupt

    res = search(problem, agent="hierarchical", budget=10_000, seed=1, num_envs=64, out_dir=tmp_path,
                 callback=interrupt)
    assert res.stop_reason == "interrupted"
    assert res.evaluated == 192 and seen[-1].evaluated == 192
    doc = json.loads((tmp_path / "best_placement.json").read_text())
    assert doc["metadata"]["step_time"] == pytest.approx(res.best_step_time)
    assert doc["devices"] == list(problem.device_names)
    assert doc["assignment"] == problem.array_to_placement(res.best_row)
    assert not list(tmp_path.glob("*.tmp"))
    # The trained policy was saved too and loads back.
    model = load_policy(tmp_path / "policy.zip")
    assert model.policy.hierarchical


def test_a_failing_search_keeps_its_best_and_raises(problem, tmp_path):
    def fail(progress: SearchProgress):
        if progress.evaluated >= 128:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        search(problem, agent="reinforce", budget=1000, seed=0, num_envs=64, out_dir=tmp_path, callback=fail)
    doc = json.loads((tmp_path / "best_placement.json").read_text())
    assert doc["metadata"]["evaluated"] >= 64


def test_same_seed_same_best(problem):
    a = search(problem, agent="hierarchical", budget=256, seed=7, num_envs=64)
    b = search(problem, agent="hierarchical", budget=256, seed=7, num_envs=64)
    assert np.array_equal(a.best_row, b.best_row) and a.best_step_time == b.best_step_time


def test_callback_false_stops_and_plateau_stops(problem):
    res = search(problem, agent="flat", budget=5000, seed=0, num_envs=64, callback=lambda p: p.evaluated < 128)
    assert res.stop_reason == "callback" and res.evaluated == 128
    res = search(problem, agent="reinforce", budget=20_000, seed=0, num_envs=64, patience=64)
    assert res.stop_reason == "plateau" and res.evaluated < 20_000


def test_initial_placements_are_candidates_and_imitated(problem):
    # Everything on one GPU: no transfers, the best this chain can do.
    gpu = problem.device_names.index(next(d for d, k in zip(problem.device_names, problem.device_kinds) if k != "cpu"))
    good = np.full(problem.num_nodes, gpu)
    single = float(simulate_batch(problem, good[None]).step_time[0])
    res = search(problem, agent="hierarchical", budget=200, seed=0, num_envs=64, initial_placements=[good],
                 imitation_steps=30)
    assert res.best_step_time <= single
    assert res.history[0][1] == 1  # the seed placement was the first evaluation
    res = search(problem, agent="reinforce", budget=100, seed=0, num_envs=64,
                 initial_placements=[problem.array_to_placement(good)], imitation_steps=10)
    assert res.best_step_time <= single


def test_bad_arguments_are_refused(problem):
    with pytest.raises(SearchError, match="unknown agent"):
        search(problem, agent="genetic", budget=10)
    with pytest.raises(SearchError, match="num_envs"):
        search(problem, budget=10, num_envs=0)
    with pytest.raises(OptionError):
        search(problem, budget="soon")
    with pytest.raises(SearchError, match="no saved policy"):
        load_policy("/nonexistent/policy.zip")
    assert set(agent_names()) == {"moves", "hierarchical", "reinforce", "flat", "sequential"}
    with pytest.raises(SearchError, match="no_such_option"):
        search(problem, budget=10, no_such_option=1)


def test_an_unknown_agent_name_lists_the_registered_ones():
    with pytest.raises(UnknownAgentError) as info:
        get_agent("genetic")
    assert all(name in str(info.value) for name in agent_names())
    with pytest.raises(SearchError, match="moves, hierarchical, reinforce, flat, sequential"):
        SearchConfig(agent="genetic")


def test_a_config_and_keyword_options_give_the_same_search(problem):
    config = SearchConfig(agent="flat", budget=128, seed=3, num_envs=64)
    a = search(problem, config)
    b = search(problem, agent="flat", budget=128, seed=3, num_envs=64)
    assert np.array_equal(a.best_row, b.best_row) and a.best_step_time == b.best_step_time
    c = search(problem, config, seed=4)  # keyword options override the config's fields
    assert c.evaluated == 128


def test_search_draws_from_its_own_generator_not_numpy_global_state(problem):
    # REINFORCE and the local search draw only from generators seeded by the search's seed:
    # the caller's global numpy stream goes on as if no search had run. (SB3's PPO models
    # reseed the global stream themselves when built with a seed; that is SB3's doing.)
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    res = search(problem, agent="reinforce", budget=256, seed=0, num_envs=64)
    assert res.phase_evaluated.get("local_search", 0) > 0
    assert np.array_equal(np.random.random(3), expected)


def test_sequential_agent_places_whole_graphs(problem, tmp_path):
    res = search(problem, agent="sequential", budget=12, seed=0, num_envs=2, out_dir=tmp_path)
    assert res.stop_reason == "budget_placements" and 10 <= res.evaluated <= 12
    assert res.best_row.shape == (problem.num_nodes,) and res.best_fits
    assert (tmp_path / "best_placement.json").exists()
    assert load_policy(tmp_path / "policy.zip", agent="sequential").policy is not None


def test_on_improve_and_resume(problem, tmp_path):
    improvements = []
    first = search(problem, agent="hierarchical", budget=128, seed=0, num_envs=64, out_dir=tmp_path,
                   on_improve=lambda row, t, n: improvements.append((t, n)))
    assert improvements and improvements[-1][0] == first.best_step_time
    assert [t for t, _ in improvements] == sorted((t for t, _ in improvements), reverse=True)
    saved = load_policy(tmp_path / "policy.zip")
    resumed = search(problem, agent="hierarchical", budget=64, seed=1, num_envs=64, out_dir=tmp_path, resume=True)
    assert resumed.evaluated == 64
    with pytest.raises(SearchError, match="cannot resume"):
        search(problem, agent="hierarchical", budget=64, seed=1, num_envs=64, num_groups=3,
               save_path=tmp_path / "policy.zip", resume=True)
    # The failed resume left the saved policy intact.
    assert load_policy(tmp_path / "policy.zip").policy.net.num_groups == saved.policy.net.num_groups


def test_tensorboard_logs_are_written(problem, tmp_path):
    pytest.importorskip("tensorboard")
    search(problem, agent="hierarchical", budget=128, seed=0, num_envs=64, tensorboard_log=str(tmp_path / "tb"))
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("agent", ["hierarchical", "sequential"])
def test_a_search_without_tensorboard_leaves_nothing_in_the_temporary_directory(problem, tmp_path, monkeypatch, agent):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    search(problem, agent=agent, budget=12, seed=0, num_envs=2, patience=None)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_on_a_terminal_shows_the_best_step_time(problem, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # into a file it redraws every 30 s at most
    search(problem, agent="reinforce", budget=128, seed=0, num_envs=64, progress=True)
    err = capsys.readouterr().err
    assert "best=" in err and "ms" in err


def _heuristic_rows(graph, problem):
    """Every baseline's placement (seed 0) and the best fitting step time among them."""
    from placer.search.baselines import BASELINES, run_baseline

    rows, best = [], np.inf
    for name in BASELINES:
        res = run_baseline(name, problem, graph, 0)
        if res.placement is None:
            continue
        row = np.asarray(res.placement)
        sim = simulate_batch(problem, row[None])
        rows.append(row)
        if sim.fits[0]:
            best = min(best, float(sim.step_time[0]))
    return rows, best


@pytest.mark.parametrize("agent", ["hierarchical", "reinforce"])
def test_search_beats_the_best_heuristic_where_it_is_suboptimal(agent):
    graph, problem = heuristics_miss_problem()
    rows, best_heuristic = _heuristic_rows(graph, problem)
    res = search(problem, agent=agent, budget=1500, seed=0, num_envs=64, initial_placements=rows)
    assert res.best_fits and res.best_step_time < best_heuristic * (1 - 1e-3)
    # Which phase found it is reported, and every evaluation is accounted to one phase.
    assert res.best_phase in ("policy", "local_search")
    assert sum(res.phase_evaluated.values()) == res.evaluated <= 1500
    assert res.phase_evaluated["seeds"] == len(rows) and res.phase_evaluated["local_search"] > 0
    # Deterministic under the seed, local search included.
    again = search(problem, agent=agent, budget=1500, seed=0, num_envs=64, initial_placements=rows)
    assert np.array_equal(again.best_row, res.best_row) and again.phase_evaluated == res.phase_evaluated


@pytest.mark.parametrize("mode, improves", [("hybrid", True), ("measured", False)])
def test_local_search_runs_by_default_where_the_simulator_scores_placements(problem, mode, improves):
    from tests.helpers.measurers import FakeMeasurer

    env_kwargs = {"reward_mode": mode, "measurer": FakeMeasurer(problem, slowdown=(1.0, 2.0))}
    res = search(problem, agent="reinforce", budget=128, seed=0, num_envs=16, env_kwargs=env_kwargs)
    assert res.evaluated == 128
    assert ("local_search" in res.phase_evaluated) is improves


def test_local_search_can_be_switched_off_and_its_share_is_checked(problem):
    res = search(problem, agent="reinforce", budget=256, seed=0, num_envs=64, local_search=False)
    assert res.phase_evaluated == {"policy": 256} and res.best_phase == "policy"
    res = search(problem, agent="reinforce", budget=256, seed=0, num_envs=64, local_search_share=0.75)
    assert res.phase_evaluated == {"policy": 64, "local_search": 192}
    with pytest.raises(SearchError, match="local_search_share"):
        search(problem, agent="reinforce", budget=256, local_search_share=1.5)


@pytest.mark.slow
def test_enumeration_confirms_the_heuristic_gap_and_the_search_finds_the_optimum():
    import itertools

    graph, problem = heuristics_miss_problem()
    every = np.array(list(itertools.product(range(problem.num_devices), repeat=problem.num_nodes)))
    sim = simulate_batch(problem, every)
    optimum = float(np.where(sim.fits, sim.step_time, np.inf).min())
    rows, best_heuristic = _heuristic_rows(graph, problem)
    assert best_heuristic > optimum * 1.01
    res = search(problem, agent="hierarchical", budget=1500, seed=0, num_envs=64, initial_placements=rows)
    assert res.best_step_time == pytest.approx(optimum)


def test_a_recalibrated_reward_rescores_the_incumbent_so_later_placements_compare_on_one_scale(problem, tmp_path):
    from placer.search.tracker import BestTracker

    scale = {"version": 0, "factor": 1.0}
    tracker = BestTracker(problem, budget=100, out_dir=tmp_path)
    tracker.watch_scale(lambda: scale["version"], lambda row: (float(row.sum() + 1) * scale["factor"], True))
    fast = np.zeros((1, problem.num_nodes), dtype=np.int64)
    tracker.record(fast, [1.0], [True], next_batch=1)
    assert tracker.best_step_time == 1.0
    # The simulator learns it was 3x optimistic: the same placement now costs 3 (= (0 + 1) * 3).
    scale.update(version=1, factor=3.0)
    slower = np.ones((1, problem.num_nodes), dtype=np.int64)
    tracker.record(slower, [2.5], [True], next_batch=1)  # priced on the old scale: no better than 1.0
    assert tracker.best_step_time == 3.0 and np.array_equal(tracker.best_row, fast[0])
    # On the new scale 2.5 beats the re-priced incumbent.
    tracker.record(slower, [2.5], [True], next_batch=1)
    assert tracker.best_step_time == 2.5 and np.array_equal(tracker.best_row, slower[0])
    saved = json.loads((tmp_path / "best_placement.json").read_text())
    assert saved["metadata"]["step_time"] == 2.5


def test_hybrid_search_keeps_its_best_on_the_recalibrated_scale(problem):
    from tests.helpers.measurers import FakeMeasurer

    env_kwargs = {"reward_mode": "hybrid", "measurer": FakeMeasurer(problem, slowdown=(1.0, 3.0)),
                  "measure_every": 32, "measure_top_k": 2}
    res = search(problem, agent="reinforce", budget=256, seed=0, num_envs=16, env_kwargs=env_kwargs)
    # A recalibration re-prices the incumbent: the curve then shows a best step time going up.
    times = [t for _, _, t in res.history]
    assert any(b > a for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("agent", ["moves", "hierarchical"])
def test_the_search_runs_its_networks_in_float32_when_the_model_file_set_float64(problem, agent):
    """torch.set_default_dtype(torch.float64) at a model file's import left the policy's networks in
    float64 against float32 features ("mat1 and mat2 must have the same dtype"): a traceback."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = search(problem, agent=agent, budget=24, seed=0, num_envs=2, patience=None)
        assert np.isfinite(result.best_step_time)
        assert torch.get_default_dtype() == torch.float64  # the model file's choice, as it was
    finally:
        torch.set_default_dtype(before)
