"""Node, edge and device features of a placement problem, as the environments observe them.

Everything here is a pure function of a :class:`~envs.sim.problem.PlacementProblem` (plus,
optionally, the fx op kind of each node, which the compiled arrays do not keep). Values
are squashed to roughly [0, 2] so that a policy sees graphs of very different sizes and
costs on the same scale: times are ``log1p(microseconds) / 10``, bytes
``log1p(bytes) / 25``, FLOPs ``log1p(flops) / 30``, degrees ``log1p(degree) / 5``, and
the topological depth is divided by the graph's largest depth.

Op kinds: a node's fx op as a one-hot; a group of a group graph (whose own ``op`` is just
"group") gets the fraction of its members of each fx op (:func:`graph_ops` with the op graph).

Node feature columns (``node_feature_names(device_names)``): the device-independent
:data:`NODE_FEATURES`, then for every device ``d`` (in problem order)
``log_time@d`` (forward + backward time of the node on d) and ``mem_share@d`` (the
memory the node surely pins on d — parameters, gradients, optimizer state and kept
activations — as a fraction of d's capacity, clipped to [0, 1]).

Device feature columns: :data:`DEVICE_FEATURES`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

from envs.sim.problem import PlacementProblem

#: fx op kinds, one-hot; group graphs and anything else fall in ``op_other``.
OP_KINDS: tuple[str, ...] = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")

#: Device-independent node feature columns, in order.
NODE_FEATURES: tuple[str, ...] = tuple(f"op_{k}" for k in OP_KINDS) + (
    "op_other",
    "log_out_bytes",
    "log_param_bytes",
    "log_act_bytes",
    "log_flops",
    "log_in_edge_bytes",  # bytes arriving over incoming edges (what a cut before the node costs)
    "log_out_edge_bytes",  # bytes leaving over outgoing edges
    "depth",  # longest path from a source, / largest depth in the graph
    "log_in_degree",
    "log_out_degree",
    "log_time_min",  # fastest device's time for this node
    "log_time_max",  # slowest device's time
    "requires_grad",
)

#: Per-device node feature columns, repeated for each device (``name@device``).
NODE_DEVICE_FEATURES: tuple[str, ...] = ("log_time", "mem_share")

#: Device feature columns, in order.
DEVICE_FEATURES: tuple[str, ...] = (
    "is_cpu",
    "is_gpu",
    "log_memory",  # capacity
    "memory_share",  # capacity / memory the whole graph pins, clipped to [0, 4]
    "log_total_time",  # the whole graph's compute time on this device
    "speed_share",  # fastest device's total time / this device's (1 = the fastest)
    "log_mean_latency",  # to the other devices
    "log_mean_bandwidth",  # to the other devices, log1p(bytes/s) / 25
)

_TIME_SCALE = 10.0
_BYTES_SCALE = 25.0
_FLOPS_SCALE = 30.0
_DEGREE_SCALE = 5.0
# Capacities may be "unbounded" (inf) for a host: clip before the log.
_MAX_BYTES = 1e15


def log_time(seconds: np.ndarray) -> np.ndarray:
    """Seconds squashed as ``log1p(µs) / 10`` (1 µs -> 0.07, 1 s -> 1.38)."""
    return np.log1p(np.maximum(np.asarray(seconds, dtype=np.float64), 0.0) * 1e6) / _TIME_SCALE


def log_bytes(nbytes: np.ndarray) -> np.ndarray:
    """Bytes squashed as ``log1p(bytes) / 25`` (1 GB -> 0.83)."""
    b = np.minimum(np.maximum(np.asarray(nbytes, dtype=np.float64), 0.0), _MAX_BYTES)
    return np.log1p(b) / _BYTES_SCALE


def node_feature_names(device_names: Sequence[str]) -> list[str]:
    """Every node feature column's name, in order, for a problem with these devices."""
    return list(NODE_FEATURES) + [f"{f}@{d}" for d in device_names for f in NODE_DEVICE_FEATURES]


def num_node_features(num_devices: int) -> int:
    """F, the node feature width for a problem with ``num_devices`` devices."""
    return len(NODE_FEATURES) + len(NODE_DEVICE_FEATURES) * num_devices


def topological_depth(problem: PlacementProblem) -> np.ndarray:
    """[N] longest path (in edges) from any source to each node.

    Relies on the problem's node order being topological (``edge_src < edge_dst``):
    visiting edges by ascending source finalises a node's depth before its out-edges run.
    """
    depth = np.zeros(problem.num_nodes, dtype=np.int64)
    order = np.argsort(problem.edge_src, kind="stable")
    for s, t in zip(problem.edge_src[order].tolist(), problem.edge_dst[order].tolist()):
        if depth[s] + 1 > depth[t]:
            depth[t] = depth[s] + 1
    return depth


def node_memory(problem: PlacementProblem) -> np.ndarray:
    """[N] bytes a node surely holds on its device at the forward/backward boundary.

    Parameters + gradients + optimizer state + activations kept for backward: the
    simulator's peak memory of a device is at least the sum of this over its nodes (it
    adds received copies of cut edges on top), so it is a safe lower bound for masks.
    """
    return problem.static_memory() + problem.act_bytes


#: A node's op kind: an fx op name, or for a group the count of its members per op name.
OpKind = Union[str, Mapping[str, float], None]


