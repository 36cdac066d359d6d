"""Small pipelines over CPU ranks for the pipeline simulator's tests: a cluster, a chain of layers, a 2-stage cut."""

from __future__ import annotations

import networkx as nx

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.pipeline_layout import Pipeline

LAT, BW = 100e-6, 1e9


def cpu_cluster(n: int = 2, memory: int = 2**33):
    devs = [Device(f"cpu:{i}", "cpu", memory, 1e11, 1e10, real_device="cpu") for i in range(n)]
    links = [Link(f"cpu:{i}", f"cpu:{j}", LAT, BW) for i in range(n) for j in range(i + 1, n)]
    return make_cluster(devs, links, name="ranks", simulated=False)


def op(g: nx.DiGraph, name: str, ins=(), fwd=1e-3, bwd=2e-3, out_bytes=100_000, params=0, opt=0.0):
    g.add_node(name, op="call_module", fwd_time={"cpu": fwd}, bwd_time={"cpu": bwd}, opt_time={"cpu": opt},
               out_bytes=out_bytes, requires_grad=True, param_bytes=params)
    for a in ins:
        g.add_edge(a, name, bytes=g.nodes[a]["out_bytes"])


def chain(n: int = 4, skip: bool = False, **kw) -> nx.DiGraph:
    """x -> l0 -> ... -> l{n-1} -> output; with ``skip`` l0 is also read by the last layer."""
    g = nx.DiGraph()
    g.add_node("x", op="placeholder", out_bytes=100, requires_grad=False)
    prev = "x"
    for i in range(n):
        ins = [prev] + (["l0"] if skip and i == n - 1 and n > 2 else [])
        op(g, f"l{i}", ins, **kw)
        prev = f"l{i}"
    g.add_node("output", op="output", out_bytes=0, requires_grad=False)
    g.add_edge(prev, "output", bytes=g.nodes[prev]["out_bytes"])
    return g


def two_stages(m: int = 2, schedule: str = "1f1b") -> Pipeline:
    return Pipeline((("x", "l0", "l1"), ("l2", "l3", "output")), ("cpu:0", "cpu:1"), m, schedule)
