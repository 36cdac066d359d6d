"""Reward modes: normalisation, the invalid penalty's bound, measured and hybrid modes with fake measurers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.gym.config import EnvConfigError
from envs.gym.placement_env import PlacementEnv
from envs.gym.reward_modes import make_reward_model
from envs.gym.rewards import INVALID_MARGIN, normalised_reward, serial_time_bound
from envs.gym.sequential_env import SequentialPlacementEnv
from envs.runtime.measurer import MeasureResult
from envs.sim.simulator import simulate_batch
from tests.helpers.measurers import ClosableFake, FakeMeasurer, FakeResult
from tests.helpers.problems import random_problem


def test_normalised_reward():
    r = normalised_reward(np.array([4.0, 1.0, 0.25, np.inf, 1e9, 1.0]),
                          np.array([True, True, True, True, True, False]), 1.0, -5.0)
    np.testing.assert_allclose(r, [-2.0, -1.0, -0.5, -5.0, -5.0 + INVALID_MARGIN, -5.0])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 4))
def test_serial_bound_keeps_penalty_below_every_simulated_reward(seed, d):
    problem = random_problem(n=15, d=d, seed=seed, extra_edges=10)
    model = make_reward_model(problem)
    rows = np.random.default_rng(seed).integers(0, d, size=(64, problem.num_nodes))
    res = simulate_batch(problem, rows)
    assert np.all(res.step_time <= serial_time_bound(problem) * (1 + 1e-9))
    ev = model.evaluate(rows)
    np.testing.assert_allclose(ev.reward[ev.valid], -np.sqrt(res.step_time[ev.valid] / model.reference_time))
    assert np.all(ev.reward[ev.valid] > model.invalid_penalty + INVALID_MARGIN - 1e-12)


def test_reference_as_seconds_or_placement():
    problem = random_problem(n=10, d=3, seed=0)
    row = np.array([0, 1, 2] * 3 + [0])
    t = float(simulate_batch(problem, row[None]).step_time[0])
    by_dict = PlacementEnv(problem, reference=problem.array_to_placement(row), hierarchical=False)
    by_row = PlacementEnv(problem, reference=row, hierarchical=False)
    by_time = PlacementEnv(problem, reference=t, hierarchical=False)
    for env in (by_dict, by_row, by_time):
        assert env.step(np.pad(row, (0, 0)))[1] == pytest.approx(-1.0)
    with pytest.raises(EnvConfigError, match="invalid_penalty"):
        make_reward_model(problem, invalid_penalty=float("nan"))


def test_measured_mode_uses_measurer_and_caches():
    problem = random_problem(n=10, d=3, seed=1)
    meas = FakeMeasurer(problem, slowdown=(1.0, 2.0, 3.0), overhead=1e-3)
    env = PlacementEnv(problem, reward_mode="measured", measurer=meas, hierarchical=False)
    # the reference is measured: the best simulated single device, run for real
    ref_row = env.reward_model.reference_placement
    assert meas.calls[0] == problem.array_to_placement(ref_row)
    t_ref = float(simulate_batch(meas.truth, ref_row[None]).step_time[0]) + 1e-3
    assert env.reward_model.reference_time == pytest.approx(t_ref)
    row = np.array([0, 1, 2, 1, 0, 2, 1, 0, 2, 1])
    _, r, _, _, info = env.step(row)
    t = float(simulate_batch(meas.truth, row[None]).step_time[0]) + 1e-3
    assert info["source"] == "measured" and info["step_time"] == pytest.approx(t)
    assert r == pytest.approx(-math.sqrt(t / t_ref))
    n_calls = len(meas.calls)
    env.step(row)
    assert len(meas.calls) == n_calls  # cached


def test_measured_failures_get_penalty_never_crash():
    problem = random_problem(n=8, d=3, seed=2)
    meas = FakeMeasurer(problem, broken="gpu1", raise_on="gpu0")
    env = PlacementEnv(problem, reward_mode="measured", measurer=meas, hierarchical=False, reference=0.01)
    _, r, _, _, info = env.step(np.full(8, 2))  # gpu1
    assert r == env.reward_model.invalid_penalty and not info["valid"] and "out of memory" in info["reason"]
    _, r, _, _, info = env.step(np.full(8, 1))  # gpu0: the measurer raises
    assert r == env.reward_model.invalid_penalty and "worker died" in info["reason"]
    _, r, _, _, info = env.step(np.zeros(8, dtype=np.int64))
    assert info["valid"] and r > env.reward_model.invalid_penalty
    with pytest.raises(EnvConfigError, match="no single-device placement ran"):
        PlacementEnv(problem, reward_mode="measured", measurer=_AlwaysFails(), hierarchical=False)


class _AlwaysFails(ClosableFake):
    def measure(self, placements):
        return [FakeResult(math.inf, False, "time-out") for _ in placements]


def test_sequential_measured_mode_measures_only_the_final_placement():
    problem = random_problem(n=6, d=2, seed=3)
    meas = FakeMeasurer(problem, slowdown=(1.0, 1.5))
    env = SequentialPlacementEnv(problem, reward_mode="measured", measurer=meas)
    _, start = env.reset()
    before = len(meas.calls)
    total, done, k = 0.0, False, 0
    while not done:
        _, r, done, _, info = env.step(k % 2)  # a mixed placement: not the (cached) reference
        total += r
        k += 1
    assert len(meas.calls) == before + 1 and info["source"] == "measured"
    assert total == pytest.approx(info["score"] - start["score"])


def test_hybrid_recalibrates_from_measurements():
    problem = random_problem(n=12, d=3, seed=4)
    meas = FakeMeasurer(problem, slowdown=(1.0, 3.0, 3.0))  # the gpus are 3x slower than the spec says
    env = PlacementEnv(problem, reward_mode="hybrid", measurer=meas, hierarchical=False, seed=0,
                       measure_every=8, measure_top_k=2)
    model = env.reward_model
    assert meas.calls == []  # the hybrid reference is simulated
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, _, _, _, info = env.step(rng.integers(0, 3, size=12))
        assert info["source"] == "simulated"
    assert len(model.measurements) == 10 and model.calibrations >= 1
    assert model.calibration.compute_scale.max() > 1.3  # learnt that some device is slower than specified
    rows = rng.integers(0, 3, size=(16, 12))
    truth = simulate_batch(meas.truth, rows).step_time
    raw = simulate_batch(problem, rows).step_time
    calibrated = model.simulate(rows).step_time
    assert np.mean(np.abs(calibrated - truth) / truth) < 0.5 * np.mean(np.abs(raw - truth) / truth)
    with pytest.raises(EnvConfigError, match="measurer"):
        PlacementEnv(problem, reward_mode="hybrid")
    with pytest.raises(EnvConfigError, match="measure_every"):
        PlacementEnv(problem, reward_mode="hybrid", measurer=meas, measure_every=0)


class _NoisyProfile(FakeMeasurer):
    """Measures what the uncalibrated simulator says, give or take 10% of noise per run: the
    profile is right, and a fit of its knobs to these runs can only fit the noise."""

    def _one(self, placement):
        self.calls.append(dict(placement))
        row = self.problem.placement_to_array(placement)
        noise = np.random.default_rng(len(self.calls)).normal(0.0, 0.1)
        return MeasureResult(float(simulate_batch(self.problem, row[None]).step_time[0]) * (1.0 + noise))


def test_hybrid_sets_aside_a_fit_that_predicts_left_out_measurements_worse_than_the_profile():
    problem = random_problem(n=12, d=3, seed=4)
    env = PlacementEnv(problem, reward_mode="hybrid", measurer=_NoisyProfile(problem), hierarchical=False,
                       seed=0, measure_every=8, measure_top_k=2)
    model = env.reward_model
    rng = np.random.default_rng(0)
    for _ in range(48):
        env.step(rng.integers(0, 3, size=12))
    assert len(model.measurements) == 12
    assert model.calibrations_set_aside >= 1
    # The rewards stay on the profile's scale: no fit of the noise is in use.
    assert model.calibration is None and model.sim_problem is problem and model.sim_overhead == 0.0
    rows = rng.integers(0, 3, size=(8, 12))
    np.testing.assert_array_equal(model.simulate(rows).step_time, simulate_batch(problem, rows).step_time)


def test_hybrid_takes_a_fit_that_predicts_left_out_measurements_better():
    problem = random_problem(n=12, d=3, seed=4)
    env = PlacementEnv(problem, reward_mode="hybrid", measurer=FakeMeasurer(problem, slowdown=(1.0, 3.0, 3.0)),
                       hierarchical=False, seed=0, measure_every=8, measure_top_k=2)
    rng = np.random.default_rng(0)
    for _ in range(48):
        env.step(rng.integers(0, 3, size=12))
    model = env.reward_model
    assert model.calibrations_set_aside == 0 and model.calibration is not None


def test_hybrid_in_the_batched_vec_env_measures_the_batch_best():
    from envs.gym.vector_env import BatchedPlacementVecEnv

    problem = random_problem(n=10, d=3, seed=6)
    meas = FakeMeasurer(problem, slowdown=(1.0, 2.0, 2.0), overhead=5e-4)
    venv = BatchedPlacementVecEnv(problem, n_envs=16, hierarchical=False, reward_mode="hybrid", measurer=meas,
                                  measure_every=16, measure_top_k=1, seed=0)
    venv.reset()
    rng = np.random.default_rng(1)
    for step in range(4):
        actions = rng.integers(0, 3, size=(16, 10))
        _, rewards, _, infos = venv.step(actions)
        measured_row = venv.env.reward_model.measurements[-1][0]
        valid = [i for i in infos if i["valid"]]
        if step == 0:  # before any calibration, the measured one is the batch's simulated fastest
            best = min(valid, key=lambda i: i["step_time"])
            assert np.array_equal(measured_row, best["placement"])
    model = venv.env.reward_model
    # A fit is used once it can be checked on placements left out of it: four distinct ones.
    assert len(model.measurements) == 4 and len(meas.calls) == 4 and model.calibrations == 1


def test_measured_overhead_does_not_squeeze_the_penalty():
    """Real steps pay overheads the simulator does not see; slow placements must stay distinguishable."""
    problem = random_problem(n=8, d=3, seed=7)
    meas = FakeMeasurer(problem, overhead=1.0)  # every measured step is ~1 s longer than simulated
    env = PlacementEnv(problem, reward_mode="measured", measurer=meas, hierarchical=False)
    assert env.reward_model.invalid_penalty <= -math.sqrt(4.0) - INVALID_MARGIN
    rewards = {env.step(row)[1] for row in np.random.default_rng(0).integers(0, 3, size=(6, 8))}
    assert len(rewards) == 6 and min(rewards) > env.reward_model.invalid_penalty + INVALID_MARGIN


BatchingMeasurer = FakeMeasurer  # one measure() call per batch, new placements only


def test_measured_mode_sends_a_batchs_new_placements_in_one_call_once_each():
    problem = random_problem(n=8, d=3, seed=9)
    meas = BatchingMeasurer(problem)
    env = PlacementEnv(problem, reward_mode="measured", measurer=meas, hierarchical=False)
    rows = np.random.default_rng(2).integers(0, 3, size=(5, 8))
    batch = np.concatenate([rows, rows[:3]])  # repeats within the batch
    first = env.evaluate(batch)
    again = env.evaluate(rows[::-1])
    assert meas.batches[1:] == [5]  # after the reference: one call, five distinct rows, none again
    np.testing.assert_array_equal(again.step_time, first.step_time[:5][::-1])


def test_a_failing_measure_call_makes_its_batch_invalid_not_a_crash():
    problem = random_problem(n=8, d=3, seed=9)
    meas = BatchingMeasurer(problem, raise_on="gpu1")
    env = PlacementEnv(problem, reward_mode="measured", measurer=meas, hierarchical=False, reference=1e-3)
    ev = env.evaluate(np.array([[0] * 8, [2] * 8]))  # the second raises: the call fails for both
    assert not ev.valid.any() and all("worker died" in r for r in ev.reason)


def test_hybrid_rounds_on_demand_measure_the_fastest_distinct_candidates():
    problem = random_problem(n=10, d=3, seed=6)
    meas = BatchingMeasurer(problem, slowdown=(1.0, 2.0, 2.0))
    env = PlacementEnv(problem, reward_mode="hybrid", measurer=meas, hierarchical=False, measure_every=None,
                       measure_top_k=4)
    model = env.reward_model
    rows = np.random.default_rng(3).integers(0, 3, size=(12, 10))
    fastest = rows[np.argsort(model.simulate(rows).step_time)[0]]
    env.evaluate(np.concatenate([np.repeat(fastest[None], 50, axis=0), rows]))
    assert meas.calls == []  # no automatic rounds
    assert model.measure_best() == 4 and meas.batches == [4]  # one call for the round
    measured = {r.tobytes() for r, *_ in model.measurements}
    assert len(measured) == 4 and fastest.tobytes() in measured  # repeats did not crowd the pool
    assert model.calibrations == 1  # four distinct placements: a fit that can be checked


class _InputsEverywhere(FakeMeasurer):
    """A measurer whose runtime ignores where node 0 goes, as the ranks ignore the model inputs."""

    def __init__(self, problem, **kw):
        super().__init__(problem, **kw)
        self.ignored_nodes = frozenset({problem.node_names[0]})


def test_hybrid_rounds_pass_over_a_candidate_that_runs_a_measured_program():
    problem = random_problem(n=10, d=3, seed=6)
    meas = _InputsEverywhere(problem)
    env = PlacementEnv(problem, reward_mode="hybrid", measurer=meas, hierarchical=False, measure_every=None,
                       measure_top_k=3)
    model = env.reward_model
    rows = np.random.default_rng(3).integers(0, 3, size=(12, 10))
    rows[:, 0] = 0
    twins = rows.copy()
    twins[:, 0] = 1  # the same programs, node 0 elsewhere
    env.evaluate(np.concatenate([rows, twins]))
    assert model.measure_best() == 3 and model.measure_best() == 3
    programs = [tuple(r[1:]) for r, *_ in model.measurements]
    assert len(programs) == 6 and len(set(programs)) == 6  # no run spent on a twin
    assert len(meas.calls) == 6
