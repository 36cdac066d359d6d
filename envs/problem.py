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

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from graphs.errors import PlacerError

#: Optimizer state bytes per parameter byte, by optimizer name.
OPTIMIZER_STATE_FACTOR: dict[str, float] = {
    "sgd": 0.0,
    "sgd_momentum": 1.0,
    "momentum": 1.0,
    "rmsprop": 1.0,
    "adagrad": 1.0,
    "adam": 2.0,
    "adamw": 2.0,
}


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
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._index:
            self._index.update({n: i for i, n in enumerate(self.node_names)})

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
