"""What every baseline shares: the result type, the inputs, costs and the memory model.

A baseline is a function ``(problem, inputs) -> placement row`` over a
:class:`envs.sim.problem.PlacementProblem`. It raises :class:`NoFit` when it cannot find a
placement that respects device memory; :func:`placer.search.baselines.registry.run_baseline`
turns that into a :class:`BaselineResult` with ``placement=None`` and the reason.

Costs used by the heuristics (the simulator alone reports step times):

* node cost on device d: ``fwd_time[n, d] + bwd_time[n, d]`` (backward follows forward);
* a cut edge costs the activation going forward plus its gradient coming back:
  ``2 * (latency + bytes / bandwidth)``;
* memory a node pins on its device: parameters + gradients + optimizer state
  (``problem.static_memory()``) + the activation it keeps for backward
  (``problem.act_bytes``); and a cut edge's tensor is copied onto the consumer's device.
  All of these are live together at the turn from forward to backward, so a device's
  peak is their sum — the simulator's memory rule (``envs.sim.simulator``), reproduced here
  so heuristics can check memory without simulating — plus, per device, the backward's
  working set (twice its largest gradient, :func:`envs.sim.memory_rules.device_max`); or, when
  larger, what the optimizer step holds (static memory, the loop's batch and output, the
  temporaries of the device's largest parameters' update, or on a GPU of all of them:
  :func:`envs.sim.memory_rules.step_temporaries`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from envs.hardware.units import format_bytes
from envs.sim.memory_rules import device_max, step_temporaries
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from graphs.capture import CapturedModel

GIB = 2**30


class NoFit(PlacerError):
    """A baseline found no placement that fits device memory (the message says why)."""


class BaselineError(PlacerError, ValueError):
    """A baseline asked for by an unknown name, or given inputs it cannot use."""


@dataclass(frozen=True)
class BaselineResult:
    """Outcome of one baseline on one problem.

    Attributes:
        name: the baseline's registry name.
        placement: [N] device indices in ``problem.node_names`` order, or None when no
            fitting placement was found.
        reason: why ``placement`` is None ("" when it is not), or a note on how it was made.
        search_time: wall seconds the baseline spent.
        evaluated: placements the baseline scored with the simulator (0 for constructive ones).
        history: ``(wall seconds, evaluated, best step time)`` points for search-style baselines.
    """

    name: str
    placement: np.ndarray | None
    reason: str
    search_time: float
    evaluated: int = 0
    history: list[tuple[float, int, float]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.placement is not None


@dataclass
class BaselineInputs:
    """Everything beyond the problem that some baselines read.

    Attributes:
        graph: the placement graph whose nodes are ``problem.node_names`` (module-aware
            baselines need its ``module`` / ``members`` / ``target`` attributes).
        captured: a ``graphs.capture.CapturedModel`` (``gm``, op-level ``graph``) for the
            fx partitioner and for module paths of group members.
        op_to_group: op name -> problem node name when the problem is a group graph.
        seed: random seed.
        placements: evaluation budget for search baselines (``random``).
    """

    graph: nx.DiGraph | None = None
    captured: CapturedModel | None = None
    op_to_group: Mapping[str, str] | None = None
    seed: int = 0
    placements: int | None = None


# ----------------------------------------------------------------------------- costs


def node_cost(problem: PlacementProblem) -> np.ndarray:
    """[N, D] seconds of forward + backward of each node on each device."""
    return np.asarray(problem.fwd_time, dtype=np.float64) + np.asarray(problem.bwd_time, dtype=np.float64)


def node_memory(problem: PlacementProblem) -> np.ndarray:
    """[N] bytes each node needs on its device at peak (static + kept activation)."""
    return np.asarray(problem.static_memory(), dtype=np.float64) + np.asarray(problem.act_bytes, dtype=np.float64)


def device_memory(problem: PlacementProblem, row: np.ndarray) -> np.ndarray:
    """[D] peak bytes on each device for the placement ``row`` under the memory model above."""
    row = np.asarray(row, dtype=np.int64)
    used = np.bincount(row, weights=node_memory(problem), minlength=problem.num_devices)
    # Received copies as the simulator counts them (envs.sim.simulator): one per (producer op,
    # destination device), the producer's largest edge there, as apply.py makes them.
    ops = problem.ops
    dev = row[ops.op_group]
    src, dst, nbytes = ops.edges()
    cut = dev[src] != dev[dst]
    largest = np.zeros((ops.num_ops, problem.num_devices))
    np.maximum.at(largest, (src[cut], dev[dst][cut]), nbytes[cut])
    used += largest.sum(axis=0)
    # The backward's working set, as the simulator adds it (envs.sim.memory_rules.BACKWARD_WORK_FACTOR).
    used += device_max(row[None, :], problem.backward_work(), problem.num_devices)[0]
    # The optimizer step, after the backward freed the activations and copies: the static
    # memory, the loop's batch and output, and the step's temporaries (envs.sim.simulator).
    at_step = np.bincount(row, weights=problem.at_step_memory(), minlength=problem.num_devices)
    foreach = np.bincount(row, weights=problem.foreach_work(), minlength=problem.num_devices)
    at_step += step_temporaries(problem.ops.is_cpu, device_max(row[None, :], problem.step_work(), problem.num_devices)[0],
                                foreach)
    return np.maximum(used, at_step)


def fits(problem: PlacementProblem, row: np.ndarray) -> bool:
    """True when ``row`` keeps every device within its memory capacity."""
    return bool(np.all(device_memory(problem, row) <= problem.memory_capacity))


def overflow_reason(problem: PlacementProblem, row: np.ndarray) -> str:
    """Text naming the devices ``row`` overfills, e.g. ``gpu1 needs 13.2 GiB of 12.0 GiB``."""
    used = device_memory(problem, row)
    parts = [
        f"{problem.device_names[d]} needs {format_bytes(used[d])} of {format_bytes(problem.memory_capacity[d])}"
        for d in range(problem.num_devices)
        if used[d] > problem.memory_capacity[d]
    ]
    return "; ".join(parts)


def comm_time(problem: PlacementProblem, nbytes: float | np.ndarray, src: int, dst: int) -> np.ndarray | float:
    """Seconds a cut edge costs between ``src`` and ``dst``: activation forward + gradient back."""
    if src == dst:
        return 0.0 * np.asarray(nbytes, dtype=np.float64)
    one_way = problem.latency[src, dst] + np.asarray(nbytes, dtype=np.float64) / problem.bandwidth[src, dst]
    back = problem.latency[dst, src] + np.asarray(nbytes, dtype=np.float64) / problem.bandwidth[dst, src]
    return one_way + back


def mean_comm(problem: PlacementProblem, devices: list[int]) -> np.ndarray:
    """[E] average cut cost of each edge over ordered pairs of distinct ``devices`` (0 with one device)."""
    pairs = [(a, b) for a in devices for b in devices if a != b]
    if not pairs:
        return np.zeros(problem.num_edges)
    return np.mean([comm_time(problem, problem.edge_bytes, a, b) for a, b in pairs], axis=0)


def accelerators(problem: PlacementProblem) -> list[int]:
    """Indices of the non-CPU devices, or of all devices when there is no accelerator.

    The literature's round-robin, expert and split placements spread work over the GPUs;
    the host CPU is only a device of last resort for them.
    """
    acc = [i for i, k in enumerate(problem.device_kinds) if k != "cpu"]
    return acc or list(range(problem.num_devices))


def fastest_first(problem: PlacementProblem, devices: list[int]) -> list[int]:
    """``devices`` sorted by total node cost on them (fastest first), ties by index."""
    total = node_cost(problem).sum(axis=0)
    return sorted(devices, key=lambda d: (total[d], d))


def predecessors(problem: PlacementProblem) -> list[list[tuple[int, int]]]:
    """For each node the list of ``(edge index, source node)`` of its in-edges."""
    preds: list[list[tuple[int, int]]] = [[] for _ in range(problem.num_nodes)]
    for e, (s, t) in enumerate(zip(problem.edge_src.tolist(), problem.edge_dst.tolist())):
        preds[t].append((e, s))
    return preds


def successors(problem: PlacementProblem) -> list[list[tuple[int, int]]]:
    """For each node the list of ``(edge index, destination node)`` of its out-edges."""
    succs: list[list[tuple[int, int]]] = [[] for _ in range(problem.num_nodes)]
    for e, (s, t) in enumerate(zip(problem.edge_src.tolist(), problem.edge_dst.tolist())):
        succs[s].append((e, t))
    return succs


def fill_unassigned(problem: PlacementProblem, row: np.ndarray, default: int) -> np.ndarray:
    """Give every node marked -1 a device: its heaviest-edge placed predecessor's, else its
    heaviest-edge placed successor's, else ``default``.

    Module-level baselines assign modules; the glue ops between them (additions, reshapes,
    inputs) should sit with the data they touch, which this keeps off the cut edges.
    """
    row = np.array(row, dtype=np.int64)
    preds, succs = predecessors(problem), successors(problem)
    eb = problem.edge_bytes
    for _ in range(2):  # forward pass takes predecessors, backward pass successors
        for n in range(problem.num_nodes):
            if row[n] < 0:
                placed = [(eb[e], -s, row[s]) for e, s in preds[n] if row[s] >= 0]
                if placed:
                    row[n] = max(placed)[2]
        for n in reversed(range(problem.num_nodes)):
            if row[n] < 0:
                placed = [(eb[e], -t, row[t]) for e, t in succs[n] if row[t] >= 0]
                if placed:
                    row[n] = max(placed)[2]
    row[row < 0] = default
    return row


def repair_memory(problem: PlacementProblem, row: np.ndarray, devices: list[int] | None = None) -> np.ndarray:
    """Move nodes off overfull devices until every device fits, or raise :class:`NoFit`.

    Greedy: from an overfull device, move the node whose move costs the fewest cut bytes
    (bytes to neighbours left behind minus bytes to neighbours already on the target) to a
    device in ``devices`` that has room for it. Used by partitioners that balance compute
    but not memory (min-cut).
    """
    devices = list(range(problem.num_devices)) if devices is None else list(devices)
    row = np.array(row, dtype=np.int64)
    mem = node_memory(problem)
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    used = device_memory(problem, row)
    if mem.sum() > cap[devices].sum():
        raise NoFit(
            f"the graph needs {format_bytes(mem.sum())} but the devices together hold {format_bytes(cap[devices].sum())}"
        )
    neigh: list[list[tuple[int, float]]] = [[] for _ in range(problem.num_nodes)]
    inbound: list[list[tuple[int, float]]] = [[] for _ in range(problem.num_nodes)]
    for s, t, b in zip(problem.edge_src.tolist(), problem.edge_dst.tolist(), problem.edge_bytes.tolist()):
        neigh[s].append((t, b))
        neigh[t].append((s, b))
        inbound[t].append((s, b))
    seen = {row.tobytes()}
    for _ in range(problem.num_nodes * len(devices) + 1):  # a move per node and device at most
        over = [d for d in range(problem.num_devices) if used[d] > cap[d]]
        if not over:
            return row
        d = over[0]
        moves: list[tuple[float, int, int]] = []
        for n in np.flatnonzero(row == d):
            if mem[n] <= 0:
                continue
            stay = sum(b for m, b in neigh[n] if row[m] == d)
            for t in devices:
                # the node brings its own footprint plus copies of inputs not already on t
                arriving = mem[n] + sum(b for m, b in inbound[n] if row[m] != t)
                if t == d or used[t] + arriving > cap[t]:
                    continue
                gain = sum(b for m, b in neigh[n] if row[m] == t) - stay
                moves.append((-gain, int(n), t))
        # The estimate above misses what the move changes elsewhere (buffers of copies out of
        # d, working sets): each move is taken only if the memory model agrees the target still
        # fits, and never back to a placement seen before (a group moving to and fro for ever).
        for _, n, t in sorted(moves):
            trial = row.copy()
            trial[n] = t
            after = device_memory(problem, trial)
            if after[t] <= cap[t] and after[d] < used[d] and trial.tobytes() not in seen:
                row, used = trial, after
                seen.add(row.tobytes())
                break
        else:
            raise NoFit(f"could not move enough nodes off {problem.device_names[d]}: {overflow_reason(problem, row)}")
    raise NoFit(f"moving nodes did not make every device fit: {overflow_reason(problem, row)}")


def node_attr(graph: nx.DiGraph | None, name: str, key: str, default: Any = None) -> Any:
    """``graph.nodes[name][key]`` or ``default`` when the graph, node or key is missing."""
    if graph is None or name not in graph.nodes:
        return default
    return graph.nodes[name].get(key, default)


def check_graph(problem: PlacementProblem, graph: nx.DiGraph | None, who: str) -> nx.DiGraph:
    """The placement graph for baselines that need module structure; clear error when missing."""
    if graph is None:
        raise BaselineError(f"baseline {who!r} needs the placement graph (module names); pass graph=...")
    missing = [n for n in problem.node_names if n not in graph.nodes]
    if missing:
        raise BaselineError(
            f"baseline {who!r}: the graph lacks {len(missing)} of the problem's nodes, e.g. {missing[:3]}; "
            "pass the graph the problem was compiled from"
        )
    return graph
