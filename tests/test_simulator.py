"""The batched simulator against the event-driven reference, plus its invariants."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.hardware.cluster import Cluster, Device, Link
from envs.hardware.loading import load_cluster
from envs.sim.lower_bound import critical_path_bound, lower_bound, work_bound
from envs.sim.problem import PlacementError, compile_problem
from envs.sim.reference_simulator import simulate_reference
from envs.sim.simulator import HAS_NUMBA, schedule, simulate, simulate_batch
from tests.helpers.graphs import layered_graph, random_cluster, random_dag

BACKENDS = ["numpy", "python"] + (["numba"] if HAS_NUMBA else [])


def _close(a, b, rel=1e-9):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.all(np.abs(a - b) <= rel * np.maximum(np.abs(b), 1e-300) + 1e-18)


case = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 9),  # nodes
    st.floats(0.0, 0.7),  # edge probability
    st.integers(1, 4),  # devices
    st.sampled_from(["sgd", "adam"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_batched_equals_reference(params):
    seed, n, p, d, opt = params
    rng = np.random.default_rng(seed)
    g = random_dag(rng, n, p)
    cluster = random_cluster(rng, d)
    problem = compile_problem(g, cluster, optimizer=opt)
    placements = rng.integers(0, d, size=(8, n))  # 8 >= SCALAR_BELOW: "numpy" runs vectorised
    refs = [simulate_reference(g, cluster, problem.array_to_placement(row), optimizer=opt) for row in placements]
    for backend in BACKENDS:
        res = simulate_batch(problem, placements, backend=backend)
        for b, ref in enumerate(refs):
            assert _close(res.step_time[b], ref.step_time), (backend, b, res.step_time[b], ref.step_time)
            assert _close(res.busy_time[b], ref.busy_time)
            assert _close(res.peak_memory[b], ref.peak_memory)
            assert _close(res.transfer_time[b], ref.transfer_time)
            assert res.fits[b] == ref.fits
            assert _close(res.over_memory[b], ref.over_memory)


@settings(max_examples=20, deadline=None)
@given(case)
def test_single_device_is_sum_of_nodes_and_never_below_bound(params):
    seed, n, p, d, opt = params
    rng = np.random.default_rng(seed)
    problem = compile_problem(random_dag(rng, n, p), random_cluster(rng, d), optimizer=opt)
    bound = lower_bound(problem)
    for dev in range(d):
        res = simulate_batch(problem, np.full((1, n), dev))
        total = problem.fwd_time[:, dev].sum() + problem.bwd_time[:, dev].sum()
        assert math.isclose(res.step_time[0], total, rel_tol=1e-12, abs_tol=1e-18)
        assert res.transfer_time[0] == 0.0 and res.transfer_bytes[0] == 0.0
        assert res.step_time[0] >= bound * (1 - 1e-12)
    placements = rng.integers(0, d, size=(32, n))
    res = simulate_batch(problem, placements)
    assert np.all(res.step_time >= bound * (1 - 1e-12))


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.floats(0.0, 0.8), st.integers(1, 3))
def test_lower_bound_holds_for_every_placement_of_small_graphs(seed, n, p, d):
    # Random placements are rarely near-optimal; enumerating all D**N of them tests the bound
    # where it could break: at the best placement.
    rng = np.random.default_rng(seed)
    problem = compile_problem(random_dag(rng, n, p), random_cluster(rng, d))
    every = np.array(np.meshgrid(*[np.arange(d)] * n, indexing="ij")).reshape(n, -1).T
    best = simulate_batch(problem, every).step_time.min()
    assert best >= lower_bound(problem) * (1 - 1e-12)
    if d == 1:  # one device: the work bound is exact
        assert lower_bound(problem) == pytest.approx(best, rel=1e-12, abs=1e-18)


def test_backends_agree_on_a_large_graph():
    problem = compile_problem(layered_graph(300, seed=3), load_cluster("4xK40"))
    # 61 rows: numba's threaded kernel (>= SERIAL_BELOW) with a short last group of lanes.
    placements = np.random.default_rng(0).integers(0, problem.num_devices, size=(61, problem.num_nodes))
    results = [simulate_batch(problem, placements, backend=b) for b in BACKENDS]
    results.append(simulate_batch(problem, placements[:3], backend="numpy"))  # small batch: scalar loop
    if HAS_NUMBA:
        results.append(simulate_batch(problem, placements[:5], backend="numba"))  # one thread, padded group
        results.append(simulate_batch(problem, placements[:2], backend="numba"))  # one placement at a time
    for other in results[1:]:
        rows = len(other.step_time)
        for field in ("step_time", "peak_memory", "busy_time", "transfer_time", "transfer_bytes"):
            assert np.array_equal(getattr(results[0], field)[:rows], getattr(other, field)), field
    # Spot-check against the oracle too.
    g = layered_graph(300, seed=3)
    ref = simulate_reference(g, "4xK40", problem.array_to_placement(placements[5]))
    assert _close(results[0].step_time[5], ref.step_time)


def _two_gpu_cluster(capacity: int = 10**9) -> Cluster:
    devs = (Device("a", "V100", capacity, 1e13, 1e12), Device("b", "V100", capacity, 1e13, 1e12))
    return Cluster("pair", devs, (Link("a", "b", 1e-5, 1e9),))


def _chain(times: list[tuple[float, float]], out_bytes: list[int], param_bytes: list[int], edge_bytes: list[int]):
    g = nx.DiGraph(name="chain")
    for i, ((f, b), o, p) in enumerate(zip(times, out_bytes, param_bytes)):
        g.add_node(f"x{i}", op="call_module", out_bytes=o, param_bytes=p, requires_grad=True,
                   fwd_time={"cpu": f}, bwd_time={"cpu": b}, opt_time={"cpu": 0.0}, flops=0, bytes_moved=0)
    for i, e in enumerate(edge_bytes):
        g.add_edge(f"x{i}", f"x{i + 1}", bytes=e)
    return g


def _cpu_pair(capacity: int = 10**9) -> Cluster:
    devs = (Device("a", "cpu", capacity, 1e12, 1e11), Device("b", "cpu", capacity, 1e12, 1e11))
    return Cluster("cpus", devs, (Link("a", "b", 1e-5, 1e9),))


def test_hand_checked_chain_time_and_memory():
    # x0 -> x1 -> x2; x0, x1 on a, x2 on b; adam keeps 2 state bytes per parameter byte.
    g = _chain([(1e-3, 2e-3), (2e-3, 4e-3), (3e-3, 6e-3)], [100, 200, 300], [1000, 0, 50], [100, 200])
    problem = compile_problem(g, _cpu_pair(), optimizer="adam")
    res = simulate(problem, {"x0": "a", "x1": "a", "x2": "b"})
    xfer = 1e-5 + 200 / 1e9
    assert math.isclose(res.step_time, 1e-3 + 2e-3 + xfer + 3e-3 + 6e-3 + xfer + 4e-3 + 2e-3, rel_tol=1e-12)
    # a: params 1000 * (1 + 1 grad + 2 adam) + activations 100 + 200; b: 50 * 4 + 300 + received 200
    assert res.peak_memory.tolist() == [4000 + 300, 200 + 300 + 200]
    assert np.allclose(res.busy_time, [9e-3, 9e-3])
    assert math.isclose(res.transfer_time, 2 * xfer) and res.transfer_bytes == 400
    ref = simulate_reference(g, _cpu_pair(), {"x0": "a", "x1": "a", "x2": "b"}, optimizer="adam")
    assert ref.peak_memory.tolist() == res.peak_memory.tolist()


def test_memory_of_a_diamond_with_a_non_grad_input():
    g = nx.DiGraph(name="diamond")
    g.add_node("x", op="placeholder", out_bytes=64, requires_grad=False, fwd_time={"cpu": 0.0})
    g.add_node("w", op="get_attr", out_bytes=400, param_bytes=400, requires_grad=True)
    g.add_node("m", op="call_function", out_bytes=32, requires_grad=True, fwd_time={"cpu": 1e-3}, bwd_time={"cpu": 1e-3})
    g.add_node("out", op="output", out_bytes=32, requires_grad=True)
    g.add_edges_from([("x", "m", {"bytes": 64}), ("w", "m", {"bytes": 400}), ("m", "out", {"bytes": 32})])
    problem = compile_problem(g, _cpu_pair(), optimizer="sgd")
    res = simulate(problem, {"x": "a", "w": "b", "m": "a", "out": "a"})
    # a: activation of m (32) + received weight copy (400); b: the parameter and its gradient.
    assert res.peak_memory.tolist() == [432, 800]
    # x has no backward; only w <- m carries a gradient back.
    assert res.transfer_bytes == 800


def test_not_fitting_is_reported_not_raised():
    g = _chain([(1e-3, 1e-3), (1e-3, 1e-3)], [10, 10], [600, 600], [10])
    problem = compile_problem(g, _cpu_pair(capacity=2000), optimizer="sgd")
    both_a = simulate(problem, {"x0": "a", "x1": "a"})
    assert not both_a.fits
    assert both_a.over_memory.tolist() == [2420 - 2000, 0]
    split = simulate(problem, {"x0": "a", "x1": "b"})
    assert split.fits and split.over_memory.tolist() == [0, 0]
    assert both_a.memory_problems(problem.device_names) == [f"a: {2420 / 2**30:.2f} GiB needed, {420 / 2**30:.2f} GiB over"]
    assert "does not fit (a: " in both_a.describe(problem.device_names)
    assert split.describe(problem.device_names).startswith("step 4.020 ms, fits")  # 4 ops + 2 copies of 10 us


def test_transfers_overlap_compute_and_channels_serialise():
    # a0 and a1 on device a both feed b2 on device b; the two copies share channel a->b.
    g = nx.DiGraph(name="fan-in")
    for name, t in (("a0", 1e-3), ("a1", 1e-3), ("b2", 1e-3)):
        g.add_node(name, op="call_function", out_bytes=0, requires_grad=False, fwd_time={"cpu": t})
    g.add_edge("a0", "b2", bytes=10**6)
    g.add_edge("a1", "b2", bytes=10**6)
    problem = compile_problem(g, _cpu_pair())
    sched = schedule(problem, {"a0": "a", "a1": "a", "b2": "b"})
    copy = 1e-5 + 10**6 / 1e9
    e0 = problem.edge_src.tolist().index(problem.node_index("a0"))
    e1 = problem.edge_src.tolist().index(problem.node_index("a1"))
    # The first copy runs while a1 computes (overlap); the second waits for a1.
    assert sched.fwd_xfer_start[e0] == pytest.approx(1e-3)
    assert sched.fwd_xfer_start[e1] == pytest.approx(max(2e-3, 1e-3 + copy))
    assert sched.result.step_time == pytest.approx(sched.fwd_xfer_end[e1] + 1e-3)


def test_bad_placements_raise_placement_error():
    problem = compile_problem(layered_graph(5), _cpu_pair())
    with pytest.raises(PlacementError, match="unknown device 'c'"):
        simulate(problem, {**{n: "a" for n in problem.node_names}, "n0": "c"})
    with pytest.raises(PlacementError, match="misses 1 of 5 nodes"):
        simulate(problem, {n: "a" for n in problem.node_names[:-1]})
    with pytest.raises(PlacementError, match="shape"):
        simulate_batch(problem, np.zeros((2, 4), dtype=int))
    with pytest.raises(PlacementError, match="valid indices are 0..1"):
        simulate_batch(problem, np.full((2, 5), 2))
    with pytest.raises(PlacementError):
        simulate_reference(layered_graph(5), _cpu_pair(), {"n0": "a"})


def test_lower_bound_parts_on_identical_devices():
    problem = compile_problem(layered_graph(40, seed=1, profiled_kinds=("cpu",)), _cpu_pair())
    total = (problem.fwd_time[:, 0] + problem.bwd_time[:, 0]).sum()
    assert work_bound(problem) == pytest.approx(total / 2, rel=1e-9)
    assert critical_path_bound(problem) <= total
    assert lower_bound(problem) == max(work_bound(problem), critical_path_bound(problem))


def test_gantt_rows_and_png(tmp_path):
    from placer.report.gantt import gantt_rows, plot_gantt

    problem = compile_problem(layered_graph(25, seed=4), "4xK40")
    row = np.random.default_rng(1).integers(0, problem.num_devices, size=problem.num_nodes)
    sched = schedule(problem, row)
    rows = gantt_rows(problem, sched)
    labels = [label for label, _ in rows]
    assert labels[:5] == list(problem.device_names)
    forward_bars = sum(len(bars["forward"]) for _, bars in rows[:5])
    assert forward_bars == int(np.count_nonzero(problem.fwd_time[np.arange(problem.num_nodes), row] > 0))
    cut = row[problem.edge_src] != row[problem.edge_dst]
    assert sum(len(bars.get("copy", [])) for _, bars in rows[5:]) == int(cut.sum())
    # Every op ends no later than the step, and each device's ops never overlap.
    assert np.nanmax(sched.bwd_end) <= sched.result.step_time + 1e-15
    for _, bars in rows[:5]:
        spans = sorted(bars["forward"] + bars["backward"])
        assert all(s1 >= s0 + w0 - 1e-9 for (s0, w0), (s1, _) in zip(spans, spans[1:]))
    out = plot_gantt(problem, row, tmp_path / "step.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_work_bound_is_close_to_the_lp_optimum_and_never_above():
    from scipy.optimize import linprog

    for seed in range(8):
        rng = np.random.default_rng(seed)
        problem = compile_problem(random_dag(rng, 12, 0.3), random_cluster(rng, 3))
        times = problem.fwd_time + np.where(problem.requires_grad[:, None], problem.bwd_time, 0.0)
        n, d = times.shape
        # min T  s.t. sum_d x[i,d] = 1, sum_i x[i,d] t[i,d] <= T  (variables x row-major, then T)
        a_ub = np.zeros((d, n * d + 1))
        for j in range(d):
            a_ub[j, j:n * d:d] = times[:, j]
            a_ub[j, -1] = -1.0
        a_eq = np.zeros((n, n * d + 1))
        for i in range(n):
            a_eq[i, i * d:(i + 1) * d] = 1.0
        cost = np.zeros(n * d + 1)
        cost[-1] = 1.0
        optimum = linprog(cost, A_ub=a_ub, b_ub=np.zeros(d), A_eq=a_eq, b_eq=np.ones(n), method="highs").fun
        bound = work_bound(problem)
        assert bound <= optimum * (1 + 1e-9)
        assert bound >= 0.97 * optimum


_THREADS_SCRIPT = """
import glob, numpy as np, numba
from envs.hardware.loading import load_cluster
from envs.sim.problem import compile_problem
from envs.sim.simulator import SERIAL_BELOW, simulate_batch
from tests.helpers.graphs import layered_graph

