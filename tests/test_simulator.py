"""The op-level simulator: every batched path against the reference oracle, plus the rules'
consequences (issue 15): wavefront, CPU ops delaying launches, one host thread."""

from __future__ import annotations

import dataclasses
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
from envs.sim.cost_model import CostModel, HostOverheads
from envs.sim.lower_bound import critical_path_bound, host_bound, lower_bound, work_bound
from envs.sim.problem import PlacementError
from envs.sim.problem_compile import compile_problem
from envs.sim.reference_simulator import ReferenceTrace, simulate_reference
from envs.sim.simulator import HAS_NUMBA, schedule, simulate, simulate_batch, simulate_ops
from graphs.grouping import Grouping, build_group_graph
from tests.helpers.graphs import layered_graph, random_cluster, random_dag

BACKENDS = ["numpy", "python"] + (["numba"] if HAS_NUMBA else [])
FIELDS = ("step_time", "peak_memory", "busy_time", "transfer_time", "transfer_bytes", "fits")


def _close(a, b, rel=1e-9):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.all(np.abs(a - b) <= rel * np.maximum(np.abs(b), 1e-300) + 1e-18)


def _random_grouping(rng: np.random.Generator, graph: nx.DiGraph, problem) -> Grouping:
    """Groups = consecutive runs of the topological order (a quotient that is always a DAG)."""
    order = list(problem.ops.names)
    cuts = sorted(set(rng.integers(1, max(len(order), 2), size=int(rng.integers(0, len(order))))))
    bounds = [0, *[c for c in cuts if c < len(order)], len(order)]
    groups = {f"g{k}": order[a:b] for k, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a}
    op_to_group = {op: g for g, members in groups.items() for op in members}
    return Grouping(graph=build_group_graph(graph, groups, op_to_group), op_to_group=op_to_group, groups=groups)


def _with_costs(problem, cost: np.ndarray, host: HostOverheads | None = None):
    """``problem`` with its op costs (and fixed host costs) replaced."""
    ops = dataclasses.replace(problem.ops, cost=np.ascontiguousarray(cost), host=host or problem.ops.host)
    return dataclasses.replace(problem, ops=ops, _index={})


case = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 9),  # ops
    st.floats(0.0, 0.7),  # edge probability
    st.integers(1, 4),  # devices (device 0 is a CPU)
    st.sampled_from(["sgd", "adam"]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_every_backend_equals_the_reference(params):
    seed, n, p, d, opt = params
    rng = np.random.default_rng(seed)
    g = random_dag(rng, n, p)
    cluster = random_cluster(rng, d)
    problem = compile_problem(g, cluster, optimizer=opt)
    placements = rng.integers(0, d, size=(8, n))
    refs = [simulate_reference(g, cluster, problem.array_to_placement(row), optimizer=opt) for row in placements]
    results = [simulate_batch(problem, placements, backend=backend) for backend in BACKENDS]
    for res in results:
        for b, ref in enumerate(refs):
            assert _close(res.step_time[b], ref.step_time), (b, res.step_time[b], ref.step_time)
            assert _close(res.busy_time[b], ref.busy_time)
            assert _close(res.peak_memory[b], ref.peak_memory)
            assert _close(res.transfer_time[b], ref.transfer_time)
            assert _close(res.transfer_bytes[b], ref.transfer_bytes)
            assert res.fits[b] == ref.fits
            assert _close(res.over_memory[b], ref.over_memory)
    for res in results[1:]:  # the batched paths agree bit for bit
        for field in FIELDS + ("certified",):
            assert np.array_equal(getattr(results[0], field), getattr(res, field)), field


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.integers(2, 5))
def test_the_certified_fast_pass_equals_the_exact_engine(seed, n, d):
    from envs.sim import simulator as sim
    from envs.sim.loop_arrays import loop_arrays

    rng = np.random.default_rng(seed)
    problem = compile_problem(random_dag(rng, n, 0.3), random_cluster(rng, d))
    a = loop_arrays(problem)
    rows = np.ascontiguousarray(rng.integers(0, d, size=(16, n)), dtype=np.int32)
    fast = sim._simulate_python(a, rows, a.op_group)
    exact = sim._simulate_python(a, rows, a.op_group, force_events=True)
    for k in (0, 1, 3):  # step, received bytes, copy bytes
        assert np.array_equal(fast[k], exact[k])
    assert _close(fast[2], exact[2])  # copy seconds: summed in the engine's order


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.integers(2, 14), st.integers(1, 4))
def test_a_group_placement_gives_the_step_of_its_op_placement(seed, n, d):
    rng = np.random.default_rng(seed)
    g = random_dag(rng, n, 0.35)
    cluster = random_cluster(rng, d)
    ungrouped = compile_problem(g, cluster)
    grouping = _random_grouping(rng, g, ungrouped)
    grouped = compile_problem(g, cluster, grouping=grouping)
    assert grouped.node_names == tuple(f"g{k}" for k in range(len(grouping.groups)))
    rows = rng.integers(0, d, size=(6, grouped.num_nodes))
    op_rows = grouped.ops.expand(rows)
    by_group = simulate_batch(grouped, rows)
    by_op = simulate_ops(grouped, op_rows)
    same_problem_ops = simulate_batch(ungrouped, op_rows)
    for field in FIELDS:
        # Busy time and memory sum per group then per device (or per op): equal up to rounding.
        same = np.allclose if field in ("busy_time", "peak_memory") else np.array_equal
        assert same(getattr(by_group, field), getattr(by_op, field)), field
        assert same(getattr(by_group, field), getattr(same_problem_ops, field)), field
    # The group arrays are sums of their ops' (the readers of fwd_time/bwd_time keep their meaning).
    assert np.allclose(grouped.fwd_time.sum(axis=0), ungrouped.fwd_time.sum(axis=0))
    assert np.allclose(grouped.bwd_time.sum(axis=0), ungrouped.bwd_time.sum(axis=0))
    named = grouping.expand({f"g{k}": cluster.device_names[int(v)] for k, v in enumerate(rows[0])})
    assert simulate_ops(grouped, named).step_time[0] == by_group.step_time[0]


