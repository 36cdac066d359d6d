"""The learned move policy (agent ``moves``): finds what single-move local search cannot, is
deterministic under a seed and a placement budget, and loads on graphs of any size."""

from __future__ import annotations

import numpy as np
import pytest

from envs.sim.simulator import simulate_batch
from placer.search.agents.move_features import move_features
from placer.search.agents.move_policy import MovePolicy
from placer.search.agents.move_start import start_row
from placer.search.agents.registry import DEFAULT_AGENT, get_agent
from placer.search.baselines import run_baseline
from placer.search.local_search import apply_moves, neighbourhood
from placer.search.search import search
from tests.helpers.agents import chain_problem
from tests.helpers.arrays import graph_for, make_problem

GB = 2**30


def swap_trap_problem():
    """Four independent ops on two GPUs whose memory holds exactly two of them each.

    x and v compute 30 ms, y and u 10 ms; x and y need 6 GiB (parameters + gradients), u and v
    4 GiB, each GPU 10.5 GiB. With x and v together (what m_topo gives) the step is 180 ms and
    every single move overfills a GPU; swapping u and v (or x and y) — two coordinated moves of
    ops that share no edge — gives 120 ms.
    """
    times = np.array([0.03, 0.01, 0.01, 0.03])
    params = np.array([6, 6, 4, 4]) * GB / 2
    return make_problem(4, [], times, kinds=("K40", "K40"), param_bytes=params, capacity=10.5 * GB)


def test_move_policy_finds_the_pair_move_that_local_search_cannot_see():
    problem = swap_trap_problem()
    seed = np.asarray(run_baseline("m_topo", problem, graph_for(problem), 0).placement)
    first = simulate_batch(problem, seed[None])
    assert first.fits[0]
    # Proof that single-move local search is stuck: its whole neighbourhood (single moves, edge
    # moves, edge swaps) holds nothing that fits and is faster.
    nodes, devs, _ = neighbourhood(problem, seed)
    around = simulate_batch(problem, apply_moves(seed, nodes, devs))
    assert not np.any(around.fits & (around.step_time < first.step_time[0] * (1 - 1e-6)))
    res = search(problem, agent="moves", budget=256, seed=0, num_envs=32, initial_placements=[seed],
                 local_search=False, patience=None)
    assert res.best_fits
    assert res.best_step_time < first.step_time[0] * 0.75
    assert res.best_phase == "policy_moves"
    assert res.credit() == {"policy_moves": 1.0}


def test_same_seed_and_placement_budget_give_the_same_result():
    problem = chain_problem(12)
    runs = [search(problem, agent="moves", budget=600, seed=3, num_envs=64, patience=None) for _ in range(2)]
    assert runs[0].evaluated == runs[1].evaluated <= 600
    assert runs[0].best_step_time == runs[1].best_step_time
    assert np.array_equal(runs[0].best_row, runs[1].best_row)
    assert [(i.evaluated, i.phase) for i in runs[0].improvements] == [(i.evaluated, i.phase) for i in runs[1].improvements]
    other = search(problem, agent="moves", budget=600, seed=4, num_envs=64, patience=None)
    assert other.evaluated <= 600


def test_a_saved_policy_loads_on_a_graph_of_another_size(tmp_path):
    small, big = chain_problem(8, name="small"), chain_problem(21, name="big")
    path = tmp_path / "moves.pt"
    search(small, agent="moves", budget=300, seed=0, num_envs=32, save_path=path, patience=None)
    policy = MovePolicy.load(path)
    row = start_row(big)
    rng = np.random.default_rng(0)
    from placer.search.agents.move_features import feature_statics

    rows, logp, _ = policy.propose(big, feature_statics(big), row, move_features(big, row), 16, rng)
    assert rows.shape == (16, big.num_nodes) and rows.min() >= 0 and rows.max() < big.num_devices
    assert np.isfinite(logp.detach().numpy()).all()
    # And a search on the bigger graph resumes from it and returns a valid placement.
    res = search(big, agent="moves", budget=200, seed=0, num_envs=32, save_path=path, resume=True, patience=None)
    assert res.best_fits and simulate_batch(big, res.best_row[None]).fits[0]


def test_the_move_policy_is_the_default_agent_and_the_planner_stays_available():
    assert DEFAULT_AGENT == "moves"
    assert get_agent("hierarchical").hierarchical


def test_features_carry_no_size_of_the_graph():
    problem = chain_problem(12)
    row = start_row(problem)
    f = move_features(problem, row)
    assert f.shape == (problem.num_nodes * problem.num_devices, f.shape[1])
    assert np.isfinite(f).all()
    # Every chain op lies on the critical path of a one-device placement.
    assert np.allclose(f.reshape(problem.num_nodes, problem.num_devices, -1)[:, 0, 7], 1.0)


@pytest.mark.parametrize("budget", [1, 5])
def test_tiny_budgets_are_respected(budget):
    res = search(chain_problem(6), agent="moves", budget=budget, seed=0, num_envs=32, patience=None)
    assert res.evaluated <= budget and res.best_row is not None


@pytest.mark.parametrize("budget", ["5s", "200"])
def test_a_search_where_nothing_fits_ends_within_its_budget(budget):
    """Four ops on two GPUs that cannot hold two of them each: no placement fits, and the
    walker, which moves only to a fitting or faster placement, stays where it is; once its 16
    placements are evaluated every proposal repeats one, nothing reached the tracker's budget
    check, and the search ran for ever (under --budget 10s too). It now ends: on its time
    budget, or as exhausted when the policy draws nothing new."""
    import time

    times = np.array([0.03, 0.01, 0.01, 0.03])
    problem = make_problem(4, [], times, kinds=("K40", "K40"), param_bytes=np.full(4, 6 * GB), capacity=10.5 * GB)
    start = time.perf_counter()
    res = search(problem, agent="moves", budget=budget, seed=0, num_envs=8, patience=None)
    assert time.perf_counter() - start < 60
    assert not res.best_fits
    assert res.stop_reason in ("exhausted", "budget_seconds")