def ticks():
    out = {}
    for path in glob.glob('/proc/self/task/*/stat'):
        fields = open(path).read().rsplit(')', 1)[1].split()
        out[path] = int(fields[11]) + int(fields[12])  # utime + stime of the thread
    return out

problem = compile_problem(layered_graph(400, seed=1), load_cluster('4xK40'))
rows = np.random.default_rng(0).integers(0, 4, size=(2048, 400))
simulate_batch(problem, rows[:SERIAL_BELOW - 1], backend='numba')  # the one-thread kernel first
simulate_batch(problem, rows, backend='numba')
before = ticks()
for _ in range(3):
    simulate_batch(problem, rows, backend='numba')
after = ticks()
print(sum(1 for k in after if after[k] - before.get(k, 0) > 0))
"""


@pytest.mark.skipif(not HAS_NUMBA or not os.path.exists("/proc/self/task"), reason="needs numba and Linux /proc")
def test_threaded_kernel_uses_several_threads_after_the_serial_one_was_cached(tmp_path):
    # Regression: numba's disk cache keyed the serial and the parallel compilation of one
    # function alike, so whichever was cached first served both and large batches ran on
    # one thread. A fresh cache, the serial kernel first, then a large batch on 2 threads.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) >= 2, out.stdout


@pytest.mark.parametrize("field", ["fwd_time", "bwd_time"])
def test_negative_or_nan_times_are_a_clear_error(field):
    import dataclasses

    problem = compile_problem(layered_graph(6, seed=2), load_cluster("4xK40"))
    for bad in (-1e-3, float("nan")):
        values = getattr(problem, field).copy()
        values[2, 1] = bad
        broken = dataclasses.replace(problem, **{field: values})
        for backend in BACKENDS:
            with pytest.raises(PlacementError, match=field):
                simulate_batch(broken, np.zeros((1, 6), dtype=int), backend=backend)


def test_more_than_256_devices_match_the_numpy_path():
    # Device indices above 255 take the kernel's wide row type (uint8 holds up to 256 devices).
    from envs.hardware.cluster import make_cluster

    devices = [Device(f"g{i}", "V100", 10**9, 1e13, 1e12) for i in range(300)]
    cluster = make_cluster(devices, default_link=(1e-5, 1e10))
    problem = compile_problem(layered_graph(40, seed=4), cluster)
    rows = np.random.default_rng(1).integers(0, 300, size=(40, 40))
    rows[:, :3] = [299, 256, 255]
    results = [simulate_batch(problem, rows, backend=b) for b in BACKENDS]
    for other in results[1:]:
        for field in ("step_time", "peak_memory", "busy_time", "transfer_time", "transfer_bytes"):
            assert np.array_equal(getattr(results[0], field), getattr(other, field)), field
    assert np.all(results[0].transfer_bytes > 0)