@settings(max_examples=20, deadline=None)
@given(case)
def test_one_device_costs_the_sum_of_its_ops_plus_dispatch(params):
    seed, n, p, d, opt = params
    rng = np.random.default_rng(seed)
    problem = compile_problem(random_dag(rng, n, p), random_cluster(rng, d), optimizer=opt)
    host = problem.ops.host
    fixed = host.loss_s + host.backward_call_s + host.step_s
    cost = problem.ops.cost
    # The CPU (device 0): everything runs on the host thread, one op after the other.
    res = simulate_batch(problem, np.zeros((1, n), dtype=int))
    assert math.isclose(res.step_time[0], cost[:, 0, :].sum() + fixed, rel_tol=1e-12, abs_tol=1e-18)
    assert res.transfer_time[0] == 0.0 and res.transfer_bytes[0] == 0.0
    for dev in range(1, d):
        # A GPU whose ops cost nothing on the host: the stream's work.
        device_only = cost.copy()
        device_only[:, :, 0::2] = 0.0
        one = simulate_batch(_with_costs(problem, device_only, HostOverheads(0.0, 0.0, 0.0, 0.0)), np.full((1, n), dev))
        assert math.isclose(one.step_time[0], device_only[:, dev, :].sum(), rel_tol=1e-12, abs_tol=1e-18)
        # Costs only on the host: the host thread's (and one engine thread's) serial work.
        host_only = cost.copy()
        host_only[:, :, 1::2] = 0.0
        one = simulate_batch(_with_costs(problem, host_only), np.full((1, n), dev))
        assert math.isclose(one.step_time[0], host_only[:, dev, :].sum() + fixed, rel_tol=1e-12, abs_tol=1e-18)


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
    assert best >= host_bound(problem) * (1 - 1e-12)
    if d == 1:  # one CPU: the host bound is exact
        assert lower_bound(problem) == pytest.approx(best, rel=1e-12, abs=1e-18)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.integers(2, 5))
def test_lower_bound_never_above_a_simulated_step(seed, n, d):
    rng = np.random.default_rng(seed)
    problem = compile_problem(random_dag(rng, n, 0.2), random_cluster(rng, d))
    rows = rng.integers(0, d, size=(64, n))
    assert simulate_batch(problem, rows).step_time.min() >= lower_bound(problem) * (1 - 1e-12)


def test_backends_agree_on_a_large_graph():
    problem = compile_problem(layered_graph(300, seed=3), load_cluster("4xK40"))
    # 61 rows: numba's threaded driver (>= SERIAL_BELOW); 5 and 2 rows: the serial one.
    placements = np.random.default_rng(0).integers(0, problem.num_devices, size=(61, problem.num_nodes))
    results = [simulate_batch(problem, placements, backend=b) for b in BACKENDS]
    if HAS_NUMBA:
        results.append(simulate_batch(problem, placements[:5], backend="numba"))
        results.append(simulate_batch(problem, placements[:2], backend="numba"))
    for other in results[1:]:
        rows = len(other.step_time)
        for field in FIELDS:
            assert np.array_equal(getattr(results[0], field)[:rows], getattr(other, field)), field
    g = layered_graph(300, seed=3)
    ref = simulate_reference(g, "4xK40", problem.array_to_placement(placements[5]))
    assert _close(results[0].step_time[5], ref.step_time)


# ----------------------------------------------------------------------------- the rules' consequences


