"""A slow, readable, event-driven simulator: the oracle the batched simulator is tested against.

It works on the networkx graph and the cluster directly (no compiled arrays) and follows
the rules written in :mod:`envs.sim.simulator`:

* every forward op, backward op (nodes that require grad) and transfer (each cut edge,
  forward; and back for gradients when both ends require grad) is a *task* on a
  *resource*: a device's compute stream or an ordered device pair's channel;
* each resource runs its tasks one at a time in a fixed queue order (device: forward in
  topological order, then backward in reverse; channel: forward copies by consumer then
  producer, then gradient copies by receiver in reverse order then sender);
* a task starts when it is at the head of its queue, its resource is free and the tasks
  it depends on have finished; events (task finishes) are processed from a heap in time order.

Memory is tracked as a time series per device: parameters, gradients and optimizer state
for the whole step; a node's kept activation from the end of its forward op to the end
of its backward op; a received copy from the end of its transfer to the end of its
consumer's backward op (or the end of the step when the consumer has no backward op).
The peak of that series is reported, so the tests also check the batched simulator's
closed-form peak.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Hashable, Mapping

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from envs.sim.cost_model import CostModel, node_requires_grad
from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR
from envs.sim.problem import PlacementError, resolve_optimizer, topological_order
from envs.sim.simulator import StepResult


def simulate_reference(
    graph: nx.DiGraph,
    cluster: Cluster | str,
    placement: Mapping[str, str],
    optimizer: str | None = None,
    cost_model: CostModel | None = None,
) -> StepResult:
    """Simulate one training step of ``placement`` (node name -> device name) event by event.

    ``optimizer`` as for :func:`envs.sim.problem.compile_problem` (default: the graph's own).
    """
    cluster = load_cluster(cluster)
    key = resolve_optimizer(graph, optimizer)
    if cost_model is None:
        cost_model = CostModel.for_graph(graph, cluster, optimizer=key)
    state_factor = OPTIMIZER_STATE_FACTOR[key]
    devices = cluster.device_names
    missing = [v for v in graph.nodes if v not in placement]
    if missing:
        raise PlacementError(f"placement misses {len(missing)} of {graph.number_of_nodes()} nodes, e.g. {missing[:3]}")
    for v, dev in placement.items():
        if v not in graph:
            raise PlacementError(f"placement names node {v!r}, which is not in the graph")
        if dev not in devices:
            raise PlacementError(f"node {v!r} is placed on unknown device {dev!r}; devices are {devices}")

    order = topological_order(graph)
    pos = {v: i for i, v in enumerate(order)}
    dev_of = {v: placement[v] for v in order}
    grad = {v: node_requires_grad(graph.nodes[v]) for v in order}
    cost = {v: cost_model.node_cost(graph.nodes[v], cluster.device(dev_of[v])) for v in order}

    # ---- tasks: name -> (resource, duration, dependencies)
    duration: dict[Hashable, float] = {}
    resource: dict[Hashable, Hashable] = {}
    deps: dict[Hashable, list[Hashable]] = defaultdict(list)
    xfer_bytes: dict[Hashable, float] = {}
    for v in order:
        duration[("F", v)] = cost[v][0]
        resource[("F", v)] = ("device", dev_of[v])
        if grad[v]:
            duration[("B", v)] = cost[v][1]
            resource[("B", v)] = ("device", dev_of[v])
    def add_copy(task: Hashable, src: str, dst: str, nbytes: float, after: Hashable, before: Hashable) -> None:
        """A copy of ``nbytes`` over the src→dst channel, after task ``after``, before task ``before``."""
        link = cluster.link(src, dst)
        duration[task] = link.latency_s + nbytes / link.bandwidth_Bps
        resource[task] = ("channel", src, dst)
        xfer_bytes[task] = nbytes
        deps[task].append(after)
        deps[before].append(task)

    for u, v, data in graph.edges(data=True):
        nbytes = float(data.get("bytes") or 0)
        if dev_of[u] == dev_of[v]:
            deps[("F", v)].append(("F", u))
            if grad[u] and grad[v]:
                deps[("B", u)].append(("B", v))
            continue
        add_copy(("XF", u, v), dev_of[u], dev_of[v], nbytes, after=("F", u), before=("F", v))
        if grad[u] and grad[v]:
            add_copy(("XB", v, u), dev_of[v], dev_of[u], nbytes, after=("B", v), before=("B", u))

    # ---- the fixed queue order of every resource
    def queue_key(task: tuple) -> tuple:
        kind = task[0]
        if kind == "F":
            return (0, pos[task[1]])
        if kind == "B":
            return (1, -pos[task[1]])
        if kind == "XF":  # ("XF", producer, consumer): by consumer, then producer
            return (0, pos[task[2]], pos[task[1]])
        return (1, -pos[task[2]], pos[task[1]])  # ("XB", sender, receiver)

    queues: dict[Hashable, deque] = defaultdict(deque)
    for task in sorted(duration, key=lambda t: (str(resource[t]), queue_key(t))):
        queues[resource[task]].append(task)
    dependents: dict[Hashable, list[Hashable]] = defaultdict(list)
    for task, before in deps.items():
        for b in before:
            dependents[b].append(task)

    # ---- event loop
    finish: dict[Hashable, float] = {}
    start: dict[Hashable, float] = {}
    busy_resource: set[Hashable] = set()
    events: list[tuple[float, int, Hashable]] = []
    seq = 0

    def try_start(res: Hashable, now: float) -> None:
        nonlocal seq
        if res in busy_resource or not queues[res]:
            return
        head = queues[res][0]
        if any(d not in finish for d in deps[head]):
            return
        queues[res].popleft()
        busy_resource.add(res)
        start[head] = now
        heapq.heappush(events, (now + duration[head], seq, head))
        seq += 1

    for res in list(queues):
        try_start(res, 0.0)
    while events:
        now, _, task = heapq.heappop(events)
        finish[task] = now
        busy_resource.discard(resource[task])
        try_start(resource[task], now)
        for nxt in dependents[task]:
            try_start(resource[nxt], now)
    if len(finish) != len(duration):
        raise RuntimeError("reference simulator deadlocked: the queue orders contradict the dependencies")

    # ---- results
    step = max(finish.values()) if finish else 0.0
    busy = np.zeros(len(devices))
    for v in order:
        busy[devices.index(dev_of[v])] += cost[v][0] + (cost[v][1] if grad[v] else 0.0)
    peak = _peak_memory(graph, order, dev_of, grad, finish, devices, state_factor, step)
    capacity = np.array([d.memory_bytes for d in cluster.devices], dtype=np.float64)
    over = np.maximum(peak - capacity, 0.0)
    copies = [t for t in duration if t[0] in ("XF", "XB")]
    return StepResult(
        step_time=step,
        busy_time=busy,
        peak_memory=peak,
        fits=bool(np.all(over <= 0)),
        over_memory=over,
        transfer_time=float(sum(duration[t] for t in copies)),
        transfer_bytes=float(sum(xfer_bytes[t] for t in copies)),
    )


def _peak_memory(graph, order, dev_of, grad, finish, devices, state_factor, step) -> np.ndarray:
    """Peak of each device's memory over the simulated step (allocation/free events)."""
    changes: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    base = np.zeros(len(devices))
    stated = all("act_bytes" in graph.nodes[v] for v in order)  # group graphs may state it
    for v in order:
        attrs = graph.nodes[v]
        d = devices.index(dev_of[v])
        base[d] += float(attrs.get("param_bytes") or 0) * (2.0 + state_factor)
        if stated:
            act = float(attrs["act_bytes"] or 0)
        else:
            keeps = grad[v] and attrs.get("op") not in ("get_attr", "output")
            act = float(attrs.get("out_bytes") or 0) if keeps else 0.0
        if act:
            # At equal times allocations come first (key 0): an allocation on a device
            # always happens-before the backward op that frees something there.
            changes[dev_of[v]].append((finish[("F", v)], 0, act))
            changes[dev_of[v]].append((finish[("B", v)] if grad[v] else step, 1, -act))
    for u, v, data in graph.edges(data=True):
        if dev_of[u] != dev_of[v]:
            nbytes = float(data.get("bytes") or 0)
            freed = finish[("B", v)] if grad[v] else step
            changes[dev_of[v]].append((finish[("XF", u, v)], 0, nbytes))
            changes[dev_of[v]].append((freed, 1, -nbytes))
    peak = base.copy()
    for dev, items in changes.items():
        d = devices.index(dev)
        level = base[d]
        for _, _, delta in sorted(items):
            level += delta
            peak[d] = max(peak[d], level)
    return peak
