"""Optimal contiguous split of the topological order by dynamic programming (``pipeline_dp``).

The devices are taken in a fixed order: the accelerators by index, then the CPU(s). Each
device receives one contiguous, possibly empty, segment of ``problem.node_names`` (a
topological order), so data only flows forward through the device order, as in a pipeline.

The cost of a stage on device ``d`` holding nodes ``[k, i)`` is its compute,
``sum(fwd + bwd)`` on ``d``, plus the cost of sending everything it produces for later
stages (``comm_time`` of the bytes of edges leaving the segment, over the link to the next
device in the order). The DP minimises the **bottleneck** — the largest stage cost, the
quantity that bounds a pipelined step (PipeDream's objective) — with every stage within
its device's memory; among equal bottlenecks it prefers the smaller sum of stage costs.
It is exact for that objective (tests check it against brute force on chains).
"""

from __future__ import annotations

import numpy as np

from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import (
    BaselineInputs,
    NoFit,
    accelerators,
    comm_time,
    node_cost,
    node_memory,
)

#: Largest graph the O(N^2) tables are built for (a few tables of 8 N^2 bytes each).
MAX_NODES = 2500


def device_order(problem: PlacementProblem) -> list[int]:
    """Accelerators in index order, then the remaining devices (host CPU last)."""
    acc = accelerators(problem)
    return acc + [d for d in range(problem.num_devices) if d not in acc]


def _segment_out(p: np.ndarray) -> np.ndarray:
    """``out[k, i] = p[i, i] - p[k, i]`` for k <= i (0 elsewhere)."""
    diag = np.diagonal(p)  # p[i, i]
    out = diag[None, :] - p
    return np.triu(out)


def stage_cost(problem: PlacementProblem, order: list[int], j: int, out: np.ndarray) -> np.ndarray:
    """[N+1, N+1] cost of segment ``[k, i)`` as the stage on device ``order[j]``."""
    d = order[j]
    pre = np.concatenate([[0.0], np.cumsum(node_cost(problem)[:, d])])
    compute = np.triu(pre[None, :] - pre[:, None])
    nxt = order[j + 1] if j + 1 < len(order) else d
    if nxt == d:
        return compute
    return compute + np.where(out > 0, comm_time(problem, out, d, nxt), 0.0)


def segment_memory(problem: PlacementProblem) -> np.ndarray:
    """[N+1, N+1] peak bytes of segment ``[k, i)`` on its own device.

    Its nodes' footprints plus the copies of tensors it receives from earlier segments
    (edges from nodes ``< k`` into ``[k, i)``), as the simulator counts memory.
    """
    n = problem.num_nodes
    mem_prefix = np.concatenate([[0.0], np.cumsum(node_memory(problem))])
    own = mem_prefix[None, :] - mem_prefix[:, None]
    m = np.zeros((n + 1, n + 1))
    np.add.at(m, (problem.edge_src, problem.edge_dst), problem.edge_bytes.astype(np.float64))
    # q[k, i] = bytes on edges with src < k and dst < i
    q = np.zeros((n + 1, n + 1))
    q[1:, 1:] = np.cumsum(np.cumsum(m[:n, :n], axis=0), axis=1)
    received = q - np.diagonal(q)[:, None]  # q[k, i] - q[k, k]
    return np.triu(own + received)


def _prefix_table(problem: PlacementProblem) -> np.ndarray:
    n = problem.num_nodes
    m = np.zeros((n + 1, n + 1))
    np.add.at(m, (problem.edge_src, problem.edge_dst), problem.edge_bytes.astype(np.float64))
    r = np.cumsum(m[:, ::-1], axis=1)[:, ::-1]  # r[s, i]: bytes from s to nodes >= i
    return np.vstack([np.zeros((1, n + 1)), np.cumsum(r, axis=0)])[: n + 1]  # p[k, i]: sum_{s<k} r[s, i]


def pipeline_dp(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """The contiguous split minimising the bottleneck stage cost under memory (module docstring)."""
    n = problem.num_nodes
    if n > MAX_NODES:
        raise NoFit(f"pipeline_dp builds O(N^2) tables and is limited to {MAX_NODES} nodes; this graph has {n}")
    order = device_order(problem)
    seg_mem = segment_memory(problem)
    out = _segment_out(_prefix_table(problem))
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    # best[i] = (bottleneck, total) for the first i nodes over the devices seen so far.
    bott = np.full(n + 1, np.inf)
    total = np.full(n + 1, np.inf)
    bott[0] = total[0] = 0.0
    choice = np.zeros((len(order), n + 1), dtype=np.int64)
    ks = np.arange(n + 1)
    for j, d in enumerate(order):
        costs = stage_cost(problem, order, j, out)
        new_b, new_t = np.full(n + 1, np.inf), np.full(n + 1, np.inf)
        for i in range(n + 1):
            k = ks[: i + 1]
            ok = seg_mem[k, i] <= cap[d]
            c = np.where(k == i, 0.0, costs[k, i])  # an empty stage costs nothing
            b = np.where(ok, np.maximum(bott[k], c), np.inf)
            t = np.where(ok, total[k] + c, np.inf)
            # lexicographic argmin of (bottleneck, total), with a relative tolerance on ties
            bmin = b.min()
            if not np.isfinite(bmin):
                continue
            cand = np.flatnonzero(b <= bmin * (1 + 1e-12) + 1e-18)
            best = cand[np.argmin(t[cand])]
            new_b[i], new_t[i], choice[j, i] = b[best], t[best], best
        bott, total = new_b, new_t
    if not np.isfinite(bott[n]):
        need = node_memory(problem).sum()
        raise NoFit(
            f"no contiguous split fits memory (model needs {format_bytes(need)}; devices hold "
            f"{format_bytes(cap.sum())}; a contiguous split also needs every segment to fit)"
        )
    row = np.empty(n, dtype=np.int64)
    i = n
    for j in reversed(range(len(order))):
        k = int(choice[j, i])
        row[k:i] = order[j]
        i = k
    return row