def _gpus(k: int = 2, kind: str = "V100", link=(1e-5, 1e10)) -> Cluster:
    devs = tuple(Device(f"gpu{i}", kind, 16 * 2**30, 1e13, 1e12) for i in range(k))
    links = tuple(Link(a.name, b.name, *link) for a in devs for b in devs if a.name < b.name)
    return Cluster("gpus", devs, links)


def _with_cpu(k: int = 2) -> Cluster:
    cpu = Device("cpu", "cpu", 16 * 2**30, 1e11, 2e10)
    gpus = _gpus(k)
    links = gpus.links + tuple(Link("cpu", g.name, 1e-5, 1e10) for g in gpus.devices)
    return Cluster("cpu+gpus", (cpu,) + gpus.devices, links)


def _unrolled_lstm(steps: int, time_major: bool = True, flops: float = 4e9) -> nx.DiGraph:
    """Two LSTM layers unrolled over ``steps``; cell(l, t) reads cell(l, t-1) and cell(l-1, t).
    Program order time-major (both layers inside the time loop, as the zoo NMT decoder) or
    layer-major (all steps of layer 1, then layer 2, as the zoo RNNLM)."""
    g = nx.DiGraph(name="lstm2")
    g.add_node("x", op="placeholder", out_bytes=4096, requires_grad=False)
    order = ([(layer, t) for t in range(steps) for layer in (1, 2)] if time_major
             else [(layer, t) for layer in (1, 2) for t in range(steps)])
    for layer, t in order:
        g.add_node(f"l{layer}_{t}", op="call_module", flops=flops, bytes_moved=10**6, out_bytes=65536,
                   param_bytes=0, requires_grad=True)
    for layer, t in order:
        g.add_edge(f"l{layer - 1}_{t}" if layer > 1 else "x", f"l{layer}_{t}", bytes=65536)
        if t:
            g.add_edge(f"l{layer}_{t - 1}", f"l{layer}_{t}", bytes=65536)
    g.add_node("output", op="output", requires_grad=False)
    g.add_edge(f"l2_{steps - 1}", "output", bytes=65536)
    return g


def _by_layer(g: nx.DiGraph) -> dict[str, str]:
    return {v: ("gpu1" if v.startswith("l2") or v == "output" else "gpu0") for v in g.nodes}


def test_an_unrolled_two_layer_lstm_on_two_gpus_shows_the_wavefront():
    steps = 20
    g = _unrolled_lstm(steps, time_major=True)
    cluster = _gpus(2)
    layers = _by_layer(g)
    problem = compile_problem(g, cluster)
    split = schedule(problem, layers)
    serial = simulate(problem, {v: "gpu0" for v in g.nodes}).step_time
    idx = {name: i for i, name in enumerate(problem.ops.names)}
    # Layer 2 step 0 runs on gpu1 long before layer 1 has finished its last step on gpu0,
    # in the forward and in the backward (one engine thread per GPU).
    assert split.fwd_end[idx["l2_0"]] < split.fwd_start[idx[f"l1_{steps - 1}"]]
    assert split.bwd_end[idx[f"l2_{steps - 1}"]] < split.bwd_start[idx["l1_0"]]
    assert split.bwd_start[idx["l1_10"]] < split.bwd_end[idx["l2_0"]]
    assert split.result.step_time < 0.6 * serial
    assert _close(split.result.step_time, simulate_reference(g, cluster, layers).step_time)
    # Grouped as the grouping would (each layer one group): the same wavefront.
    groups = {"g0": ["x"] + [f"l1_{t}" for t in range(steps)], "g1": [f"l2_{t}" for t in range(steps)] + ["output"]}
    op_to_group = {op: grp for grp, members in groups.items() for op in members}
    grouped = compile_problem(g, cluster, grouping=Grouping(build_group_graph(g, groups, op_to_group),
                                                            op_to_group, groups))
    assert simulate(grouped, {"g0": "gpu0", "g1": "gpu1"}).step_time == split.result.step_time
    # Two CPU devices in one process share the host thread: no overlap at all.
    cpus = Cluster("cpus", (Device("c0", "cpu", 2**34, 1e11, 2e10), Device("c1", "cpu", 2**34, 1e11, 2e10)),
                   (Link("c0", "c1", 1e-5, 1e9),))
    on_cpus = compile_problem(g, cpus)
    split_cpu = simulate(on_cpus, {v: ("c1" if d == "gpu1" else "c0") for v, d in layers.items()})
    one_cpu = simulate(on_cpus, {v: "c0" for v in g.nodes})
    host = on_cpus.ops.host
    copies = len({u for u, v in g.edges if layers[u] != layers[v]})  # one copy per (producer, device)
    assert split_cpu.step_time == pytest.approx(one_cpu.step_time + 2 * copies * host.copy_s, rel=1e-12)


