"""A memory-aware list-scheduling state shared by ETF, SCT, HEFT and CPOP.

The heuristics build a placement by scheduling nodes one at a time onto devices. Each
scheduled node occupies its device for ``fwd + bwd`` seconds; a node may start once every
predecessor has finished and its data has arrived (:func:`~placer.search.baselines.common.comm_time`
for a cut edge). Devices keep their busy intervals so that HEFT's insertion policy can use
idle gaps. Memory is a hard constraint: a device whose remaining capacity is below a node's
footprint is never offered for it.

Only the placement survives; the schedule is the heuristic's own estimate. Step times
reported for a placement always come from the simulator.
"""

from __future__ import annotations

import bisect

import numpy as np

from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import NoFit, comm_time, node_cost, node_memory, predecessors


class ScheduleState:
    """Partial schedule: device of each node, finish times, busy intervals, memory used."""

    def __init__(self, problem: PlacementProblem, devices: list[int]) -> None:
        self.problem = problem
        self.devices = list(devices)
        self.cost = node_cost(problem)
        self.mem = node_memory(problem)
        self.cap = np.asarray(problem.memory_capacity, dtype=np.float64)
        self.used = np.zeros(problem.num_devices)
        # The working set a device's nodes bring on top of their footprint: the backward's, or
        # the optimizer step's temporaries, whichever is larger (common.device_memory counts
        # them; without them the schedulers filled a device to its cap and the placement they
        # returned overfilled it by that working set).
        self.work = np.maximum(problem.backward_work(), problem.step_work())
        self.device_work = np.zeros(problem.num_devices)
        # On a GPU the optimizer's foreach default makes temporaries of all of a device's
        # parameters at once (envs.sim.memory_rules.step_temporaries): they add up, node by node.
        self.foreach = problem.foreach_work()
        self.gpu = ~np.asarray(problem.ops.is_cpu, dtype=bool)
        self.device = np.full(problem.num_nodes, -1, dtype=np.int64)
        self.start = np.zeros(problem.num_nodes)
        self.finish = np.zeros(problem.num_nodes)
        self.preds = predecessors(problem)
        # Sorted busy intervals per device, as parallel lists of starts and ends.
        self.busy_start: list[list[float]] = [[] for _ in range(problem.num_devices)]
        self.busy_end: list[list[float]] = [[] for _ in range(problem.num_devices)]
        self.avail = np.zeros(problem.num_devices)

    def need(self, n: int, d: int) -> float:
        """Bytes node ``n`` adds to device ``d``: its footprint plus copies of inputs from elsewhere.

        Exact as long as predecessors are placed first (all schedulers here do so).
        """
        extra = sum(float(self.problem.edge_bytes[e]) for e, s in self.preds[n] if self.device[s] != d)
        if self.gpu[d]:
            extra += float(self.foreach[n])
        return float(self.mem[n]) + extra

    def hosts(self, n: int) -> list[int]:
        """Allowed devices with room left for node ``n``."""
        return [d for d in self.devices
                if self.used[d] + self.need(n, d) + max(self.device_work[d], self.work[n]) <= self.cap[d]]

    def data_ready(self, n: int, d: int) -> float:
        """Earliest time all inputs of ``n`` are on device ``d``."""
        t = 0.0
        for e, s in self.preds[n]:
            arrive = self.finish[s] + float(comm_time(self.problem, self.problem.edge_bytes[e], int(self.device[s]), d))
            t = max(t, arrive)
        return t

    def earliest_start(self, n: int, d: int, ready: float, insertion: bool) -> float:
        """Earliest start of ``n`` on ``d`` at or after ``ready``; with ``insertion`` idle gaps count."""
        if not insertion:
            return max(ready, float(self.avail[d]))
        dur = float(self.cost[n, d])
        starts, ends = self.busy_start[d], self.busy_end[d]
        t = ready
        i = bisect.bisect_right(ends, t)  # first interval ending after t
        while i < len(starts):
            if t + dur <= starts[i]:
                return t
            t = max(t, ends[i])
            i += 1
        return t

    def place(self, n: int, d: int, start: float) -> None:
        """Put node ``n`` on device ``d`` starting at ``start``."""
        end = start + float(self.cost[n, d])
        self.used[d] += self.need(n, d)
        self.device_work[d] = max(self.device_work[d], self.work[n])
        self.device[n] = d
        self.start[n] = start
        self.finish[n] = end
        i = bisect.bisect_left(self.busy_start[d], start)
        self.busy_start[d].insert(i, start)
        self.busy_end[d].insert(i, end)
        self.avail[d] = max(self.avail[d], end)

    def room_needed(self, n: int, d: int) -> float:
        """Free bytes (:meth:`free`) device ``d`` must have for node ``n``: :meth:`need` plus the
        working space it adds there (its own beyond what the device's nodes already reserve).
        The :meth:`hosts` test, ``used + need + max(device_work, work) <= cap``, rearranged."""
        return self.need(n, d) + max(float(self.work[n]) - float(self.device_work[d]), 0.0)

    def free(self, d: int) -> float:
        """Bytes left on device ``d`` once its nodes and their working space are counted."""
        return max(float(self.cap[d] - self.used[d] - self.device_work[d]), 0.0)

    def no_room(self, n: int) -> NoFit:
        """The error for a node no allowed device has room for.

        It states what :meth:`hosts` tested, per device: the node's footprint alone (what it
        said before) read as if it fitted where more than that was free, since input copies,
        the optimizer's foreach temporaries on a GPU and the working space count too.
        """
        name = self.problem.node_names[n]
        needed = {d: self.room_needed(n, d) for d in self.devices}
        parts = "its footprint " + format_bytes(self.mem[n]) + (
            " plus inputs copied from other devices, the optimizer's temporaries on a GPU and its working space")
        if len({format_bytes(v) for v in needed.values()}) == 1:
            free = ", ".join(f"{self.problem.device_names[d]} {format_bytes(self.free(d))} free" for d in self.devices)
            return NoFit(f"node {name!r} needs {format_bytes(next(iter(needed.values())))} ({parts}) but no "
                         f"device has room ({free})")
        each = ", ".join(f"{self.problem.device_names[d]} needs {format_bytes(needed[d])} with "
                         f"{format_bytes(self.free(d))} free" for d in self.devices)
        return NoFit(f"node {name!r} fits on no device ({each}; {parts}, which differ by device)")


