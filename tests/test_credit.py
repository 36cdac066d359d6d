"""Credit that cannot lie: every improvement of the best placement is attributed to the phase whose
batch produced it, and the shares of the gain over the seeds add up."""

from __future__ import annotations

import math

import numpy as np
import pytest

from placer.search.tracker import BestTracker, Improvement, StopSearch, credit
from tests.helpers.agents import chain_problem


def test_a_scripted_phase_sequence_is_credited_to_the_phases_that_found_each_improvement():
    problem = chain_problem(6)
    tracker = BestTracker(problem, budget=1000, patience=None)
    row = np.zeros(problem.num_nodes, dtype=np.int64)
    script = [("seeds", [12.0, 10.0]), ("policy_moves", [11.0, 8.0]), ("local_search", [9.0]),
              ("local_search", [7.5]), ("policy", [7.6]), ("policy_moves", [6.0, 6.5]), ("local_search", [6.0])]
    for phase, times in script:
        tracker.record(np.repeat(row[None], len(times), axis=0), np.array(times), np.ones(len(times), bool),
                       phase=phase)
    imps = tracker.improvements
    assert [(i.phase, i.before, i.after) for i in imps] == [
        ("seeds", math.inf, 10.0), ("policy_moves", 10.0, 8.0), ("local_search", 8.0, 7.5),
        ("policy_moves", 7.5, 6.0)]
    result = tracker.result("finished")
    assert result.seed_step_time == 10.0
    assert result.gain_over_seeds == pytest.approx(4.0) == pytest.approx(result.seed_step_time - result.best_step_time)
    assert result.credit() == pytest.approx({"policy_moves": 3.5 / 4.0, "local_search": 0.5 / 4.0})
    assert result.policy_share() == pytest.approx(3.5 / 4.0)
    assert result.best_phase == "policy_moves"
    # The curve's improvement points agree with the history.
    assert [i.evaluated for i in imps] == [h[1] for h in result.history[:-1]]


def test_a_first_fitting_placement_gains_nothing_and_no_gain_means_no_credit():
    problem = chain_problem(6)
    tracker = BestTracker(problem, budget=100, patience=None)
    row = np.zeros((1, problem.num_nodes), dtype=np.int64)
    tracker.record(row, np.array([5.0]), np.array([False]), phase="seeds")
    tracker.record(row, np.array([9.0]), np.array([True]), phase="local_search")
    assert [i.gain for i in tracker.improvements] == [0.0, 0.0]
    result = tracker.result("finished")
    assert result.credit() == {} and result.policy_share() is None


def test_credit_is_recorded_even_when_the_budget_stops_the_search():
    problem = chain_problem(6)
    tracker = BestTracker(problem, budget=3, patience=None)
    row = np.zeros((1, problem.num_nodes), dtype=np.int64)
    tracker.record(row, np.array([5.0]), np.array([True]), phase="seeds")
    with pytest.raises(StopSearch):
        tracker.record(np.repeat(row, 2, axis=0), np.array([4.0, 4.5]), np.ones(2, bool), phase="policy_moves")
    assert credit(tracker.improvements) == {"policy_moves": 1.0}
    assert isinstance(tracker.improvements[-1], Improvement)


def test_the_report_shows_each_phase_and_its_share_of_the_gain():
    from placer.report.results import credit_section

    problem = chain_problem(6)
    tracker = BestTracker(problem, budget=100, patience=None)
    row = np.zeros((1, problem.num_nodes), dtype=np.int64)
    for phase, t in (("seeds", 0.010), ("policy_moves", 0.007), ("local_search", 0.006)):
        tracker.record(row, np.array([t]), np.array([True]), phase=phase)
    text = "\n".join(credit_section(tracker.result("finished")))
    assert "## Search credit" in text
    assert "| policy_moves | 1 | 75% |" in text and "| local_search | 1 | 25% |" in text and "| seeds | 1 | — |" in text
    assert "Best seed 10.000 ms → 6.000 ms after the search." in text
    assert credit_section(object()) == []


def test_the_report_does_not_read_a_recalibrated_seed_as_a_search_that_made_things_worse():
    from placer.report.results import credit_section

    problem = chain_problem(6)
    scale = {"version": 0, "factor": 1.0}
    tracker = BestTracker(problem, budget=100, patience=None)
    tracker.watch_scale(lambda: scale["version"], lambda row: (0.010 * scale["factor"], True))
    row = np.zeros((1, problem.num_nodes), dtype=np.int64)
    tracker.record(row, np.array([0.010]), np.array([True]), phase="seeds")
    scale.update(version=1, factor=2.4)  # a recalibration: the same placement now costs 24 ms
    tracker.record(row, np.array([0.030]), np.array([True]), phase="policy_moves")
    result = tracker.result("finished")
    assert result.rescales == 1 and result.best_step_time == pytest.approx(0.024)
    text = "\n".join(credit_section(result))
    assert "Best seed" not in text
    assert "No phase after the seeds improved on the best seed" in text and "24.000 ms" in text
    # An improvement after a recalibration says that its two figures are on different scales.
    tracker.record(row, np.array([0.020]), np.array([True]), phase="local_search")
    assert "recalibrated 1 time(s) in between" in "\n".join(credit_section(tracker.result("finished")))
