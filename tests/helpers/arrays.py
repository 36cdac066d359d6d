"""Placement problems written directly as arrays (no graph, no cluster file), for baseline tests."""

from __future__ import annotations

import networkx as nx
import numpy as np

from envs.sim.problem import PlacementProblem

MB = 2**20


def make_problem(
    n_nodes: int,
    edges: list[tuple[int, int]],
    times: np.ndarray,
    *,
    kinds: tuple[str, ...] = ("K40", "K40", "K40"),
    param_bytes: np.ndarray | None = None,
    act_bytes: np.ndarray | None = None,
    edge_bytes: float | np.ndarray = 1 * MB,
    capacity: float | np.ndarray = 1e12,
    bandwidth: float = 1e9,
    latency: float = 1e-5,
) -> PlacementProblem:
    """A problem built directly from arrays (``times`` [N] or [N, D]: fwd; bwd = 2 * fwd)."""
    d = len(kinds)
    times = np.asarray(times, dtype=float)
    if times.ndim == 1:
        times = np.repeat(times[:, None], d, axis=1)
    edges = sorted(edges)
    src = np.array([s for s, _ in edges], dtype=np.int64)
    dst = np.array([t for _, t in edges], dtype=np.int64)
    assert np.all(src < dst)
    lat = np.full((d, d), latency)
    np.fill_diagonal(lat, 0.0)
    bw = np.full((d, d), bandwidth)
    np.fill_diagonal(bw, np.inf)
    return PlacementProblem(
        name="hand",
        node_names=tuple(f"n{i}" for i in range(n_nodes)),
        device_names=tuple(f"d{i}" if k != "cpu" else "cpu" for i, k in enumerate(kinds)),
        device_kinds=kinds,
        fwd_time=times,
        bwd_time=2 * times,
        param_bytes=np.zeros(n_nodes) if param_bytes is None else np.asarray(param_bytes, dtype=float),
        act_bytes=np.zeros(n_nodes) if act_bytes is None else np.asarray(act_bytes, dtype=float),
        out_bytes=np.full(n_nodes, MB, dtype=float),
        flops=np.zeros(n_nodes),
        edge_src=src,
        edge_dst=dst,
        edge_bytes=np.broadcast_to(np.asarray(edge_bytes, dtype=float), (len(edges),)).copy(),
        latency=lat,
        bandwidth=bw,
        memory_capacity=np.broadcast_to(np.asarray(capacity, dtype=float), (d,)).copy(),
    )


def diamond_problem(**kw) -> PlacementProblem:
    """Two parallel branches of 3 heavy nodes between a source and a sink (parallelism pays)."""
    edges = [(0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (3, 7), (6, 7)]
    times = np.array([1e-4, 5e-3, 5e-3, 5e-3, 5e-3, 5e-3, 5e-3, 1e-4])
    return make_problem(8, edges, times, **kw)


def graph_for(problem: PlacementProblem, name: str = "hand", modules: list[str] | None = None) -> nx.DiGraph:
    g = nx.DiGraph(name=name)
    for i, n in enumerate(problem.node_names):
        mod = modules[i] if modules else f"layers.{i}"
        g.add_node(n, op="call_module", target=mod, module=mod, param_bytes=int(problem.param_bytes[i]))
    for s, t in zip(problem.edge_src, problem.edge_dst):
        g.add_edge(problem.node_names[s], problem.node_names[t], bytes=MB)
    return g
