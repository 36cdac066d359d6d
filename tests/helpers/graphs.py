"""Synthetic placement graphs shared by the envs simulator/cost-model tests (no capture needed)."""

from __future__ import annotations

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster, Device, Link


def layered_graph(n: int, width: int = 4, seed: int = 0, profiled_kinds: tuple[str, ...] = ()) -> nx.DiGraph:
    """A random layered DAG with the contract's node/edge attributes (n nodes, ~2 inputs each)."""
    rng = np.random.default_rng(seed)
    g = nx.DiGraph(name=f"layered{n}")
    for i in range(n):
        fwd = {k: float(rng.uniform(1e-5, 1e-3)) for k in profiled_kinds}
        g.add_node(
            f"n{i}",
            op="call_function",
            flops=int(rng.integers(10**6, 10**9)),
            bytes_moved=int(rng.integers(10**4, 10**7)),
            out_bytes=int(rng.integers(10**3, 10**6)),
            param_bytes=int(rng.integers(0, 10**6)),
            requires_grad=True,
            fwd_time=fwd,
            bwd_time={k: 2 * t for k, t in fwd.items()},
        )
        if i > 0:
            for p in sorted(set(rng.integers(max(0, i - 2 * width), i, size=2).tolist())):
                g.add_edge(f"n{p}", f"n{i}", bytes=int(rng.integers(10**3, 10**6)))
    return g


def random_dag(rng: np.random.Generator, n: int, edge_prob: float) -> nx.DiGraph:
    """A random DAG over n nodes with random costs, grad flags, and some zero-cost nodes."""
    g = nx.DiGraph(name="random")
    for i in range(n):
        op = "placeholder" if i == 0 else str(rng.choice(["call_function", "call_module", "call_method"]))
        t = float(rng.uniform(0, 1e-3)) if rng.random() > 0.15 else 0.0
        g.add_node(
            f"v{i}",
            op=op,
            flops=int(rng.integers(0, 10**9)),
            bytes_moved=int(rng.integers(0, 10**7)),
            out_bytes=int(rng.integers(0, 10**6)),
            param_bytes=int(rng.integers(0, 10**6)) if rng.random() > 0.3 else 0,
            requires_grad=bool(rng.random() > 0.2) and op != "placeholder",
            fwd_time={"cpu": t},
            bwd_time={"cpu": float(rng.uniform(0, 2e-3))},
        )
    for i in range(1, n, 3):  # a frozen share (buffers, frozen parameters), drawing nothing more from rng
        g.nodes[f"v{i}"]["frozen_bytes"] = g.nodes[f"v{i}"]["param_bytes"] // (1 + i % 2)
    for j in range(1, n):
        for i in range(j):
            if rng.random() < edge_prob:
                g.add_edge(f"v{i}", f"v{j}", bytes=int(rng.integers(0, 10**6)) if rng.random() > 0.1 else 0)
    return g


def random_cluster(rng: np.random.Generator, num_devices: int) -> Cluster:
    """A heterogeneous virtual cluster (a CPU plus GPUs of mixed kinds) with random links."""
    kinds = ["cpu"] + [str(rng.choice(["K40", "V100", "A100"])) for _ in range(num_devices - 1)]
    devices = [
        Device(f"d{i}", k, int(rng.integers(10**6, 10**8)), float(rng.uniform(1e11, 2e13)), float(rng.uniform(5e10, 1e12)))
        for i, k in enumerate(kinds)
    ]
    links = []
    for a in range(num_devices):
        for b in range(num_devices):
            if a < b or (a > b and rng.random() < 0.3):  # some asymmetric reverse links
                links.append(Link(f"d{a}", f"d{b}", float(rng.uniform(0, 2e-5)), float(rng.uniform(1e9, 5e10))))
    return Cluster("random", tuple(devices), tuple(links))
