"""Property tests: on random DAGs every baseline either fits memory or says why, and the
baselines' memory model agrees with the simulator's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.sim.simulator import simulate_batch
from placer.search.baselines import BASELINES, run_baseline
from placer.search.baselines.common import device_memory, node_memory
from tests.helpers.arrays import MB, make_problem

pytestmark = pytest.mark.usefixtures("numpy_simulator")


@st.composite
def problems(draw):
    n = draw(st.integers(2, 12))
    edges = sorted({(s, t) for t in range(1, n) for s in draw(st.sets(st.integers(0, t - 1), min_size=1, max_size=2))})
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kinds = draw(st.sampled_from([("K40", "K40"), ("cpu", "K40", "K40"), ("K40",) * 4]))
    times = rng.uniform(1e-5, 1e-3, size=(n, len(kinds)))
    params = rng.uniform(0, 4, size=n) * MB
    problem = make_problem(n, edges, times, kinds=kinds, param_bytes=params, act_bytes=rng.uniform(0, 1, n) * MB,
                           edge_bytes=rng.uniform(1e3, 1e6, size=len(edges)), capacity=1e12)
    # capacities between "nothing fits anywhere" and "everything fits on one device"
    need = node_memory(problem).sum()
    frac = draw(st.floats(0.2, 1.2))
    return make_problem(n, edges, times, kinds=kinds, param_bytes=params, act_bytes=problem.act_bytes,
                        edge_bytes=problem.edge_bytes, capacity=frac * need), seed


FAST = [n for n, b in BASELINES.items() if not b.needs_graph]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_every_baseline_fits_or_says_why(case) -> None:
    problem, seed = case
    for name in FAST:
        res = run_baseline(name, problem, seed=seed % 1000, placements=64)
        if res.placement is None:
            assert res.reason, name
            continue
        sim = simulate_batch(problem, res.placement[None])
        assert sim.fits[0], f"{name}: {sim.peak_memory[0]} > {problem.memory_capacity}"


@settings(max_examples=12, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_memory_model_matches_simulator(case, seed) -> None:
    problem, _ = case
    rows = np.random.default_rng(seed).integers(0, problem.num_devices, size=(8, problem.num_nodes))
    sim = simulate_batch(problem, rows)
    for row, peak in zip(rows, sim.peak_memory):
        assert np.allclose(device_memory(problem, row), peak, rtol=1e-9)