def eft_choice(state: ScheduleState, n: int, candidates: list[int], insertion: bool) -> tuple[int, float]:
    """Device among ``candidates`` giving node ``n`` the earliest finish, and its start time."""
    best: tuple[float, float, int] | None = None
    for d in candidates:
        start = state.earliest_start(n, d, state.data_ready(n, d), insertion)
        key = (start + float(state.cost[n, d]), start, d)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[1]


def upward_rank(problem: PlacementProblem, devices: list[int], edge_cost: np.ndarray) -> np.ndarray:
    """HEFT's upward rank: mean node cost plus the costliest path of mean costs to an exit."""
    w = node_cost(problem)[:, devices].mean(axis=1)
    rank = w.copy()
    succ_best = np.zeros(problem.num_nodes)
    # Edges are topological (src < dst); sweep nodes backwards so successors are final.
    order = np.argsort(-problem.edge_src, kind="stable")
    src, dst = problem.edge_src[order], problem.edge_dst[order]
    ec = edge_cost[order]
    j = 0
    for n in reversed(range(problem.num_nodes)):
        while j < len(src) and src[j] == n:
            succ_best[n] = max(succ_best[n], ec[j] + rank[dst[j]])
            j += 1
        rank[n] = w[n] + succ_best[n]
    return rank


def downward_rank(problem: PlacementProblem, devices: list[int], edge_cost: np.ndarray) -> np.ndarray:
    """CPOP's downward rank: the costliest path of mean costs from an entry up to the node."""
    w = node_cost(problem)[:, devices].mean(axis=1)
    rank = np.zeros(problem.num_nodes)
    order = np.argsort(problem.edge_dst, kind="stable")
    for e in order:
        s, t = problem.edge_src[e], problem.edge_dst[e]
        rank[t] = max(rank[t], rank[s] + w[s] + edge_cost[e])
    return rank


def etf_schedule(
    problem: PlacementProblem,
    devices: list[int],
    priority: np.ndarray,
    preferred: dict[int, int] | None = None,
) -> np.ndarray:
    """Earliest-task-first list scheduling with memory limits (Baechi's m-ETF core).

    At each step, among ready nodes and devices with room, schedule the pair that can start
    earliest (ties: higher ``priority``, then lower node index). ``preferred`` maps a node to
    a parent node: once that parent is placed, the node is offered only the parent's device
    when it has room there (m-SCT's favourite children).
    """
    state = ScheduleState(problem, devices)
    n_nodes = problem.num_nodes
    indeg = np.bincount(problem.edge_dst, minlength=n_nodes).astype(np.int64)
    succ: list[list[int]] = [[] for _ in range(n_nodes)]
    for s, t in zip(problem.edge_src.tolist(), problem.edge_dst.tolist()):
        succ[s].append(t)
    ready = [n for n in range(n_nodes) if indeg[n] == 0]
    arrival: dict[int, np.ndarray] = {}

    def arrive(n: int) -> np.ndarray:
        out = np.full(problem.num_devices, np.inf)
        for d in devices:
            out[d] = state.data_ready(n, d)
        return out

    for n in ready:
        arrival[n] = arrive(n)
    while ready:
        best: tuple[float, float, int, int, int] | None = None
        for n in ready:
            hosts = state.hosts(n)
            if preferred is not None and n in preferred:
                parent_dev = int(state.device[preferred[n]])
                if parent_dev in hosts:
                    hosts = [parent_dev]
            if not hosts:
                raise state.no_room(n)
            for d in hosts:
                start = max(float(arrival[n][d]), float(state.avail[d]))
                key = (start, -float(priority[n]), n, d, 0)
                if best is None or key < best:
                    best = key
        assert best is not None
        start, _, n, d, _ = best
        state.place(n, d, start)
        ready.remove(n)
        del arrival[n]
        for t in succ[n]:
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
                arrival[t] = arrive(t)
    return state.device
