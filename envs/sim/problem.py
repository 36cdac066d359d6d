"""The placement problem as arrays: what every simulator, baseline and environment reads.

A :class:`PlacementProblem` is the placement graph (op graph or group graph) joined with
a cluster and a cost model, flattened into numpy arrays in one fixed topological order.
Nodes are indexed ``0..N-1`` in ``node_names`` order and devices ``0..D-1`` in
``device_names`` order; a placement is an int array of length N of device indices.

Example::

    problem = compile_problem(graph, load_cluster("4xK40"))
    row = problem.placement_to_array({name: "gpu0" for name in problem.node_names})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from envs.sim.cost_model import CostModel, node_requires_grad
from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR, known_state_kind
from graphs.errors import GraphError, PlacerError


def resolve_optimizer(graph: nx.DiGraph, optimizer: str | None) -> str:
    """The :data:`OPTIMIZER_STATE_FACTOR` key a graph is costed with: ``optimizer`` when given,
    else the one the graph was profiled with (``graph.graph["optimizer"]``), else plain SGD.

    Raises:
        PlacementError: an explicitly named optimizer that is not known.
    """
    if optimizer is None:
        profiled = graph.graph.get("optimizer") if isinstance(graph, nx.DiGraph) else None
        return known_state_kind(str(profiled).lower()) if profiled else "sgd"
    key = str(optimizer).lower()
    if key not in OPTIMIZER_STATE_FACTOR:
        raise PlacementError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZER_STATE_FACTOR)}")
    return key


class PlacementError(PlacerError, ValueError):
    """A placement that does not match its problem (unknown device, missing nodes, bad shape)."""


@dataclass(frozen=True, eq=False)
class PlacementProblem:
    """Arrays describing one graph on one cluster.

    Attributes:
        name: graph name (for reports).
        node_names: N node names in a fixed topological order.
        device_names: D device names.
        device_kinds: D device kinds.
        fwd_time: [N, D] forward seconds of each node on each device.
        bwd_time: [N, D] backward seconds of each node on each device.
        param_bytes: [N] parameter (and buffer) bytes owned by each node.
        act_bytes: [N] activation bytes kept for backward (0 where no grad flows).
        out_bytes: [N] output bytes of each node.
        flops: [N] forward FLOPs.
        edge_src, edge_dst: [E] node indices, ``edge_src < edge_dst`` (topological).
        edge_bytes: [E] bytes crossing each edge when its ends are on different devices.
        latency: [D, D] link latency in seconds (0 on the diagonal).
        bandwidth: [D, D] link bandwidth in bytes/s (inf on the diagonal).
        memory_capacity: [D] bytes.
        optimizer_state_factor: optimizer state bytes per parameter byte.
        simulated: True when the device figures come from a spec, False when measured.
        requires_grad: [N] bool, the node's output takes part in autograd (it has a backward
            op; a cut edge carries a gradient back only when both ends require grad).
            Defaults to all True.
        pred_ptr, pred_edge: CSR of incoming edges: the edges into node i are
            ``pred_edge[pred_ptr[i]:pred_ptr[i+1]]`` (edge ids, by ascending source).
        succ_ptr, succ_edge: CSR of outgoing edges, by ascending destination.
        cluster_name: name of the cluster the device arrays came from.

    The CSR arrays are derived from ``edge_src``/``edge_dst`` when not given.
    """

    name: str
    node_names: tuple[str, ...]
    device_names: tuple[str, ...]
    device_kinds: tuple[str, ...]
    fwd_time: np.ndarray
    bwd_time: np.ndarray
    param_bytes: np.ndarray
    act_bytes: np.ndarray
    out_bytes: np.ndarray
    flops: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    edge_bytes: np.ndarray
    latency: np.ndarray
    bandwidth: np.ndarray
    memory_capacity: np.ndarray
    optimizer_state_factor: float = 0.0
    simulated: bool = True
    requires_grad: np.ndarray | None = None
    pred_ptr: np.ndarray | None = None
    pred_edge: np.ndarray | None = None
    succ_ptr: np.ndarray | None = None
    succ_edge: np.ndarray | None = None
    cluster_name: str = ""
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._index:
            self._index.update({n: i for i, n in enumerate(self.node_names)})
        n = len(self.node_names)
        if self.requires_grad is None:
            object.__setattr__(self, "requires_grad", np.ones(n, dtype=bool))
        if self.pred_ptr is None or self.pred_edge is None or self.succ_ptr is None or self.succ_edge is None:
            src = np.asarray(self.edge_src, dtype=np.int64)
            dst = np.asarray(self.edge_dst, dtype=np.int64)
            pred_ptr, pred_edge = _csr(dst, src, n)
            succ_ptr, succ_edge = _csr(src, dst, n)
            object.__setattr__(self, "pred_ptr", pred_ptr)
            object.__setattr__(self, "pred_edge", pred_edge)
            object.__setattr__(self, "succ_ptr", succ_ptr)
            object.__setattr__(self, "succ_edge", succ_edge)

    @property
    def grad_edge(self) -> np.ndarray:
        """[E] bool: the edge carries a gradient back (both ends require grad)."""
        return self.requires_grad[self.edge_src] & self.requires_grad[self.edge_dst]

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @property
    def num_devices(self) -> int:
        return len(self.device_names)

    @property
    def num_edges(self) -> int:
        return int(self.edge_src.shape[0])

    def node_index(self, name: str) -> int:
        return self._index[name]

    def transfer_time(self, nbytes: np.ndarray | float, src: np.ndarray | int, dst: np.ndarray | int):
        """Seconds to move ``nbytes`` from device ``src`` to ``dst`` (0 when equal)."""
        src = np.asarray(src)
        dst = np.asarray(dst)
        t = self.latency[src, dst] + np.asarray(nbytes, dtype=np.float64) / self.bandwidth[src, dst]
        return np.where(src == dst, 0.0, t)

    def static_memory(self) -> np.ndarray:
        """[N] bytes each node pins on its device for the whole step: params + grads + optimizer state."""
        return self.param_bytes * (2.0 + self.optimizer_state_factor)

    def placement_to_array(self, placement: Mapping[str, str]) -> np.ndarray:
        """Convert ``{node name: device name}`` to an int array in ``node_names`` order.

        Raises :class:`PlacementError` naming the first unknown device or missing node.
        """
        dev_index = {d: i for i, d in enumerate(self.device_names)}
        missing = [n for n in self.node_names if n not in placement]
        if missing:
            raise PlacementError(
                f"placement misses {len(missing)} of {self.num_nodes} nodes, e.g. {missing[:3]}"
            )
        unknown_nodes = [n for n in placement if n not in self._index]
        if unknown_nodes:
            raise PlacementError(f"placement names nodes not in the graph, e.g. {unknown_nodes[:3]}")
        row = np.empty(self.num_nodes, dtype=np.int64)
        for i, n in enumerate(self.node_names):
            d = placement[n]
            if d not in dev_index:
                raise PlacementError(
                    f"node {n!r} is placed on unknown device {d!r}; devices are {list(self.device_names)}"
                )
            row[i] = dev_index[d]
        return row

    def array_to_placement(self, row: Sequence[int] | np.ndarray) -> dict[str, str]:
        """Convert an int array in ``node_names`` order back to ``{node name: device name}``."""
        row = self.check_array(row)
        return {n: self.device_names[int(d)] for n, d in zip(self.node_names, row)}

    def check_array(self, placements: Sequence[int] | np.ndarray) -> np.ndarray:
        """Validate a placement array ([N] or [B, N]) and return it as int64."""
        arr = np.asarray(placements)
        if arr.shape[-1] != self.num_nodes or arr.ndim not in (1, 2):
            raise PlacementError(
                f"placement array has shape {arr.shape}; expected ({self.num_nodes},) or (batch, {self.num_nodes})"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise PlacementError("placement array must hold integer device indices")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_devices):
            raise PlacementError(
                f"placement array holds device index {int(arr.max()) if arr.max() >= self.num_devices else int(arr.min())}; "
                f"valid indices are 0..{self.num_devices - 1}"
            )
        return arr


def _csr(key: np.ndarray, other: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR over ``key``: edge ids grouped by key node, each group sorted by ``other``."""
    order = np.lexsort((other, key)) if key.size else np.zeros(0, dtype=np.int64)
    counts = np.bincount(key, minlength=n) if key.size else np.zeros(n, dtype=np.int64)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, order.astype(np.int64)


