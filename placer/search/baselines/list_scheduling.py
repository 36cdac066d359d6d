"""HEFT and CPOP (Topcuoglu, Hariri & Wu, IEEE TPDS 2002), memory-aware.

* ``heft``: nodes in decreasing upward rank (mean node cost + costliest path of mean
  costs to an exit); each goes to the device with the earliest finish time, using idle
  gaps (insertion policy), among devices with memory left for it.
* ``critical_path`` (CPOP): priority = upward + downward rank; the nodes of the critical
  path (those whose priority equals the entry's, followed from entry to exit) all go to the
  one device that runs them fastest in total; the others go by earliest finish time. Nodes
  are taken from the ready set in decreasing priority.

Both consider every device of the cluster, CPU included: a slow device simply loses on
finish time.
"""

from __future__ import annotations

import heapq

import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import BaselineInputs, mean_comm, node_cost
from placer.search.baselines.schedule import ScheduleState, downward_rank, eft_choice, upward_rank


def heft(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """HEFT placement with memory limits (see the module docstring)."""
    devices = list(range(problem.num_devices))
    rank = upward_rank(problem, devices, mean_comm(problem, devices))
    # Ties (zero-cost nodes) fall back to topological index so predecessors come first.
    order = sorted(range(problem.num_nodes), key=lambda n: (-rank[n], n))
    state = ScheduleState(problem, devices)
    for n in order:
        hosts = state.hosts(n)
        if not hosts:
            raise state.no_room(n)
        d, start = eft_choice(state, n, hosts, insertion=True)
        state.place(n, d, start)
    return state.device


def critical_path_nodes(problem: PlacementProblem, priority: np.ndarray) -> list[int]:
    """Nodes of the critical path: from the top-priority entry, follow the top-priority child."""
    rel = 1e-9 * max(float(priority.max()), 1e-30)
    has_pred = np.zeros(problem.num_nodes, dtype=bool)
    has_pred[problem.edge_dst] = True
    entries = np.flatnonzero(~has_pred)
    node = int(entries[np.argmax(priority[entries])])
    top = priority[node]
    succ: list[list[int]] = [[] for _ in range(problem.num_nodes)]
    for s, t in zip(problem.edge_src.tolist(), problem.edge_dst.tolist()):
        succ[s].append(t)
    path = [node]
    while succ[node]:
        nxt = max(succ[node], key=lambda t: (priority[t], -t))
        if abs(priority[nxt] - top) > rel * 1e3 + 1e-12:
            break
        node = nxt
        path.append(node)
    return path


def critical_path(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """CPOP placement with memory limits (see the module docstring)."""
    devices = list(range(problem.num_devices))
    ec = mean_comm(problem, devices)
    priority = upward_rank(problem, devices, ec) + downward_rank(problem, devices, ec)
    cp = critical_path_nodes(problem, priority)
    cost, state = node_cost(problem), ScheduleState(problem, devices)
    cp_mem = state.mem[cp].sum()
    # The critical-path device: fastest over the path among those that can hold all of it.
    roomy = [d for d in devices if cp_mem <= state.cap[d]] or devices
    cp_dev = min(roomy, key=lambda d: (cost[cp, d].sum(), d))
    on_cp = set(cp)
    indeg = np.bincount(problem.edge_dst, minlength=problem.num_nodes)
    succ: list[list[int]] = [[] for _ in range(problem.num_nodes)]
    for s, t in zip(problem.edge_src.tolist(), problem.edge_dst.tolist()):
        succ[s].append(t)
    heap = [(-priority[n], n) for n in range(problem.num_nodes) if indeg[n] == 0]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        hosts = state.hosts(n)
        if not hosts:
            raise state.no_room(n)
        if n in on_cp and cp_dev in hosts:
            d = cp_dev
            start = state.earliest_start(n, d, state.data_ready(n, d), insertion=True)
        else:
            d, start = eft_choice(state, n, hosts, insertion=True)
        state.place(n, d, start)
        for t in succ[n]:
            indeg[t] -= 1
            if indeg[t] == 0:
                heapq.heappush(heap, (-priority[t], t))
    return state.device