def op_one_hot(ops: Sequence[OpKind] | None, num_nodes: int) -> np.ndarray:
    """[N, len(OP_KINDS) + 1] op-kind columns: a one-hot of each node's fx op, or for a group
    (a mapping op -> member count) the fraction of its members of each op; unknown or
    missing ops count as ``op_other``."""
    out = np.zeros((num_nodes, len(OP_KINDS) + 1), dtype=np.float64)
    if ops is None:
        out[:, -1] = 1.0
        return out
    if len(ops) != num_nodes:
        raise ValueError(f"got {len(ops)} op kinds for {num_nodes} nodes")
    col = {k: i for i, k in enumerate(OP_KINDS)}
    other = len(OP_KINDS)
    for i, op in enumerate(ops):
        if isinstance(op, Mapping):
            total = float(sum(op.values()))
            if total <= 0:
                out[i, other] = 1.0
                continue
            for name, count in op.items():
                out[i, col.get(name, other)] += float(count) / total
        else:
            out[i, col.get(op, other) if isinstance(op, str) else other] = 1.0
    return out


def node_features(problem: PlacementProblem, ops: Sequence[OpKind] | None = None) -> np.ndarray:
    """[N, F] float32 node features (columns: :func:`node_feature_names`).

    Args:
        problem: the compiled problem.
        ops: the op kind of each node in ``problem.node_names`` order (see :data:`OpKind`),
            or None when unknown (e.g. a problem built by hand): every node is then ``op_other``.
    """
    n = problem.num_nodes
    times = problem.fwd_time + problem.bwd_time  # [N, D]
    in_deg = np.bincount(problem.edge_dst, minlength=n)
    out_deg = np.bincount(problem.edge_src, minlength=n)
    in_bytes = np.bincount(problem.edge_dst, weights=problem.edge_bytes, minlength=n)
    out_edge_bytes = np.bincount(problem.edge_src, weights=problem.edge_bytes, minlength=n)
    depth = topological_depth(problem).astype(np.float64)
    depth = depth / depth.max() if depth.max() > 0 else depth
    capacity = np.minimum(problem.memory_capacity, _MAX_BYTES)
    mem_share = np.clip(node_memory(problem)[:, None] / np.maximum(capacity[None, :], 1.0), 0.0, 1.0)

    per_device = np.stack([log_time(times), mem_share], axis=2).reshape(n, -1)  # device-major pairs
    base = np.column_stack(
        [
            op_one_hot(ops, n),
            log_bytes(problem.out_bytes),
            log_bytes(problem.param_bytes),
            log_bytes(problem.act_bytes),
            np.log1p(np.maximum(problem.flops, 0.0)) / _FLOPS_SCALE,
            log_bytes(in_bytes),
            log_bytes(out_edge_bytes),
            depth,
            np.log1p(in_deg) / _DEGREE_SCALE,
            np.log1p(out_deg) / _DEGREE_SCALE,
            log_time(times.min(axis=1)),
            log_time(times.max(axis=1)),
            np.asarray(problem.requires_grad, dtype=np.float64),
        ]
    )
    return np.concatenate([base, per_device], axis=1).astype(np.float32)


def device_features(problem: PlacementProblem) -> np.ndarray:
    """[D, len(DEVICE_FEATURES)] float32 device features."""
    d = problem.num_devices
    is_cpu = np.array([k == "cpu" for k in problem.device_kinds], dtype=np.float64)
    capacity = np.minimum(problem.memory_capacity, _MAX_BYTES)
    total_mem = max(float(node_memory(problem).sum()), 1.0)
    total_time = (problem.fwd_time + problem.bwd_time).sum(axis=0)  # [D]
    speed = total_time.min() / np.maximum(total_time, 1e-30) if total_time.max() > 0 else np.ones(d)
    off = ~np.eye(d, dtype=bool)
    if d > 1:
        lat = np.array([problem.latency[i, off[i]].mean() for i in range(d)])
        bw = np.array([np.minimum(problem.bandwidth[i, off[i]], _MAX_BYTES).mean() for i in range(d)])
    else:  # a single device never transfers
        lat, bw = np.zeros(1), np.zeros(1)
    return np.column_stack(
        [
            is_cpu,
            1.0 - is_cpu,
            log_bytes(capacity),
            np.clip(capacity / total_mem, 0.0, 4.0),
            log_time(total_time),
            speed,
            log_time(lat),
            log_bytes(bw),
        ]
    ).astype(np.float32)


def padded_edges(problem: PlacementProblem, max_edges: int) -> tuple[np.ndarray, np.ndarray]:
    """``edge_index`` [2, max_edges] int64 (padding 0) and ``edge_mask`` [max_edges] float32."""
    e = problem.num_edges
    if e > max_edges:
        raise ValueError(f"{e} edges do not fit max_edges={max_edges}")
    index = np.zeros((2, max_edges), dtype=np.int64)
    index[0, :e] = problem.edge_src
    index[1, :e] = problem.edge_dst
    mask = np.zeros(max_edges, dtype=np.float32)
    mask[:e] = 1.0
    return index, mask


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` [n, ...] zero-padded to [rows, ...]."""
    if x.shape[0] > rows:
        raise ValueError(f"{x.shape[0]} rows do not fit {rows}")
    out = np.zeros((rows,) + x.shape[1:], dtype=x.dtype)
    out[: x.shape[0]] = x
    return out


def graph_ops(graph: object, node_names: Sequence[str], op_graph: object = None) -> list[OpKind]:
    """The op kind of each named node of a networkx placement graph.

    A group node (with ``members``) of a group graph, when the op graph it was grouped
    from is given, gets its members' op counts; any other node its ``op`` attribute (None
    when absent).
    """
    nodes = graph.nodes  # type: ignore[attr-defined]
    op_nodes = op_graph.nodes if op_graph is not None else None  # type: ignore[attr-defined]
    kinds: list[OpKind] = []
    for n in node_names:
        attrs = nodes[n] if n in nodes else {}
        members = attrs.get("members")
        if op_nodes is not None and members:
            kinds.append(dict(Counter(op_nodes[m].get("op") for m in members if m in op_nodes)))
        else:
            kinds.append(attrs.get("op"))
    return kinds
