"""Small hand-made placement problems for the agent tests."""

from __future__ import annotations

import networkx as nx
import numpy as np

from envs.sim.problem import PlacementProblem
from envs.sim.problem_compile import compile_problem


def chain_problem(n: int = 12, edge_mb: float = 40.0, name: str = "chain") -> PlacementProblem:
    """A chain of heavy ops with big tensors between them, on 4xK40 (a CPU + 4 GPUs).

    Keeping the chain on one GPU avoids every transfer and the slow CPU, so a good placement
    is several times faster than a random one: learning has a clear signal.
    """
    g = nx.DiGraph(name=name)
    nbytes = int(edge_mb * 1e6)
    for i in range(n):
        g.add_node(f"n{i}", op="call_module", target=f"layer{i}", module=f"layer{i}", out_bytes=nbytes,
                   param_bytes=1_000_000, flops=10**10, requires_grad=True)
        if i:
            g.add_edge(f"n{i - 1}", f"n{i}", bytes=nbytes)
    return compile_problem(g, "4xK40")


def diamond_problem() -> PlacementProblem:
    """Two parallel heavy branches joined at the end (placing them apart pays off)."""
    g = nx.DiGraph(name="diamond")
    g.add_node("x", op="placeholder", out_bytes=1000, requires_grad=False)
    for b in "ab":
        prev = "x"
        for i in range(4):
            node = f"{b}{i}"
            g.add_node(node, op="call_module", out_bytes=10_000, param_bytes=100_000, flops=5 * 10**10)
            g.add_edge(prev, node, bytes=10_000 if prev != "x" else 1000)
            prev = node
    g.add_node("join", op="call_function", out_bytes=10_000, flops=1000)
    g.add_edge("a3", "join", bytes=10_000)
    g.add_edge("b3", "join", bytes=10_000)
    return compile_problem(g, "4xK40")


def heuristics_miss_problem() -> tuple[nx.DiGraph, PlacementProblem]:
    """An 8-op random DAG on 4xK40 with heavy parameters (memory matters) whose best heuristic
    placement is not optimal.

    Found by enumerating all 5^8 = 390,625 placements through the simulator (see
    ``test_enumeration_confirms_the_heuristic_gap``, marked slow): the optimum is 192.39 ms,
    the best of every baseline in ``placer.search.baselines`` (seed 0) 195.19 ms.
    """
    rng = np.random.default_rng(17)
    g = nx.DiGraph(name="heuristics_miss")
    for i in range(8):
        g.add_node(f"n{i}", op="call_module", target=f"l{i}", module=f"l{i}", out_bytes=int(rng.integers(1e5, 5e7)),
                   param_bytes=int(rng.integers(0, 3e9)), flops=int(rng.integers(1e9, 5e10)), requires_grad=True)
        if i:
            for j in rng.choice(np.arange(max(0, i - 8), i), size=min(i, 2), replace=False):
                g.add_edge(f"n{j}", f"n{i}", bytes=g.nodes[f"n{j}"]["out_bytes"])
    return g, compile_problem(g, "4xK40")