def test_layer_major_program_order_serialises_on_the_default_stream():
    # All of layer 1 is issued before layer 2: every copy's two-way barrier (Copy.cu) queues
    # gpu1's stream behind the last copy, and in the backward gpu1's thread launches all of
    # layer 2 before the gradient copies. PyTorch's default-stream semantics: no wavefront.
    g = _unrolled_lstm(20, time_major=False)
    problem = compile_problem(g, _gpus(2))
    serial = simulate(problem, {v: "gpu0" for v in g.nodes}).step_time
    assert simulate(problem, _by_layer(g)).step_time >= serial


def test_a_cpu_op_delays_the_gpu_launches_behind_it():
    g = nx.DiGraph(name="cpu-between")
    g.add_node("a", op="call_function", flops=1e9, bytes_moved=10**6, out_bytes=1024, requires_grad=True)
    g.add_node("c", op="call_function", fwd_time={"cpu": 5e-3}, bwd_time={"cpu": 1e-3}, out_bytes=8,
               requires_grad=False)
    g.add_node("b", op="call_function", flops=1e9, bytes_moved=10**6, out_bytes=1024, requires_grad=True)
    g.add_edge("a", "b", bytes=1024)
    cluster = _with_cpu(1)
    problem = compile_problem(g, cluster)
    assert problem.ops.names == ("a", "c", "b")
    sched = schedule(problem, {"a": "gpu0", "c": "cpu", "b": "gpu0"})
    i = {name: k for k, name in enumerate(problem.ops.names)}
    assert sched.fwd_host_end[i["c"]] - sched.fwd_host_start[i["c"]] == pytest.approx(5e-3)
    assert sched.fwd_host_start[i["b"]] >= sched.fwd_host_end[i["c"]]
    assert sched.fwd_start[i["b"]] >= sched.fwd_end[i["c"]]
    # Without the CPU op in between, b launches right after a.
    alone = schedule(compile_problem(g.subgraph(["a", "b"]).copy(), cluster), {"a": "gpu0", "b": "gpu0"})
    assert alone.fwd_host_start[1] < 1e-3


def test_launch_overhead_does_not_parallelise_across_devices_in_one_process():
    k = 12
    g = nx.DiGraph(name="independent")
    for j in range(k):
        g.add_node(f"op{j}", op="call_function", flops=1e9, bytes_moved=10**6, out_bytes=1024, requires_grad=True)
    problem = compile_problem(g, _gpus(2))
    cost = problem.ops.cost.copy()
    cost[:, :, 1::2] = 0.0  # no device time: launches only
    cost[:, :, 2] = 0.0  # backward launches run on per-GPU engine threads (they would overlap)
    launches = _with_costs(problem, cost)
    assert cost[:, :, 0].min() > 0
    one = simulate(launches, {f"op{j}": "gpu0" for j in range(k)}).step_time
    two = simulate(launches, {f"op{j}": f"gpu{j % 2}" for j in range(k)}).step_time
    assert two == pytest.approx(one, rel=1e-12)
    # Backward launches do overlap: one engine thread per GPU (R7).
    backward = problem.ops.cost.copy()
    backward[:, :, [0, 1, 3, 4, 5]] = 0.0
    bwd = _with_costs(problem, backward, HostOverheads(0.0, 0.0, 0.0, 0.0))
    one = simulate(bwd, {f"op{j}": "gpu0" for j in range(k)}).step_time
    two = simulate(bwd, {f"op{j}": f"gpu{j % 2}" for j in range(k)}).step_time
    assert two == pytest.approx(one / 2, rel=1e-12)


def test_hand_checked_copy_between_two_gpus_and_to_the_cpu():
    # x0 (gpu0) -> x1 (gpu1) -> x2 (cpu); device-only costs, host costs only for copies.
    g = nx.DiGraph(name="chain")
    for i in range(3):
        g.add_node(f"x{i}", op="call_module", flops=1e9, bytes_moved=0, out_bytes=1000 * (i + 1),
                   param_bytes=0, requires_grad=True)
    g.add_edge("x0", "x1", bytes=1000)
    g.add_edge("x1", "x2", bytes=2000)
    cluster = _with_cpu(2)
    problem = compile_problem(g, cluster)
    cost = np.zeros_like(problem.ops.cost)
    cost[0, 1, 1], cost[1, 2, 1], cost[2, 0, 0] = 1e-3, 2e-3, 3e-3  # dF on gpu0, gpu1; hF on the CPU
    host = HostOverheads(copy_s=1e-6, loss_s=0.0, backward_call_s=0.0, step_s=0.0)
    p = _with_costs(problem, cost, host)
    res = simulate(p, {"x0": "gpu0", "x1": "gpu1", "x2": "cpu"}, backend="python")
    x01 = 1e-5 + 1000 / 1e10  # gpu0 -> gpu1 after x0's kernel, on gpu0's stream
    x12 = 1e-5 + 2000 / 1e10  # gpu1 -> cpu, blocking: the host waits
    forward = 1e-3 + x01 + 2e-3 + x12 + 3e-3
    # Backward (all 0 work): the gradient copies cpu -> gpu1 (host, blocking) and gpu1 -> gpu0
    # (engine thread of gpu1, not blocking) after the host's copy_s each.
    backward = 1e-6 + x12 + 1e-6 + x01
    assert res.step_time == pytest.approx(forward + backward, rel=1e-12)
    assert res.transfer_bytes == 2 * (1000 + 2000)


