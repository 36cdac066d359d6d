"""The readable oracle of the single-process training step (issue 15): the program PyTorch runs.

It works on the op graph and the cluster directly (no compiled arrays). It first builds
the program :func:`envs.runtime.apply.apply_placement` produces, then walks it with the
rules below; the batched simulator (:mod:`envs.sim.simulator`) is tested against it.

**Resources.** One *host* thread (the Python thread running the GraphModule); per GPU its
default CUDA stream (``s[d]``) and, in the backward, an autograd engine thread
(``t[d]``). A CPU device has no stream: its ops run on the host thread.

**Costs.** Per op and device: host seconds ``hF, hB, hO`` and stream seconds ``dF, dB, dO``
(:meth:`envs.sim.cost_model.CostModel.op_cost`); a copy of ``n`` bytes from a to b takes
``x = latency[a, b] + n / bandwidth[a, b]`` (0 between two CPU devices: one process, one
memory) plus ``copy_s`` on the issuing thread (:class:`~envs.sim.cost_model.HostOverheads`).

Rules (the PyTorch source or measurement behind each):

* **R1 Program order.** The host runs the fx nodes in program order: the generated
  ``GraphModule.forward`` is the graph's node list (torch/fx/graph.py ``python_code``);
  the problem's topological order keeps fx order (ties by insertion order).
* **R2/R3 Host dispatch; GPU ops are asynchronous.** Each op costs ``hF`` on the host, then
  its kernel is queued on its device's stream: ``h += hF; s[d] = max(h, s[d]) + dF``.
  "By default, GPU operations are asynchronous ... enqueued to the particular device"
  (https://pytorch.org/docs/stable/notes/cuda.html#asynchronous-execution); the caching
  allocator avoids device syncs after warm-up (same page). Measured here: an fx node costs
  2.1 us of host time on the CPU (0.9 us a bare ``torch.add``).
* **R4 CPU ops run on the host thread**: ``h += hF`` (the whole op), so a CPU op delays
  every GPU launch behind it in program order.
* **R5 Copies.** One ``to_device`` node per (producer, destination device), inserted right
  after the producer (``graph.inserting_after(producer)`` in envs/runtime/apply.py, so
  a producer's copies run in the reverse order of their first consumers), moving the
  producer's largest edge to that device. A copy a→b:
  ``hh = h + copy_s; e = max(hh, s[a], s[b]) + x; s[a] = e; s[b] = max(s[b], e)``; the host
  continues at ``hh`` when both ends are GPUs and waits (``h = e``) when either is the CPU.
  GPU→GPU: "we always perform the copy on the source device, using the current stream"
  with a two-way barrier between both devices' streams (``copy_device_to_device``,
  aten/src/ATen/native/cuda/Copy.cu). GPU→CPU is blocking (apply.py never asks for a
  non-blocking copy to the CPU; ``memcpy_and_sync`` syncs the stream). CPU→GPU from
  pageable memory with ``non_blocking=True``: "might be synchronous with respect to host",
  the driver stages it (CUDA runtime API, api-sync-behavior): modelled synchronous.
  There are no side streams (apply.py issues every copy on the current stream).
* **R6 Loss** on the host after the forward: ``h += loss_s``.
* **R7 Backward** (``loss.backward()``, torch/csrc/autograd/engine.cpp): the calling
  thread drives the CPU ready queue ("the owning thread start[s] to drive the engine
  execution for any CPU task", ``execute_with_graph_task``), and each GPU has one engine
  thread (``start_device_threads``: "one thread for every GPU device"); a node runs on the
  thread of its ``Node::device()`` (its first non-CPU input, torch/csrc/autograd/function.h).
  Every ready queue is a heap on ``sequence_nr``, highest first (``CompareNodeTaskTime``,
  engine.h), and sequence numbers grow in forward creation order, so each free thread
  runs, of its ready nodes, the one created last. A node becomes ready when its last
  gradient producer finished on its thread (host time, ``evaluate_function``). An op on
  thread p: ``st = max(t[p], ready); t[p] = st + hB; s[d] = max(t[p], s[d]) + dB``. The
  backward of a copy a→b (``grad.to(a)``, ``_to_copy_backward``) runs on b's thread as a
  copy b→a with the R5 formula. A picked node holds its thread for its host part, then
  its kernel (or copy) is enqueued: streams take work in enqueue-time order; enqueues are
  processed in time order, at equal times the node created last first.
* **R8 Optimizer** after ``backward()`` returns (when every thread is done, plus
  ``backward_call_s``; measured here: 22 us fixed per call): ``optimizer.step()`` on the
  host in parameter order (≈ program order): ``h += hO; s[d] = max(h, s[d]) + dO``.
  (torch/optim: a per-tensor loop unless every parameter is on a foreach device; the
  foreach launch saving is not modelled.)
* **R9 Step end**: ``max(h, max_d s[d]) + step_s`` (the measurement syncs every device).
* **R10 Memory** per device: parameters + gradients + optimizer state of its ops, their
  kept activations (allocated at dispatch, freed by their backward op; ``act_bytes``, the
  storages autograd saves, measured at capture by :mod:`graphs.saved_activations`) and
  each received copy (freed when its consumers' backward ran). All allocations happen in
  the forward, all frees in the backward, so the peak is reached at the forward/backward
  boundary; this oracle keeps the event series anyway and the tests check the closed form.
  On top of it, the backward's working set: :data:`~envs.sim.memory_rules.BACKWARD_WORK_FACTOR`
  times the largest gradient among the device's ops, an output's or a shared parameter's
  (the engine holds an op's output gradient while its backward allocates the input
  gradients; a tied parameter's second gradient is summed into its first; measured against
  the CPU allocator in benchmarks/results/memory.md). The optimizer step runs after the
  backward freed all of that; its peak, parameters + gradients + state + the batch and the
  model's output (the training loop holds them) plus
  :data:`~envs.sim.optimizer_state.OPTIMIZER_STEP_WORK` times the device's largest op's
  parameter bytes (torch.optim's per-parameter loop allocates its temporaries one
  parameter at a time; on a GPU its default foreach implementation allocates them for all
  of the device's parameters at once, ``OPTIMIZER_FOREACH_WORK`` times their sum), is the
  device's peak when larger.

Consequences worth knowing (tests/test_simulator.py holds them):

* one host thread issues every forward launch, so launch overhead does not parallelise
  across GPUs in one process (backward launches do: one engine thread per GPU);
* a CPU op delays every GPU launch behind it in program order;
* a recurrent model split by layers pipelines (the wavefront) only when its program order
  interleaves the layers (time-major, as the zoo NMT decoder). With layer-major order (the
  zoo RNNLM: all steps of layer 1, then layer 2) every copy's two-way barrier queues the
  next GPU's stream behind the last copy of layer 1, and in the backward that GPU's thread
  launches all of its layer before the gradient copies: no overlap, as PyTorch runs it on
  the default streams. The design note expected a wavefront there; the rules cited above
  say otherwise. Side streams for copies (a runtime change in envs/runtime/apply.py) would
  restore it; the design leaves that to a measurement on two GPUs (M3).

Not modelled (limits): multi-kernel ops start after their whole dispatch; the CUDA launch
queue's depth (~1,024 pending launches) never blocks the host; CPU intra-op threads
(profiles are taken at one thread).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from envs.sim.cost_model import CostModel, node_requires_grad, param_grad_bytes, trained_param_bytes
from envs.sim.memory_rules import BACKWARD_WORK_FACTOR, gradient_bytes, loop_held_bytes
from envs.sim.optimizer_state import OPTIMIZER_FOREACH_WORK, OPTIMIZER_STATE_FACTOR, OPTIMIZER_STEP_WORK
from envs.sim.problem import PlacementError
from envs.sim.problem_compile import resolve_optimizer, topological_order
from envs.sim.simulator import StepResult

HOST = "host"


@dataclass
class ReferenceTrace:
    """What the oracle saw: per task its thread, issue interval on the host/engine thread
    and its interval on a stream (for tests and debugging)."""

    host_end: float = 0.0
    events: list[tuple[str, str, float, float]] = field(default_factory=list)  # (task, resource, start, end)

    def interval(self, task: str, resource_prefix: str = "") -> tuple[float, float]:
        """The (start, end) of ``task`` on the first resource starting with ``resource_prefix``."""
        for name, res, a, b in self.events:
            if name == task and res.startswith(resource_prefix):
                return a, b
        raise KeyError(task)


def simulate_reference(
    graph: nx.DiGraph,
    cluster: Cluster | str,
    placement: Mapping[str, str],
    optimizer: str | None = None,
    cost_model: CostModel | None = None,
    trace: ReferenceTrace | None = None,
) -> StepResult:
    """Simulate one training step of ``placement`` (op name -> device name) by the rules above.

    ``optimizer`` as for :func:`envs.sim.problem_compile.compile_problem` (default: the graph's own).
    ``trace``, when given, receives every task's intervals.
    """
    cluster = load_cluster(cluster)
    key = resolve_optimizer(graph, optimizer)
    if cost_model is None:
        cost_model = CostModel.for_graph(graph, cluster, optimizer=key)
    host_costs = cost_model.host
    devices = cluster.device_names
    missing = [v for v in graph.nodes if v not in placement]
    if missing:
        raise PlacementError(f"placement misses {len(missing)} of {graph.number_of_nodes()} nodes, e.g. {missing[:3]}")
    for v, dev in placement.items():
        if v not in graph:
            raise PlacementError(f"placement names node {v!r}, which is not in the graph")
        if dev not in devices:
            raise PlacementError(f"node {v!r} is placed on unknown device {dev!r}; devices are {devices}")
    trace = trace if trace is not None else ReferenceTrace()

    order = topological_order(graph)
    pos = {v: i for i, v in enumerate(order)}
    dev_of = {v: placement[v] for v in order}
    cpu = {name: cluster.device(name).kind == "cpu" for name in devices}
    grad = {v: node_requires_grad(graph.nodes[v]) for v in order}
    cost = {v: cost_model.op_cost(graph.nodes[v], cluster.device(dev_of[v])) for v in order}

    def copy_time(a: str, b: str, nbytes: float) -> float:
        if a == b or (cpu[a] and cpu[b]):
            return 0.0
        link = cluster.link(a, b)
        return link.latency_s + nbytes / link.bandwidth_Bps

    # ---- the applied program (apply.py): each op, then its copies in program order
    consumers = {v: sorted(graph.successors(v), key=pos.__getitem__) for v in order}
    copies: dict[str, list[tuple[str, float]]] = {}
    for v in order:
        first_seen: list[str] = []
        nbytes: dict[str, float] = {}
        for c in consumers[v]:
            b = dev_of[c]
            if b == dev_of[v]:
                continue
            if b not in nbytes:
                first_seen.append(b)
            nbytes[b] = max(nbytes.get(b, 0.0), float(graph.edges[v, c].get("bytes") or 0))
        copies[v] = [(b, nbytes[b]) for b in reversed(first_seen)]  # inserting_after: last inserted runs first

    stream = {name: 0.0 for name in devices if not cpu[name]}
    xfer_time = xfer_bytes = 0.0

    def on_stream(name: str, task: str, issue: float, duration: float) -> float:
        start = max(issue, stream[name])
        stream[name] = start + duration
        trace.events.append((task, f"stream:{name}", start, stream[name]))
        return stream[name]

    def copy(task: str, a: str, b: str, nbytes: float, issued: float) -> float:
        """R5: a copy a→b enqueued at ``issued``; returns when the issuing thread is free."""
        nonlocal xfer_time, xfer_bytes
        x = copy_time(a, b, nbytes)
        end = max([issued] + [stream[n] for n in (a, b) if not cpu[n]]) + x
        for n in (a, b):
            if not cpu[n]:
                stream[n] = end
        trace.events.append((task, f"copy:{a}->{b}", end - x, end))
        xfer_time += x
        xfer_bytes += nbytes
        return end if (cpu[a] or cpu[b]) else issued

    # ---- forward: R1-R6 on the host thread
    h = 0.0
    memory_events: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    for v in order:
        d = dev_of[v]
        hF, dF = cost[v][0], cost[v][1]
        trace.events.append((f"F:{v}", f"thread:{HOST}", h, h + hF))
        h += hF
        if not cpu[d]:
            on_stream(d, f"F:{v}", h, dF)
        for b, nbytes in copies[v]:
            trace.events.append((f"XF:{v}->{b}", f"thread:{HOST}", h, h + host_costs.copy_s))
            h = copy(f"XF:{v}->{b}", d, b, nbytes, h + host_costs.copy_s)
    h += host_costs.loss_s
    t_root = h

    # ---- backward: R7, the autograd engine
    def thread_of(name: str) -> str:
        return HOST if cpu[name] else name

    nodes: dict[tuple, dict] = {}
    seq = 0
    for v in order:
        if not grad[v]:
            continue
        nodes[("B", v)] = {"seq": seq, "thread": thread_of(dev_of[v]), "deps": set()}
        seq += 1
        for b, nbytes in copies[v]:  # program order of the copy nodes
            producers = [c for c in consumers[v] if dev_of[c] == b and grad[c]]
            if producers:
                nodes[("X", v, b)] = {"seq": seq, "thread": thread_of(b), "deps": set(), "bytes": nbytes}
            seq += 1
    # Sequence numbers: an op's copies are created after it (they follow it in program order).
    for v in order:
        if not grad[v]:
            continue
        for c in consumers[v]:
            if not grad[c]:
                continue
            if dev_of[c] == dev_of[v]:
                nodes[("B", v)]["deps"].add(("B", c))
            else:
                nodes[("X", v, dev_of[c])]["deps"].add(("B", c))
                nodes[("B", v)]["deps"].add(("X", v, dev_of[c]))
    dependents: dict[tuple, list[tuple]] = defaultdict(list)
    for name, node in nodes.items():
        for dep in node["deps"]:
            dependents[dep].append(name)
    remaining = {name: len(node["deps"]) for name, node in nodes.items()}
    ready_at: dict[tuple, float] = {name: t_root for name, r in remaining.items() if r == 0}
    threads = {HOST} | {name for name in devices if not cpu[name]}
    free = {p: t_root for p in threads}
    waiting: dict[str, list[tuple[float, int, tuple]]] = {p: [] for p in threads}  # known-ready, by ready time
    for name, r in ready_at.items():
        heapq.heappush(waiting[nodes[name]["thread"]], (r, -nodes[name]["seq"], name))
    done: dict[tuple, float] = {}
    while any(waiting.values()):
        # Each thread's next node: when the thread is free it takes, of the nodes ready by
        # then, the one created last (if none is ready it waits for the earliest); the node
        # is enqueued after its host part. Enqueues happen in time order, at equal times the
        # node created last first.
        best = None
        for p in sorted(threads):
            if not waiting[p]:
                continue
            when = max(free[p], waiting[p][0][0])
            item = max((it for it in waiting[p] if it[0] <= when), key=lambda it: -it[1])
            name = item[2]
            host = cost[name[1]][2] if name[0] == "B" else host_costs.copy_s
            cand = (when + host, item[1], when, p, item)
            if best is None or cand[:2] < best[:2]:
                best = cand
        enqueued, _, when, p, item = best
        waiting[p].remove(item)
        heapq.heapify(waiting[p])
        name = item[2]
        if name[0] == "B":  # the thread launches the op; its kernel goes on the stream
            v = name[1]
            d = dev_of[v]
            trace.events.append((f"B:{v}", f"thread:{p}", when, enqueued))
            free[p] = enqueued
            if not cpu[d]:
                on_stream(d, f"B:{v}", enqueued, cost[v][3])
        else:
            _, v, b = name
            trace.events.append((f"XB:{b}->{v}", f"thread:{p}", when, enqueued))
            free[p] = copy(f"XB:{b}->{v}", b, dev_of[v], nodes[name]["bytes"], enqueued)
        done[name] = free[p]
        for nxt in dependents[name]:
            remaining[nxt] -= 1
            if remaining[nxt] == 0:
                r = max(done[dep] for dep in nodes[nxt]["deps"])
                heapq.heappush(waiting[nodes[nxt]["thread"]], (r, -nodes[nxt]["seq"], nxt))
    if len(done) != len(nodes):
        raise RuntimeError("reference simulator: the backward graph has a cycle")

    # ---- optimizer (R8) and step end (R9)
    h = max(free.values()) + host_costs.backward_call_s
    for v in order:
        d = dev_of[v]
        hO, dO = cost[v][4], cost[v][5]
        trace.events.append((f"O:{v}", f"thread:{HOST}", h, h + hO))
        h += hO
        if not cpu[d]:
            on_stream(d, f"O:{v}", h, dO)
    trace.host_end = h
    step = max([h] + list(stream.values())) + host_costs.step_s

    # ---- memory (R10): allocation at the forward dispatch, free at the backward
    state = OPTIMIZER_STATE_FACTOR[key]
    stated = all("act_bytes" in graph.nodes[v] for v in order)  # a group graph may state it
    base = {name: 0.0 for name in devices}
    fwd_at = {task: a for task, res, a, _ in trace.events if res == f"thread:{HOST}" and task.startswith(("F:", "XF:"))}
    for v in order:
        attrs = graph.nodes[v]
        # a frozen parameter or a buffer pins its own bytes; a trained one its gradient and state too
        base[dev_of[v]] += (float(attrs.get("param_bytes") or 0) + param_grad_bytes(attrs)
                            + trained_param_bytes(attrs) * state)
        if stated:
            act = float(attrs["act_bytes"] or 0)
        else:
            keeps = grad[v] and attrs.get("op") not in ("get_attr", "output")
            act = float(attrs.get("out_bytes") or 0) if keeps else 0.0
        freed = done.get(("B", v), step)
        memory_events[dev_of[v]] += [(fwd_at[f"F:{v}"], 0, act), (freed, 1, -act)]
        for b, nbytes in copies[v]:
            users = [done.get(("B", c), step) for c in consumers[v] if dev_of[c] == b]
            memory_events[b] += [(fwd_at[f"XF:{v}->{b}"], 0, nbytes), (max(users), 1, -nbytes)]
    # The backward's working set: BACKWARD_WORK_FACTOR x the device's largest gradient; the
    # optimizer step's temporaries of its largest parameters (OPTIMIZER_STEP_WORK).
    work = {name: 0.0 for name in devices}
    step_work = {name: 0.0 for name in devices}
    foreach = {name: 0.0 for name in devices}
    at_step = dict(base)  # the static memory, and the batch and output the training loop holds
    for v in order:
        at_step[dev_of[v]] += loop_held_bytes(graph, v)
        work[dev_of[v]] = max(work[dev_of[v]], BACKWARD_WORK_FACTOR * gradient_bytes(graph.nodes[v]))
        if grad[v]:
            own = param_grad_bytes(graph.nodes[v])
            step_work[dev_of[v]] = max(step_work[dev_of[v]], OPTIMIZER_STEP_WORK[key] * own)
            foreach[dev_of[v]] += OPTIMIZER_FOREACH_WORK[key] * own
    peak = np.array([base[name] for name in devices])
    for k, name in enumerate(devices):
        level = base[name]
        for _, _, delta in sorted(memory_events[name]):
            level += delta
            peak[k] = max(peak[k], level)
        # The step comes after every free: the static memory and the step's temporaries.
        temporaries = step_work[name] if cpu[name] else max(step_work[name], foreach[name])
        peak[k] = max(peak[k] + work[name], at_step[name] + temporaries)

    busy = np.zeros(len(devices))
    for v in order:
        busy[devices.index(dev_of[v])] += sum(cost[v])
    capacity = np.array([dv.usable_bytes for dv in cluster.devices], dtype=np.float64)
    over = np.maximum(peak - capacity, 0.0)
    return StepResult(
        step_time=step,
        busy_time=busy,
        peak_memory=peak,
        fits=bool(np.all(over <= 0)),
        over_memory=over,
        transfer_time=xfer_time,
        transfer_bytes=xfer_bytes,
    )
