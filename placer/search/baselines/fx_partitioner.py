"""PyTorch's own partitioner: ``torch.fx.experimental.accelerator_partitioner.Partitioner``
in its ``size_based``, ``cost_aware`` and ``kl_based`` modes (``fx_size_based``,
``fx_cost_aware``, ``fx_kl_based``).

It runs on the captured fx ``GraphModule`` (whose node names are the op graph's), which
carries ``tensor_meta`` from capture; the partitioner sizes nodes by parameters + output
bytes (``get_size_of_all_nodes``). Its device memory is therefore given in that unit:
each accelerator's capacity scaled by (partitioner size of the model) / (training
footprint of the model), so that the share of the model a device may hold is the same
as under training memory (and 10% less, up to three times, when its split still
overfills a device). ``cost_aware`` and ``kl_based`` also take a latency per node
(our forward + backward time, compute part) and the transfer rate (mean accelerator
link bandwidth).

The partitions found are mapped back: each partition's first logical device, or, where
it has none, partitions in order onto the accelerators. Ops the partitioner leaves out
(inputs, parameters) sit with their heaviest neighbour; for a group graph each group
takes the device holding most of its members' compute. Any failure of the partitioner
(it raises on graphs it cannot handle) is reported as "no placement" with its message,
and so is a search that runs past :data:`TIME_LIMIT_S` (main thread only: SIGALRM);
the final memory check is the registry's.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
from collections import defaultdict

import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import (
    BaselineError,
    BaselineInputs,
    NoFit,
    accelerators,
    fill_unassigned,
    fits,
    node_cost,
    node_memory,
)


def _op_weights(problem: PlacementProblem, inputs: BaselineInputs, op_names: list[str], device: int) -> dict[str, float]:
    """Seconds (fwd + bwd on ``device``) of each op: its own when ops are the problem's nodes,
    else its group's time shared among the group's members by FLOPs."""
    cost = node_cost(problem)[:, device]
    if inputs.op_to_group is None:
        return {op: float(cost[problem.node_index(op)]) if op in problem._index else 0.0 for op in op_names}
    op_graph = inputs.captured.graph
    members: dict[str, list[str]] = defaultdict(list)
    for op in op_names:
        g = inputs.op_to_group.get(op)
        if g is not None:
            members[g].append(op)
    out = {op: 0.0 for op in op_names}
    for g, ops in members.items():
        if g not in problem._index:
            continue
        w = np.array([float(op_graph.nodes[o].get("flops", 0) or 0) + 1.0 if o in op_graph.nodes else 1.0 for o in ops])
        share = cost[problem.node_index(g)] * w / w.sum()
        out.update(dict(zip(ops, share.tolist())))
    return out


#: Wall-clock limit for one partitioner call: cost_aware and kl_based search in O(n^2) and
#: more, and take many minutes on graphs of a thousand ops.
TIME_LIMIT_S = 30.0


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`_TimeLimit` in this (main) thread after ``seconds``; no limit elsewhere."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _alarm(signum, frame):
        raise _TimeLimit()

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _flat_metas(meta) -> list:
    """TensorMetadata entries inside a (possibly nested) tuple/list/dict ``tensor_meta``."""
    from torch.fx.passes.shape_prop import TensorMetadata

    if isinstance(meta, TensorMetadata):
        return [meta]
    if isinstance(meta, dict):
        meta = list(meta.values())
    if isinstance(meta, (list, tuple)):
        return [m for item in meta for m in _flat_metas(item)]
    return []


@contextlib.contextmanager
def single_tensor_metas(gm):
    """Temporarily give every node one flat ``TensorMetadata`` of its total output size.

    The partitioner sizes a node from ``node.meta["tensor_meta"].shape`` and fails on nodes
    with several outputs (LSTM cells return tuples) or none; a flat 1-D stand-in with the
    same number of bytes keeps its sizes right. The original metadata is restored after.
    """
    import torch
    from torch.fx.passes.shape_prop import TensorMetadata

    saved = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            continue
        saved[node] = meta
        parts = _flat_metas(meta)
        dtype = parts[0].dtype if parts else torch.float32
        item = torch.tensor([], dtype=dtype).element_size()
        nbytes = sum(int(np.prod(m.shape)) * torch.tensor([], dtype=m.dtype).element_size() for m in parts)
        node.meta["tensor_meta"] = TensorMetadata(
            torch.Size([-(-nbytes // item)]), dtype, False, (1,), None, False, {}
        )
    try:
        yield
    finally:
        for node, meta in saved.items():
            if meta is None:
                node.meta.pop("tensor_meta", None)
            else:
                node.meta["tensor_meta"] = meta


def op_partition(problem: PlacementProblem, inputs: BaselineInputs, mode: str, scale: float = 1.0) -> dict[str, int]:
    """Run the fx partitioner; return op name -> device index for the ops it placed.

    ``scale`` shrinks the memory the partitioner is told each device has.
    """
    gm = getattr(inputs.captured, "gm", None)
    if gm is None:
        raise BaselineError(f"fx_{mode} needs the captured model (its fx GraphModule): pass captured=...")
    gpus = accelerators(problem)
    with single_tensor_metas(gm):
        return _partition(problem, inputs, mode, gm, gpus, scale)


def _partition(problem: PlacementProblem, inputs: BaselineInputs, mode: str, gm, gpus: list[int],
               scale: float) -> dict[str, int]:
    from torch.fx.experimental.accelerator_partitioner import Partitioner
    from torch.fx.experimental.partitioner_utils import Device, NodeLatency, PartitionerConfig, PartitionMode
    from torch.fx.passes.graph_manipulation import get_size_of_all_nodes

    nodes = [n for n in gm.graph.nodes]
    try:
        get_size_of_all_nodes(gm)
    except Exception as exc:  # nodes the partitioner cannot size
        raise NoFit(f"the fx partitioner cannot size the graph: {type(exc).__name__}: {exc}") from None
    fx_total = sum(n.size_bytes.total_size for n in nodes if n.op != "output" and hasattr(n, "size_bytes"))
    train_total = float(node_memory(problem).sum())
    ratio = fx_total / train_total if train_total > 0 else 1.0
    devices = [
        Device(problem.device_names[d], int(problem.memory_capacity[d] * ratio * scale), logical_id=i) for i, d in enumerate(gpus)
    ]
    latency = {}
    weights = _op_weights(problem, inputs, [n.name for n in nodes], gpus[0])
    for n in nodes:
        latency[n] = NodeLatency(mem_latency_sec=0.0, computer_latency_sec=weights.get(n.name, 0.0))
    bw = [problem.bandwidth[a, b] for a in gpus for b in gpus if a != b]
    config = PartitionerConfig(
        devices=devices,
        mode=getattr(PartitionMode, mode),
        transfer_rate_bytes_per_sec=float(np.mean(bw)) if bw else 1e12,
        node_to_latency_mapping=latency,
    )
    partitioner = Partitioner()
    try:
        # The partitioner prints its partitions for some modes; keep reports clean.
        with contextlib.redirect_stdout(io.StringIO()), time_limit(TIME_LIMIT_S):
            partitioner.partition_graph(gm, gm, config)
    except _TimeLimit:
        raise NoFit(f"torch.fx partitioner ({mode}) gave no answer within {TIME_LIMIT_S:g} s on {len(nodes)} ops") from None
    except Exception as exc:  # torch raises RuntimeError/AssertionError/KeyError on graphs it cannot split
        raise NoFit(f"torch.fx partitioner ({mode}) failed: {type(exc).__name__}: {exc}") from None
    out: dict[str, int] = {}
    for k, part in enumerate(partitioner.partitions):
        ids = list(part.logical_device_ids)
        slot = ids[0] if ids else k
        if not 0 <= slot < len(gpus):
            raise NoFit(f"torch.fx partitioner ({mode}) made {len(partitioner.partitions)} partitions for {len(gpus)} devices")
        for node in part.nodes:
            out[node.name] = gpus[slot]
    return out


def _to_problem(problem: PlacementProblem, inputs: BaselineInputs, op_dev: dict[str, int]) -> np.ndarray:
    """Op placement -> problem row (groups by compute-weighted vote), unplaced nodes filled."""
    row = np.full(problem.num_nodes, -1, dtype=np.int64)
    if inputs.op_to_group is None:
        for op, d in op_dev.items():
            if op in problem._index:
                row[problem.node_index(op)] = d
    else:
        votes: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        weights = _op_weights(problem, inputs, list(op_dev), accelerators(problem)[0])
        for op, d in op_dev.items():
            g = inputs.op_to_group.get(op)
            if g is not None:
                votes[g][d] += weights.get(op, 0.0) + 1e-12
        for g, v in votes.items():
            if g in problem._index:
                row[problem.node_index(g)] = max(v, key=lambda d: (v[d], -d))
    return fill_unassigned(problem, row, default=accelerators(problem)[0])


def _run(problem: PlacementProblem, inputs: BaselineInputs, mode: str) -> np.ndarray:
    # The partitioner's size unit (params + outputs) is not training memory: when its split
    # overfills a device, tell it about 10% less memory and ask again (a few times).
    row = None
    for attempt in range(4):
        row = _to_problem(problem, inputs, op_partition(problem, inputs, mode, 0.9**attempt))
        if fits(problem, row):
            return row
    return row  # the registry reports the overflow


def size_based(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """``PartitionMode.size_based``: fill devices in node order by size."""
    return _run(problem, inputs, "size_based")


def cost_aware(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """``PartitionMode.cost_aware``: merge partitions along the critical path by latency."""
    return _run(problem, inputs, "cost_aware")


def kl_based(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """``PartitionMode.kl_based``: Kernighan–Lin swaps between partitions by latency."""
    return _run(problem, inputs, "kl_based")
