"""Baechi's memory-constrained placers (Jeon et al., "Baechi: fast device placement of
machine learning graphs", SoCC 2020): m-TOPO, m-ETF and m-SCT.

All three place on the accelerators (the host CPU only when there are none), as Baechi
does, and never put a node on a device without memory left for it.

* ``m_topo``: walk the topological order and fill one device at a time up to its share
  of the total compute (total / number of devices); move on to the next device when the
  share is reached or memory runs out (past the last device, a node goes to the device
  with the most room left).
* ``m_etf``: earliest-task-first list scheduling: repeatedly schedule the ready
  (node, device) pair that can start earliest, over devices with room for the node.
* ``m_sct``: small-communication-times scheduling. An LP relaxation (Hanen & Munier)
  picks for every node at most one *favourite child*: variables ``t_i`` (start times) and
  ``x_ij`` in [0, 1] per edge (1 = child shares its parent's device, so no transfer);
  minimise the makespan ``w`` subject to ``t_j >= t_i + p_i + c_ij (1 - x_ij)``,
  ``w >= t_i + p_i``, each node having at most one favourite child and being the favourite
  of at most one parent. Edges with ``x_ij >= 1/2`` become favourite-child links; the ETF
  scheduler then keeps a favourite child on its parent's device whenever it fits there.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import (
    BaselineInputs,
    NoFit,
    accelerators,
    mean_comm,
    node_cost,
    node_memory,
    predecessors,
)
from placer.search.baselines.schedule import etf_schedule, upward_rank


def m_topo(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """m-TOPO placement (see the module docstring)."""
    devices = accelerators(problem)
    cost = node_cost(problem)
    mem = node_memory(problem)
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    share = cost[:, devices].mean(axis=1).sum() / len(devices)
    load = np.zeros(problem.num_devices)
    used = np.zeros(problem.num_devices)
    row = np.empty(problem.num_nodes, dtype=np.int64)
    preds = predecessors(problem)

    def need(n: int, d: int) -> float:  # footprint + copies of inputs placed elsewhere
        return mem[n] + sum(float(problem.edge_bytes[e]) for e, s in preds[n] if row[s] != d)

    k = 0
    for n in range(problem.num_nodes):
        d = devices[k]
        if load[d] + cost[n, d] > share * (1 + 1e-9) and load[d] > 0 and k + 1 < len(devices):
            k += 1  # this device's compute share is full
        # Out of memory here: the next device with room takes the node (and the rest).
        while k + 1 < len(devices) and used[devices[k]] + need(n, devices[k]) > cap[devices[k]]:
            k += 1
        d = devices[k]
        if used[d] + need(n, d) > cap[d]:
            # Past the last device: an earlier one with room left takes it (most room first).
            roomy = [x for x in devices if used[x] + need(n, x) <= cap[x]]
            if not roomy:
                raise NoFit(
                    f"m-TOPO found no device with room for node {problem.node_names[n]!r} "
                    f"({format_bytes(mem[n])}; most free: {format_bytes(max(cap[devices] - used[devices]))})"
                )
            d = max(roomy, key=lambda x: (cap[x] - used[x], -x))
        used[d] += need(n, d)
        row[n] = d
        load[d] += cost[n, d]
    return row


def m_etf(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """m-ETF placement (see the module docstring)."""
    devices = accelerators(problem)
    priority = upward_rank(problem, devices, mean_comm(problem, devices))
    return etf_schedule(problem, devices, priority)


def favourite_children(problem: PlacementProblem, devices: list[int]) -> dict[int, int]:
    """Solve the SCT LP relaxation; return ``{child: favourite parent}`` for rounded edges."""
    n, e = problem.num_nodes, problem.num_edges
    if e == 0:
        return {}
    p = node_cost(problem)[:, devices].mean(axis=1)
    c = mean_comm(problem, devices)
    src, dst = problem.edge_src.astype(np.int64), problem.edge_dst.astype(np.int64)
    # Variable layout: t[0..n), x[n..n+e), w at n+e.
    nv = n + e + 1
    rows_e = np.arange(e)
    # t_i - t_j - c x_e <= -p_i - c
    a_prec = sparse.csr_matrix(
        (
            np.concatenate([np.ones(e), -np.ones(e), -c]),
            (np.concatenate([rows_e, rows_e, rows_e]), np.concatenate([src, dst, n + rows_e])),
        ),
        shape=(e, nv),
    )
    b_prec = -p[src] - c
    # t_i - w <= -p_i
    rows_n = np.arange(n)
    a_span = sparse.csr_matrix(
        (np.concatenate([np.ones(n), -np.ones(n)]), (np.concatenate([rows_n, rows_n]), np.concatenate([rows_n, np.full(n, n + e)]))),
        shape=(n, nv),
    )
    b_span = -p
    # sum of x over a node's out-edges <= 1, and over its in-edges <= 1
    a_out = sparse.csr_matrix((np.ones(e), (src, n + rows_e)), shape=(n, nv))
    a_in = sparse.csr_matrix((np.ones(e), (dst, n + rows_e)), shape=(n, nv))
    a_ub = sparse.vstack([a_prec, a_span, a_out, a_in]).tocsr()
    b_ub = np.concatenate([b_prec, b_span, np.ones(n), np.ones(n)])
    objective = np.zeros(nv)
    objective[-1] = 1.0
    bounds = [(0, None)] * n + [(0, 1)] * e + [(0, None)]
    res = linprog(objective, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if res.status != 0:
        # An LP that fails to solve leaves m-SCT as plain m-ETF, rather than failing the method.
        return {}
    x = res.x[n : n + e]
    chosen: dict[int, int] = {}
    best_child: dict[int, tuple[float, int]] = {}
    for k in np.argsort(-x, kind="stable"):
        if x[k] < 0.5 or c[k] <= 0:
            continue
        s, t = int(src[k]), int(dst[k])
        if t in chosen or s in best_child:
            continue
        chosen[t] = s
        best_child[s] = (float(x[k]), t)
    return chosen


def m_sct(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """m-SCT placement (see the module docstring)."""
    devices = accelerators(problem)
    priority = upward_rank(problem, devices, mean_comm(problem, devices))
    return etf_schedule(problem, devices, priority, preferred=favourite_children(problem, devices))
