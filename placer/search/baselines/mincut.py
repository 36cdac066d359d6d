"""k-way min-cut partitioning (``mincut``): METIS when pymetis is installed, else recursive
Kernighan–Lin bisection (networkx).

The graph is taken as undirected, node weight = compute time (mean over the
accelerators), edge weight = bytes crossing it. The partitioner balances compute across
the G accelerators while cutting as few bytes as possible; parts go to the accelerators
in the order of their first node (so data mostly flows gpu0 → gpu1 → ...). Partitioners
do not know device memory: overfull devices are then repaired by
:func:`~placer.search.baselines.common.repair_memory` (fewest cut bytes added per moved node).
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import BaselineInputs, accelerators, node_cost, repair_memory

try:  # optional extra "placer[metis]"
    import pymetis

    HAS_METIS = True
except ImportError:  # pragma: no cover - depends on the environment
    pymetis = None
    HAS_METIS = False

#: Integer scale for METIS weights (it takes positive ints).
_SCALE = 10_000


def _int_weights(values: np.ndarray) -> np.ndarray:
    """Scale non-negative floats to positive ints preserving ratios (METIS needs ints >= 1)."""
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return np.ones(values.shape, dtype=np.int64)
    return np.maximum(1, np.round(values / top * _SCALE)).astype(np.int64)


def undirected(problem: PlacementProblem, weight: np.ndarray) -> nx.Graph:
    """Undirected graph over node indices with ``weight`` per node and summed edge bytes."""
    g = nx.Graph()
    for n in range(problem.num_nodes):
        g.add_node(n, weight=float(weight[n]))
    for s, t, b in zip(problem.edge_src.tolist(), problem.edge_dst.tolist(), problem.edge_bytes.tolist()):
        if s == t:
            continue
        if g.has_edge(s, t):
            g[s][t]["weight"] += float(b)
        else:
            g.add_edge(s, t, weight=float(b))
    return g


def metis_parts(g: nx.Graph, k: int, seed: int) -> np.ndarray:
    """Part index per node from METIS (k-way, compute-balanced)."""
    n = g.number_of_nodes()
    xadj, adjncy, ew = [0], [], []
    ebytes = np.array([d["weight"] for _, _, d in g.edges(data=True)] or [0.0])
    scale = _int_weights(ebytes)
    emap = {}
    for (u, v, _), w in zip(g.edges(data=True), scale):
        emap[(u, v)] = emap[(v, u)] = int(w)
    for u in range(n):
        for v in sorted(g.neighbors(u)):
            adjncy.append(v)
            ew.append(emap[(u, v)])
        xadj.append(len(adjncy))
    vw = _int_weights(np.array([g.nodes[u]["weight"] for u in range(n)]))
    opts = pymetis.Options(seed=seed)
    _, parts = pymetis.part_graph(
        k, xadj=xadj, adjncy=adjncy, vweights=vw.tolist(), eweights=ew or None, options=opts
    )
    return np.asarray(parts, dtype=np.int64)


def kl_parts(g: nx.Graph, k: int, seed: int) -> np.ndarray:
    """Part index per node by recursive Kernighan–Lin bisection into k parts."""
    parts = np.zeros(g.number_of_nodes(), dtype=np.int64)

    def split(nodes: list[int], first: int, count: int) -> None:
        if count <= 1 or len(nodes) <= 1:
            parts[nodes] = first
            return
        sub = g.subgraph(nodes)
        # Seed the bisection with a compute-balanced cut of the topological order, which KL refines.
        w = np.array([g.nodes[u]["weight"] for u in nodes])
        left_share = (count // 2) / count
        cut = int(np.searchsorted(np.cumsum(w), left_share * w.sum())) + 1
        cut = min(max(cut, 1), len(nodes) - 1)
        init = (set(nodes[:cut]), set(nodes[cut:]))
        a, b = nx.algorithms.community.kernighan_lin_bisection(sub, partition=init, weight="weight", seed=seed)
        split(sorted(a), first, count // 2)
        split(sorted(b), first + count // 2, count - count // 2)

    split(list(range(g.number_of_nodes())), 0, k)
    return parts


def mincut(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """Min-cut placement over the accelerators, memory repaired (see the module docstring)."""
    gpus = accelerators(problem)
    k = len(gpus)
    if k == 1 or problem.num_nodes <= 1:
        row = np.full(problem.num_nodes, gpus[0], dtype=np.int64)
    else:
        g = undirected(problem, node_cost(problem)[:, gpus].mean(axis=1))
        parts = metis_parts(g, k, inputs.seed) if HAS_METIS else kl_parts(g, k, inputs.seed)
        # order parts by their first node so the device order follows the data flow
        firsts = {p: int(np.flatnonzero(parts == p)[0]) for p in np.unique(parts)}
        rank = {p: i for i, p in enumerate(sorted(firsts, key=firsts.get))}
        row = np.array([gpus[rank[p]] for p in parts], dtype=np.int64)
    # Memory repair may also use the host CPU as a last resort.
    return repair_memory(problem, row, gpus + [d for d in range(problem.num_devices) if d not in gpus])