def test_memory_of_a_diamond_with_a_non_grad_input():
    g = nx.DiGraph(name="diamond")
    g.add_node("x", op="placeholder", out_bytes=64, requires_grad=False, fwd_time={"cpu": 0.0})
    g.add_node("w", op="get_attr", out_bytes=400, param_bytes=400, requires_grad=True)
    g.add_node("m", op="call_function", out_bytes=32, requires_grad=True, fwd_time={"cpu": 1e-3}, bwd_time={"cpu": 1e-3})
    g.add_node("out", op="output", out_bytes=32, requires_grad=True)
    g.add_edges_from([("x", "m", {"bytes": 64}), ("w", "m", {"bytes": 400}), ("m", "out", {"bytes": 32})])
    cluster = _with_cpu(1)
    problem = compile_problem(g, cluster, optimizer="sgd")
    res = simulate(problem, {"x": "cpu", "w": "gpu0", "m": "cpu", "out": "cpu"})
    # cpu: activation of m (32) + received weight copy (400) + the backward's working set, twice
    # m's output gradient (2 x 32); gpu0: the parameter and its gradient, and at the optimizer
    # step SGD's temporary of the parameter's size (weight decay's grad.add(param)).
    assert res.peak_memory.tolist() == [432 + 64, 800 + 400]
    # x has no backward; only w <- m carries a gradient back.
    assert res.transfer_bytes == 800
    ref = simulate_reference(g, cluster, {"x": "cpu", "w": "gpu0", "m": "cpu", "out": "cpu"}, optimizer="sgd")
    assert ref.peak_memory.tolist() == res.peak_memory.tolist()


def test_one_copy_per_producer_and_device_with_its_largest_edge():
    g = nx.DiGraph(name="fan-out")
    g.add_node("p", op="call_function", flops=1e9, out_bytes=4000, requires_grad=True)
    for j, nbytes in enumerate((1000, 3000, 2000)):
        g.add_node(f"c{j}", op="call_function", flops=1e9, out_bytes=8, requires_grad=True)
        g.add_edge("p", f"c{j}", bytes=nbytes)
    problem = compile_problem(g, _gpus(2))
    res = simulate(problem, {"p": "gpu0", "c0": "gpu1", "c1": "gpu1", "c2": "gpu0"})
    assert res.transfer_bytes == 2 * 3000  # one forward copy and one gradient copy
    assert res.peak_memory[1] == pytest.approx(3000 + 16 + 2 * 8)  # + twice the largest output gradient


def test_not_fitting_is_reported_not_raised():
    g = nx.DiGraph(name="two")
    for i in range(2):
        g.add_node(f"x{i}", op="call_module", out_bytes=10, param_bytes=600, requires_grad=True,
                   fwd_time={"cpu": 1e-3}, bwd_time={"cpu": 1e-3}, opt_time={"cpu": 0.0})
    g.add_edge("x0", "x1", bytes=10)
    cpus = Cluster("cpus", (Device("a", "cpu", 2000, 1e12, 1e11), Device("b", "cpu", 2000, 1e12, 1e11)),
                   (Link("a", "b", 1e-5, 1e9),))
    problem = compile_problem(g, cpus, optimizer="sgd")
    both_a = simulate(problem, {"x0": "a", "x1": "a"})
    assert not both_a.fits
    # 2 x (600 x 2 + 10 kept) + the backward's working set, twice the largest output gradient
    # (2 x 10): 2440; at the optimizer step 2 x 600 x 2 + SGD's temporary of one parameter (600)
    assert both_a.over_memory.tolist() == [3000 - 2000, 0]
    split = simulate(problem, {"x0": "a", "x1": "b"})
    assert split.fits and split.over_memory.tolist() == [0, 0]
    assert both_a.memory_problems(problem.device_names) == [
        f"a needs {2440 / 2**30:.2f} GiB where {2000 / 2**30:.2f} GiB is usable ({440 / 2**30:.2f} GiB over)"]
    assert "does not fit (a needs " in both_a.describe(problem.device_names)
    host = problem.ops.host
    expected = 4e-3 + 2 * host.copy_s + host.loss_s + host.backward_call_s + host.step_s
    assert split.step_time == pytest.approx(expected, rel=1e-12)  # two CPUs, one process: copies cost host time only


