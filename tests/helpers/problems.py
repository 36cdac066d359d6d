"""Hand-made placement problems for the environment tests (no torch, no capture), and the rewards they should get."""

from __future__ import annotations

import dataclasses

import numpy as np

from envs.hardware.cluster import Cluster, Device, Link, make_cluster
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate_batch
from tests.helpers.arrays import make_problem

#: The links of :func:`ranks_cluster`: latency (s) and bandwidth (bytes/s).
LAT, BW = 100e-6, 1e9


def ranks_cluster(n: int = 2, lat: float = LAT, bw: float = BW) -> Cluster:
    """``n`` CPU processes (``cpu:0``, ``cpu:1``, ...) joined by links of ``lat`` and ``bw``."""
    devs = [Device(f"cpu:{i}", "cpu", 2**33, 1e11, 1e10, real_device="cpu") for i in range(n)]
    links = [Link(f"cpu:{i}", f"cpu:{j}", lat, bw) for i in range(n) for j in range(i + 1, n)]
    return make_cluster(devs, links, name="ranks", simulated=False)


def random_problem(n: int = 12, d: int = 3, seed: int = 0, extra_edges: int = 6,
                   capacity: float | None = None, name: str = "random") -> PlacementProblem:
    """A random DAG: a chain 0→1→…→n-1 plus ``extra_edges`` forward skips, random costs.

    Device 0 is a slow "cpu" with plenty of memory; the others are faster GPUs with
    ``capacity`` bytes each (default: room for the whole graph).
    """
    rng = np.random.default_rng(seed)
    edges = {(i, i + 1) for i in range(n - 1)}
    want = min(n - 1 + extra_edges, n * (n - 1) // 2)  # a DAG on n nodes has at most n(n-1)/2 edges
    while len(edges) < want:
        a, b = sorted(rng.choice(n, size=2, replace=False).tolist())
        edges.add((a, b))
    edges = sorted(edges)
    speed = np.concatenate([[1.0], rng.uniform(0.1, 0.4, size=d - 1)])  # relative time per device
    base = rng.uniform(1e-4, 2e-3, size=n)
    fwd = base[:, None] * speed[None, :]
    param = rng.integers(0, 4, size=n) * 1_000_000.0
    out = rng.integers(1, 8, size=n) * 250_000.0
    total = float((param * 2 + out).sum())
    cap = np.full(d, total * 2 if capacity is None else capacity, dtype=np.float64)
    cap[0] = total * 10
    lat = np.full((d, d), 10e-6)
    np.fill_diagonal(lat, 0.0)
    bw = np.full((d, d), 8e9)
    np.fill_diagonal(bw, np.inf)
    return PlacementProblem(
        name=name,
        node_names=tuple(f"n{i}" for i in range(n)),
        device_names=tuple(["cpu"] + [f"gpu{i}" for i in range(d - 1)]),
        device_kinds=tuple(["cpu"] + ["K40"] * (d - 1)),
        fwd_time=fwd,
        bwd_time=2 * fwd,
        param_bytes=param,
        act_bytes=out.copy(),
        out_bytes=out,
        flops=rng.integers(1, 1000, size=n) * 1e6,
        edge_src=np.array([e[0] for e in edges], dtype=np.int64),
        edge_dst=np.array([e[1] for e in edges], dtype=np.int64),
        edge_bytes=np.array([out[e[0]] for e in edges], dtype=np.float64),
        latency=lat,
        bandwidth=bw,
        memory_capacity=cap,
    )


def tight_problem(seed: int = 1) -> PlacementProblem:
    """A problem where no GPU can hold the whole graph, so some placements do not fit."""
    p = random_problem(n=10, d=3, seed=seed)
    need = float((p.param_bytes * 2 + p.act_bytes).sum())
    return random_problem(n=10, d=3, seed=seed, capacity=need * 0.6, name="tight")


def expected_rewards(problem, rows, penalty):
    """Rewards recomputed from simulate_batch alone: -sqrt(t / t_ref), t_ref the best fitting single device."""
    d = problem.num_devices
    singles = simulate_batch(problem, np.repeat(np.arange(d)[:, None], problem.num_nodes, axis=1))
    fitting = np.flatnonzero(singles.fits)
    t_ref = singles.step_time[fitting].min() if fitting.size else singles.step_time.min()
    res = simulate_batch(problem, rows)
    return np.where(res.fits, np.maximum(-np.sqrt(res.step_time / t_ref), penalty + 0.5), penalty), res


MB = 2**20


def branch_trap_problem():
    """Two branches of four 10 ms ops between a stem and a concat, all on one of two GPUs.

    Inside a branch each edge carries 200 MiB (0.2 s over the 1 GB/s link), into and out of it
    1 MiB. Moving the whole of branch ``b`` to the other GPU runs the branches side by side; a
    move of one to three of its ops cuts a 200 MiB edge and is far slower, so single moves, the
    moves of an edge's two ends and the policy's coupled moves (at most three groups) cannot
    reach it without passing through worse placements.
    """
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (4, 9), (8, 9)]
    heavy = {(1, 2), (2, 3), (3, 4), (5, 6), (6, 7), (7, 8)}
    edge_bytes = np.array([200 * MB if e in heavy else MB for e in sorted(edges)], dtype=float)
    times = np.array([0.001] + [0.01] * 8 + [0.001])
    problem = make_problem(10, edges, times, kinds=("K40", "K40"), edge_bytes=edge_bytes)
    modules = ("stem",) + tuple(f"block.a.conv{i}" for i in range(4)) + tuple(f"block.b.conv{i}" for i in range(4)) + \
        ("block",)
    return dataclasses.replace(problem, node_modules=modules)
