"""The placement problem as arrays: what every simulator, baseline and environment reads.

A :class:`PlacementProblem` is the captured op graph joined with a cluster and a cost
model (compiled once by :func:`envs.sim.problem_compile.compile_problem`), at two levels
(issue 15: "ops execute, groups only constrain"):

* **ops** (:class:`~envs.sim.op_arrays.OpArrays`, ``problem.ops``): every op of the graph
  in program order, with its costs per device, its consumers and its group. This is what
  the simulators execute (:mod:`envs.sim.op_arrays`).
* **groups** (the placement unit and the agent's action space): ``node_names``,
  ``fwd_time``, ``bwd_time``, the edge arrays, … are per group, sums of their members'
  op arrays. A placement is an int array of length ``num_nodes`` (groups) of device
  indices; the simulators read op i's device as ``row[ops.op_group[i]]``, so a group row
  is never expanded into an op row in Python.

Without a grouping every op is its own group (identity), and both levels coincide.
Nodes are indexed ``0..N-1`` in ``node_names`` order and devices ``0..D-1`` in
``device_names`` order.

Example::

    problem = compile_problem(op_graph, load_cluster("4xK40"), grouping=grouping)
    row = problem.placement_to_array({group: "gpu0" for group in problem.node_names})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from envs.sim.cost_model import DEFAULT_HOST
from envs.sim.op_arrays import OpArrays, op_arrays, trained_bytes
from envs.sim.rank_simulator import RankSimulator
from graphs.errors import PlacerError


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
        rank_simulator: on a rank cluster, the simulator of the multi-process runtime
            (:class:`envs.sim.rank_simulator.RankSimulator`, over ``node_names`` rows): the simulators
            take every step time from it (one placement, one step time), memory and busy
            time from these arrays.
        ops: the op-level arrays the simulators execute (:class:`OpArrays`). Built from the
            group arrays when not given (each node is then one op with the group's
            forward time on the device and its backward and update as backward, all on
            the host for a CPU and on the device for a GPU).
        frozen_bytes: [N] the part of ``param_bytes`` that gets no gradient (buffers, frozen
            parameters): no gradient, optimizer state or all-reduce. None: none.
        param_grads: [N] bytes of each node's parameter gradients (a sparse gradient counts its
            rows; ``OpArrays.param_grads``). None: :meth:`trained_bytes`.
        node_modules: the module path of each node (a group's: its members' common
            module; ``""`` outside any submodule), or ``()`` where the graph carries none.
            Nothing is simulated from it: the move policy relocates whole modules with it
            (:mod:`placer.search.move_scopes`).

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
    ops: OpArrays | None = None
    rank_simulator: RankSimulator | None = None
    node_modules: tuple[str, ...] = ()
    frozen_bytes: np.ndarray | None = None
    param_grads: np.ndarray | None = None
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._index:
            self._index.update({n: i for i, n in enumerate(self.node_names)})
        n = len(self.node_names)
        if self.node_modules and len(self.node_modules) != n:
            raise PlacementError(f"node_modules names {len(self.node_modules)} modules for {n} nodes; expected one "
                                 "per node or none")
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
        ops = self.ops
        if ops is None:
            object.__setattr__(self, "ops", _ops_from_groups(self))
        elif ops.cost.shape[1] != len(self.device_names) or ops.op_group.shape[0] != ops.num_ops or (
                ops.num_ops and int(ops.op_group.max()) >= n):
            raise PlacementError(f"problem.ops does not match the problem ({ops.num_ops} ops, cost {ops.cost.shape}, "
                                 f"{n} groups, {len(self.device_names)} devices)")

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

    @property
    def static_bytes_per_param_byte(self) -> float:
        """Bytes pinned for the whole step per trained parameter byte: the parameter, its gradient,
        the optimizer's state (a frozen one, or a buffer, pins its own bytes only)."""
        return 2.0 + self.optimizer_state_factor

    def trained_bytes(self) -> np.ndarray:
        """[N] parameter bytes that get a gradient (:func:`envs.sim.op_arrays.trained_bytes`)."""
        return trained_bytes(self.param_bytes, self.frozen_bytes)

    def param_grad_bytes(self) -> np.ndarray:
        """[N] bytes of each node's parameter gradients (``param_grads``, else :meth:`trained_bytes`)."""
        return self.trained_bytes() if self.param_grads is None else self.param_grads

    def static_memory(self) -> np.ndarray:
        """[N] bytes each node pins on its device for the whole step: params + grads + optimizer
        state (the last two for trained parameters only; a sparse gradient's rows only)."""
        return self.param_bytes + self.param_grad_bytes() + self.trained_bytes() * self.optimizer_state_factor

    def op_static_memory(self) -> np.ndarray:
        """[num_ops] what :meth:`static_memory` is per node, per op of the op graph."""
        return self.ops.param_bytes + self.ops.param_grad_bytes() + self.ops.trained_bytes() * self.optimizer_state_factor

    def backward_work(self) -> np.ndarray:
        """[N] per group, the largest backward working set among its ops (:meth:`OpArrays.gradient_work`)."""
        out = np.zeros(self.num_nodes)
        np.maximum.at(out, self.ops.op_group, self.ops.gradient_work())
        return out

    def at_step_memory(self) -> np.ndarray:
        """[N] per group, what it holds while the optimizer steps (:meth:`OpArrays.at_step_bytes`):
        its static memory and the batch and output the training loop holds."""
        out = np.zeros(self.num_nodes)
        np.add.at(out, self.ops.op_group, self.ops.at_step_bytes(self.op_static_memory()))
        return out

    def foreach_work(self) -> np.ndarray:
        """[N] per group, the foreach implementation's temporaries of its ops (:meth:`OpArrays.foreach_work_bytes`), summed."""
        out = np.zeros(self.num_nodes)
        np.add.at(out, self.ops.op_group, self.ops.foreach_work_bytes())
        return out

    def step_work(self) -> np.ndarray:
        """[N] per group, the largest optimizer step's temporaries among its ops (:meth:`OpArrays.step_work_bytes`)."""
        out = np.zeros(self.num_nodes)
        np.maximum.at(out, self.ops.op_group, self.ops.step_work_bytes())
        return out

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


