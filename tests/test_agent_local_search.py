"""The improvement phase: batched local search around the best placement."""

from __future__ import annotations

import numpy as np
import pytest

from envs.sim.simulator import simulate_batch
from placer.search.local_search import LocalSearch, LocalSearchError, apply_moves, neighbourhood
from placer.search.tracker import BestTracker, StopSearch
from tests.helpers.agents import chain_problem, heuristics_miss_problem


def _evaluate(problem):
    def evaluate(rows):
        sim = simulate_batch(problem, rows)
        return sim.step_time, sim.fits

    return evaluate


def test_neighbourhood_holds_every_single_and_edge_move_once():
    problem = chain_problem(6)
    n, d = problem.num_nodes, problem.num_devices
    row = np.zeros(n, dtype=np.int64)
    nodes, devs, edges = neighbourhood(problem, row)
    singles = nodes[:, 0] == nodes[:, 1]
    # Every node to every other device.
    assert singles.sum() == n * (d - 1)
    assert {(int(a), int(x)) for (a, _), (x, _) in zip(nodes[singles], devs[singles])} == {
        (i, x) for i in range(n) for x in range(1, d)}
    # Both ends of every edge to a device neither is on (device 0 holds both here); no swaps,
    # since no edge crosses devices.
    assert (~singles).sum() == len(edges) * (d - 1)
    rows = apply_moves(row, nodes, devs)
    assert len({r.tobytes() for r in rows}) == len(rows)  # no duplicate neighbour
    assert not any(np.array_equal(r, row) for r in rows)  # no move that changes nothing
    changed = (rows != row).sum(1)
    assert set(changed[singles]) == {1} and set(changed[~singles]) == {2}


def test_neighbourhood_swaps_the_ends_of_crossing_edges():
    problem = chain_problem(4)  # edges 0-1, 1-2, 2-3
    row = np.array([1, 2, 2, 3])
    nodes, devs, _ = neighbourhood(problem, row)
    rows = apply_moves(row, nodes, devs)
    swaps = {tuple(r) for r, (a, b) in zip(rows, devs) if a != b}
    assert swaps == {(2, 1, 2, 3), (1, 2, 3, 2)}  # edges 0-1 and 2-3 cross devices, 1-2 does not
    assert len({r.tobytes() for r in rows}) == len(rows)


def test_local_search_reaches_a_local_optimum_and_counts_every_evaluation():
    _, problem = heuristics_miss_problem()
    tracker = BestTracker(problem, budget=3000)
    start = np.zeros(problem.num_nodes, dtype=np.int64)  # everything on the CPU: slow
    sim0 = simulate_batch(problem, start[None])
    tracker.record(start[None], sim0.step_time, sim0.fits, phase="seeds")
    ls = LocalSearch(problem, _evaluate(problem), tracker, np.random.default_rng(0), chunk=256)
    with pytest.raises(StopSearch):
        ls.run(10_000)
    assert tracker.evaluated == 3000 and ls.stats.evaluated == 2999
    assert tracker.phase_evaluated == {"seeds": 1, "local_search": 2999}
    assert tracker.best_phase == "local_search" and tracker.best_step_time < 0.5 * float(sim0.step_time[0])
    # The incumbent is a local optimum: no single or edge move improves it.
    nodes, devs, _ = neighbourhood(problem, tracker.best_row)
    sim = simulate_batch(problem, apply_moves(tracker.best_row, nodes, devs))
    assert np.all(np.where(sim.fits, sim.step_time, np.inf) >= tracker.best_step_time * (1 - 1e-9))
    assert ls.stats.scans >= 1 and ls.stats.kicks >= 1 and ls.stats.improvements >= 1


def test_same_seed_same_local_search():
    problem = chain_problem(10)
    results = []
    for _ in range(2):
        tracker = BestTracker(problem, budget=500)
        start = np.arange(problem.num_nodes) % problem.num_devices
        sim = simulate_batch(problem, start[None])
        tracker.record(start[None], sim.step_time, sim.fits, phase="seeds")
        ls = LocalSearch(problem, _evaluate(problem), tracker, np.random.default_rng(3), chunk=37)
        with pytest.raises(StopSearch):
            ls.run(1000)
        results.append((tracker.best_row.copy(), tracker.best_step_time, list(tracker.history)))
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert [h[1:] for h in results[0][2]] == [h[1:] for h in results[1][2]]


def test_share_is_checked():
    problem = chain_problem(4)
    with pytest.raises(LocalSearchError, match="share"):
        LocalSearch(problem, _evaluate(problem), BestTracker(problem, budget=10), np.random.default_rng(0),
                    share=1.0)