def test_bad_placements_raise_placement_error():
    problem = compile_problem(layered_graph(5), _gpus(2))
    with pytest.raises(PlacementError, match="unknown device 'c'"):
        simulate(problem, {**{n: "gpu0" for n in problem.node_names}, "n0": "c"})
    with pytest.raises(PlacementError, match="misses 1 of 5 nodes"):
        simulate(problem, {n: "gpu0" for n in problem.node_names[:-1]})
    with pytest.raises(PlacementError, match="shape"):
        simulate_batch(problem, np.zeros((2, 4), dtype=int))
    with pytest.raises(PlacementError, match="valid indices are 0..1"):
        simulate_batch(problem, np.full((2, 5), 2))
    with pytest.raises(PlacementError, match="expected int rows of 5 ops"):
        simulate_ops(problem, np.zeros((1, 4), dtype=int))
    with pytest.raises(PlacementError, match="misses"):
        simulate_ops(problem, {"n0": "gpu0"})
    with pytest.raises(PlacementError):
        simulate_reference(layered_graph(5), _gpus(2), {"n0": "gpu0"})
    with pytest.raises(PlacementError, match="unknown simulator backend"):
        simulate_batch(problem, np.zeros((1, 5), dtype=int), backend="fast")


def test_lower_bound_counts_the_update_behind_the_last_backward():
    # A chain on one GPU with no host costs runs its ops' work back to back; only the first
    # op (whose backward comes last) has an update. The bound is then exact: the chain's
    # forward and backward, then that update (the optimizer's kernel queued behind it).
    problem = compile_problem(nx.path_graph(4, create_using=nx.DiGraph), _gpus(1), optimizer="adam")
    cost = np.zeros_like(problem.ops.cost)
    cost[:, 0, 1], cost[:, 0, 3] = 1e-3, 2e-3
    cost[0, 0, 5] = 5e-3
    one_gpu = _with_costs(problem, cost, HostOverheads(0.0, 0.0, 0.0, 0.0))
    step = simulate_batch(one_gpu, np.zeros((1, 4), dtype=int)).step_time[0]
    assert step == pytest.approx(4 * 3e-3 + 5e-3, rel=1e-12)
    assert critical_path_bound(one_gpu) == pytest.approx(step, rel=1e-12)


def test_lower_bound_parts():
    problem = compile_problem(layered_graph(40, seed=1, profiled_kinds=("cpu",)), _with_cpu(2))
    assert lower_bound(problem) == max(work_bound(problem), critical_path_bound(problem), host_bound(problem))
    assert work_bound(problem) >= host_bound(problem) * (1 - 1e-12)  # the host alone is one of its weightings
    rows = np.random.default_rng(0).integers(0, 3, size=(256, 40))
    assert simulate_batch(problem, rows).step_time.min() >= lower_bound(problem)


def test_reference_trace_names_the_threads():
    g = _unrolled_lstm(3)
    trace = ReferenceTrace()
    simulate_reference(g, _gpus(2), {v: ("gpu1" if v.startswith("l2") else "gpu0") for v in g.nodes}, trace=trace)
    resources = {res for _, res, _, _ in trace.events}
    assert {"thread:host", "thread:gpu0", "thread:gpu1", "stream:gpu0", "stream:gpu1"} <= resources
    start, end = trace.interval("B:l2_2", "thread:gpu1")
    assert end >= start


def test_gantt_rows_and_png(tmp_path):
    from placer.report.gantt import gantt_rows, plot_gantt

    problem = compile_problem(layered_graph(25, seed=4), "4xK40")
    row = np.random.default_rng(1).integers(0, problem.num_devices, size=problem.num_nodes)
    sched = schedule(problem, row)
    rows = gantt_rows(problem, sched)
    labels = [label for label, _ in rows]
    assert labels[0] == "host thread"
    gpus = [name for name, kind in zip(problem.device_names, problem.device_kinds) if kind != "cpu"]
    for name in gpus:
        if np.any(row == problem.device_names.index(name)):
            assert name in labels
    assert np.nanmax(sched.bwd_end) <= sched.result.step_time + 1e-15
    for label, bars in rows:  # a stream or a thread runs one thing at a time
        if label.endswith("→") or "→" in label:
            continue
        spans = sorted(s for v in bars.values() for s in v)
        assert all(s1 >= s0 + w0 - 1e-9 for (s0, w0), (s1, _) in zip(spans, spans[1:])), label
    out = plot_gantt(problem, row, tmp_path / "step.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _two_cpus_and_a_gpu() -> Cluster:
    """Two CPU devices in one process (copies between them run on the host: the static pass's
    one-thread case) and a GPU (the engine thread of its own: the event pass)."""
    devs = (Device("c0", "cpu", 2**30, 1e11, 2e10), Device("c1", "cpu", 2**30, 1e11, 2e10),
            Device("g0", "V100", 2**30, 1e13, 1e12))
    links = (Link("c0", "c1", 1e-5, 1e10), Link("c0", "g0", 2e-5, 5e9), Link("c1", "g0", 3e-5, 4e9))
    return Cluster("2cpu+gpu", devs, links)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case, st.booleans())