def _ops_from_groups(problem: PlacementProblem) -> OpArrays:
    """Op arrays for a problem built directly from arrays (no op graph): one op per node.

    The forward time is the device part on a GPU and the host part on a CPU; backward and
    update likewise (the update is folded into the backward, as the arrays hold it).
    """
    n, d = problem.fwd_time.shape
    is_cpu = np.array([k == "cpu" for k in problem.device_kinds], dtype=bool)
    rg = np.asarray(problem.requires_grad, dtype=bool)
    fwd = np.asarray(problem.fwd_time, dtype=np.float64)
    bwd = np.where(rg[:, None], np.asarray(problem.bwd_time, dtype=np.float64), 0.0)
    cost = np.zeros((n, d, 6))
    cost[:, :, 0] = np.where(is_cpu[None, :], fwd, 0.0)
    cost[:, :, 1] = np.where(is_cpu[None, :], 0.0, fwd)
    cost[:, :, 2] = np.where(is_cpu[None, :], bwd, 0.0)
    cost[:, :, 3] = np.where(is_cpu[None, :], 0.0, bwd)
    return op_arrays(problem.node_names, np.arange(n), cost, rg, problem.param_bytes, problem.act_bytes,
                     problem.out_bytes, problem.flops, problem.edge_src, problem.edge_dst, problem.edge_bytes,
                     is_cpu, DEFAULT_HOST, frozen_bytes=problem.frozen_bytes, param_grads=problem.param_grads)


def _csr(key: np.ndarray, other: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR over ``key``: edge ids grouped by key node, each group sorted by ``other``."""
    order = np.lexsort((other, key)) if key.size else np.zeros(0, dtype=np.int64)
    counts = np.bincount(key, minlength=n) if key.size else np.zeros(n, dtype=np.int64)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, order.astype(np.int64)
