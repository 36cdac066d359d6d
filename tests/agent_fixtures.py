"""Small hand-made placement problems for the agent tests."""

from __future__ import annotations

import networkx as nx

from envs.problem import PlacementProblem, compile_problem


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