def test_schedule_records_each_gradient_copy_as_the_reference_runs_it(params, cpus_only_cluster):
    seed, n, p, d, opt = params
    rng = np.random.default_rng(seed)
    g = random_dag(rng, n, p)
    cluster = _two_cpus_and_a_gpu() if cpus_only_cluster else random_cluster(rng, d)
    problem = compile_problem(g, cluster, optimizer=opt)
    nd = problem.num_devices
    high = 2 if cpus_only_cluster and rng.random() < 0.5 else nd  # CPUs only: the static pass
    for row in rng.integers(0, high, size=(4, n)):
        placement = problem.array_to_placement(row)
        trace = ReferenceTrace()
        ref = simulate_reference(g, cluster, placement, optimizer=opt, trace=trace)
        sched = schedule(problem, row)
        assert sched.result.step_time == simulate_batch(problem, row[None, :], backend="python").step_time[0]
        assert _close(sched.result.step_time, ref.step_time)
        events = {(task, res.split(":")[0]): (a, b) for task, res, a, b in trace.events if task.startswith("XB:")}
        names = problem.ops.names
        expected = np.full((n, nd, 4), np.nan)
        for (task, kind), (a, b) in events.items():
            dev, op = task[3:].split("->")
            i, j = names.index(op), problem.device_names.index(dev)
            expected[i, j, (0, 1) if kind == "thread" else (2, 3)] = (a, b)
        got = np.stack([sched.grad_copy_thread_start, sched.grad_copy_thread_end,
                        sched.grad_copy_start, sched.grad_copy_end], axis=-1)
        assert np.array_equal(np.isnan(got), np.isnan(expected)), (row, sched.certified)
        assert _close(got[~np.isnan(got)], expected[~np.isnan(expected)])


def test_gantt_draws_the_gradient_copy_of_a_cut_edge_where_the_reference_runs_it(tmp_path, monkeypatch):
    from placer.report.gantt import gantt_rows, plot_gantt

    g = nx.DiGraph(name="cut")
    for i in range(3):
        g.add_node(f"x{i}", op="call_module", flops=2e9, bytes_moved=10**6, out_bytes=4 * 10**6,
                   param_bytes=4096, requires_grad=True)
    g.add_edge("x0", "x1", bytes=4 * 10**6)
    g.add_edge("x1", "x2", bytes=4 * 10**6)
    cluster = _gpus(2, link=(1e-5, 1e9))
    problem = compile_problem(g, cluster)
    placement = {"x0": "gpu0", "x1": "gpu1", "x2": "gpu1"}
    trace = ReferenceTrace()
    simulate_reference(g, cluster, placement, trace=trace)
    sched = schedule(problem, placement)
    rows = dict(gantt_rows(problem, sched))
    start, end = trace.interval("XB:gpu1->x0", "copy:gpu1->gpu0")
    assert end - start == pytest.approx(1e-5 + 4e6 / 1e9)
    [(bar_start, width)] = rows["gpu1→gpu0"]["gradient copy"]  # the gradient flows back to x0's device
    assert (bar_start, bar_start + width) == pytest.approx((start * 1e3, end * 1e3), rel=1e-12)
    assert rows["gpu0→gpu1"]["gradient copy"] == [] and len(rows["gpu0→gpu1"]["copy"]) == 1
    issue = trace.interval("XB:gpu1->x0", "thread:gpu1")  # issued by gpu1's engine thread
    [(t0, tw)] = rows["gpu1 engine thread"]["gradient copy"]
    assert (t0, t0 + tw) == pytest.approx((issue[0] * 1e3, issue[1] * 1e3), rel=1e-12)
    step = simulate(problem, placement).step_time  # what the table reports
    assert sched.result.step_time == step
    assert max(s + w for bars in rows.values() for spans in bars.values() for s, w in spans) <= step * 1e3
    from matplotlib.figure import Figure

    shown = []
    real_savefig = Figure.savefig

    def capture(fig, *args, **kwargs):  # what the PNG shows: its title and legend
        ax = fig.axes[0]
        shown.extend([ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()]])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    plot_gantt(problem, placement, tmp_path / "cut.png")
    title, legend = shown
    assert f"step {step * 1e3:.3f} ms" in title
    assert "gradient copy" in legend and "copy" in legend