def topological_order(graph: nx.DiGraph) -> list[str]:
    """The fixed topological order every simulator uses: Kahn's algorithm, ties broken by
    the order nodes were added to the graph (the fx order for a captured graph).

    Raises:
        GraphError: when the graph has a cycle.
    """
    position = {n: i for i, n in enumerate(graph.nodes)}
    try:
        return list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(graph)
        raise GraphError(
            f"graph {graph.graph.get('name', '')!r} has a cycle through {[u for u, _ in cycle][:5]}; "
            "a placement graph must be a DAG"
        ) from None


def compile_problem(
    graph: nx.DiGraph,
    cluster: Cluster | str,
    optimizer: str | None = None,
    cost_model: CostModel | None = None,
) -> PlacementProblem:
    """Flatten a placement graph (op or group graph) on a cluster into a :class:`PlacementProblem`.

    Args:
        graph: a placement graph with the attributes of docs/contracts.md; missing numeric
            attributes count as 0, a missing ``requires_grad`` as True except for
            placeholders and the output.
        cluster: a :class:`~envs.hardware.cluster.Cluster`, or anything :func:`~envs.hardware.loading.load_cluster` takes.
        optimizer: name in :data:`OPTIMIZER_STATE_FACTOR`: its state bytes per parameter byte
            count in memory, and the default cost model estimates its update on unprofiled
            devices. Default: the optimizer the graph was profiled with
            (``graph.graph["optimizer"]``), else plain SGD.
        cost_model: node/transfer costs; default :meth:`CostModel.for_graph` (profiles where
            the device kind was profiled, calibrated roofline elsewhere).

    Raises:
        PlacementError: unknown optimizer.  GraphError: empty graph or a cycle.
    """
    key = resolve_optimizer(graph, optimizer)
    if not isinstance(graph, nx.DiGraph) or graph.number_of_nodes() == 0:
        raise GraphError("compile_problem needs a non-empty networkx.DiGraph placement graph")
    cluster = load_cluster(cluster)
    if cost_model is None:
        cost_model = CostModel.for_graph(graph, cluster, optimizer=key)
    order = topological_order(graph)
    index = {n: i for i, n in enumerate(order)}
    attrs = [graph.nodes[v] for v in order]

    def column(key: str) -> np.ndarray:
        return np.array([float(a.get(key) or 0) for a in attrs], dtype=np.float64)

    requires_grad = np.array([node_requires_grad(a) for a in attrs], dtype=bool)
    out_bytes = column("out_bytes")
    if all("act_bytes" in a for a in attrs):
        # A group graph may state its members' kept activations directly.
        act_bytes = column("act_bytes")
    else:
        # Parameters (get_attr) are counted in param_bytes; the output node is no tensor.
        keeps = requires_grad & np.array([a.get("op") not in ("get_attr", "output") for a in attrs])
        act_bytes = np.where(keeps, out_bytes, 0.0)
    fwd, bwd = cost_model.node_times(graph, order, cluster.devices)
    bwd[~requires_grad] = 0.0

    edges = sorted((index[u], index[v], float(d.get("bytes") or 0)) for u, v, d in graph.edges(data=True))
    edge_src = np.array([e[0] for e in edges], dtype=np.int64)
    edge_dst = np.array([e[1] for e in edges], dtype=np.int64)
    edge_bytes = np.array([e[2] for e in edges], dtype=np.float64)

    names = cluster.device_names
    d = len(names)
    latency = np.zeros((d, d))
    bandwidth = np.full((d, d), np.inf)
    for a in range(d):
        for b in range(d):
            if a != b:
                link = cluster.link(names[a], names[b])
                latency[a, b] = link.latency_s
                bandwidth[a, b] = link.bandwidth_Bps

    return PlacementProblem(
        name=str(graph.graph.get("name", "graph")),
        node_names=tuple(order),
        device_names=tuple(names),
        device_kinds=tuple(dev.kind for dev in cluster.devices),
        fwd_time=fwd,
        bwd_time=bwd,
        param_bytes=column("param_bytes"),
        act_bytes=act_bytes.astype(np.float64),
        out_bytes=out_bytes,
        flops=column("flops"),
        edge_src=edge_src,
        edge_dst=edge_dst,
        edge_bytes=edge_bytes,
        latency=latency,
        bandwidth=bandwidth,
        memory_capacity=np.array([dev.memory_bytes for dev in cluster.devices], dtype=np.float64),
        optimizer_state_factor=OPTIMIZER_STATE_FACTOR[key],
        simulated=cluster.simulated,
        requires_grad=requires_grad,
        cluster_name=cluster.name,
    )