def test_work_bound_is_never_above_the_lp_optimum():
    from scipy.optimize import linprog

    from envs.sim.lower_bound import _loads

    for seed in range(6):
        rng = np.random.default_rng(seed)
        problem = compile_problem(random_dag(rng, 10, 0.3), random_cluster(rng, 3))
        loads, fixed = _loads(problem)
        n, d, r = loads.shape
        # min T  s.t. sum_d x[i,d] = 1, fixed_r + sum_{i,d} x[i,d] load[i,d,r] <= T  for every resource r
        a_ub = np.zeros((r, n * d + 1))
        for k in range(r):
            a_ub[k, :-1] = loads[:, :, k].ravel()
            a_ub[k, -1] = -1.0
        b_ub = np.zeros(r)
        b_ub[0] = -fixed
        a_eq = np.zeros((n, n * d + 1))
        for i in range(n):
            a_eq[i, i * d:(i + 1) * d] = 1.0
        cost = np.zeros(n * d + 1)
        cost[-1] = 1.0
        optimum = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(n), method="highs").fun
        bound = work_bound(problem)
        assert bound <= optimum * (1 + 1e-9)
        assert bound >= 0.9 * optimum


def test_default_host_costs_come_from_the_cost_model():
    g = layered_graph(4)
    custom = HostOverheads(copy_s=1e-3, loss_s=2e-3, backward_call_s=3e-3, step_s=4e-3)
    problem = compile_problem(g, _gpus(1), cost_model=CostModel(host=custom))
    assert problem.ops.host == custom
    with pytest.raises(ValueError, match="copy_s"):
        HostOverheads(copy_s=-1.0)


_THREADS_SCRIPT = """
import glob, numpy as np, numba
from envs.hardware.loading import load_cluster
from envs.sim.problem_compile import compile_problem
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
simulate_batch(problem, rows[:SERIAL_BELOW - 1], backend='numba')  # the one-thread driver first
simulate_batch(problem, rows, backend='numba')
before = ticks()
for _ in range(3):
    simulate_batch(problem, rows, backend='numba')
after = ticks()
print(sum(1 for k in after if after[k] - before.get(k, 0) > 0))
"""


# 15 s: compiles every driver afresh in an empty cache; the drivers' results are held to the
# reference by the default suite, and this regression of numba's cache runs with the slow ones.
@pytest.mark.slow
@pytest.mark.skipif(not HAS_NUMBA or not os.path.exists("/proc/self/task"), reason="needs numba and Linux /proc")
def test_threaded_driver_uses_several_threads_after_the_serial_one_was_cached(tmp_path):
    # Regression: numba's disk cache keyed a serial and a parallel compilation of one
    # function alike; the drivers are distinct functions. A fresh cache, the serial driver
    # first, then a large batch on 2 threads.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) >= 2, out.stdout


@pytest.mark.parametrize("field", ["fwd_time", "bwd_time"])
def test_negative_or_nan_times_are_a_clear_error(field):
    problem = compile_problem(layered_graph(6, seed=2), load_cluster("4xK40"))
    for bad in (-1e-3, float("nan")):
        values = getattr(problem, field).copy()
        values[2, 1] = bad
        broken = dataclasses.replace(problem, **{field: values})
        for backend in BACKENDS:
            with pytest.raises(PlacementError, match=field):
                simulate_batch(broken, np.zeros((1, 6), dtype=int), backend=backend)
    cost = problem.ops.cost.copy()
    cost[1, 1, 3] = -1.0
    with pytest.raises(PlacementError, match="ops.cost"):
        simulate_batch(_with_costs(problem, cost), np.zeros((1, 6), dtype=int))


def test_more_than_256_devices_match_the_numpy_path():
    from envs.hardware.cluster import make_cluster

    devices = [Device(f"g{i}", "V100", 10**9, 1e13, 1e12) for i in range(300)]
    cluster = make_cluster(devices, default_link=(1e-5, 1e10))
    problem = compile_problem(layered_graph(40, seed=4), cluster)
    rows = np.random.default_rng(1).integers(0, 300, size=(40, 40))
    rows[:, :3] = [299, 256, 255]
    results = [simulate_batch(problem, rows, backend=b) for b in BACKENDS]
    for other in results[1:]:
        for field in FIELDS:
            assert np.array_equal(getattr(results[0], field), getattr(other, field)), field
    assert np.all(results[0].transfer_bytes > 0)


@pytest.mark.skipif(not HAS_NUMBA, reason="needs numba")
def test_numba_cache_is_keyed_on_the_kernels_source():
    # numba keys its disk cache on the decorated function's own file; the loops the drivers
    # compile live in kernels.py and kernels_engine.py, so an edit there must make the cached
    # machine code stale.
    import hashlib

    from envs.sim import jit, kernels, kernels_engine, simulator_numba

    assert set(simulator_numba.KERNEL_SOURCES) == {kernels, kernels_engine, jit}
    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                     for m in simulator_numba.KERNEL_SOURCES)).hexdigest()
    for fn in (simulator_numba._rows, simulator_numba.batch_serial, simulator_numba.batch_parallel):
        assert fn._cache._cache_file._source_stamp[1] == digest, fn
