"""The placement problem as arrays: what every simulator, baseline and environment reads.

A :class:`PlacementProblem` is the captured op graph joined with a cluster and a cost
model, compiled once, at two levels (issue 15: "ops execute, groups only constrain"):

* **ops** (:class:`OpArrays`, ``problem.ops``): every op of the graph in program order
  (the fixed topological order), with its host and device costs per device, its consumers
  and its group. This is what the simulators execute.
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

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from envs.hardware.rank_devices import is_distributed_cluster
from envs.sim.cost_model import CPU_DISPATCH_S, DEFAULT_HOST, CostModel, HostOverheads, node_requires_grad
from envs.sim.grad_accumulation import accumulate_costs
from envs.sim.memory_rules import BACKWARD_WORK_FACTOR, gradient_parts, loop_held_bytes
from envs.sim.optimizer_state import (
    OPTIMIZER_FOREACH_WORK,
    OPTIMIZER_STATE_FACTOR,
    OPTIMIZER_STEP_WORK,
    known_state_kind,
)
from envs.sim.rank_simulator import RankSimulator
from graphs.errors import GraphError, PlacerError
from graphs.grouping import Grouping


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
class OpArrays:
    """The op-level arrays the simulators execute (module doc); ops in program order.

    Attributes:
        names: N op names in program order (the fx order of the captured graph, a
            topological order).
        op_group: [N] int64, the group (placement slot) of each op.
        cost: [N, D, 6] float64 seconds ``hF, dF, hB, dB, hO, dO`` (host and device parts of
            forward, backward, optimizer update; :meth:`envs.sim.cost_model.CostModel.op_cost`).
            Backward and update are 0 for an op that takes no part in autograd.
        requires_grad: [N] bool.
        param_bytes, act_bytes, out_bytes, flops: [N].
        succ_ptr: [N+1] int64 CSR over consumers: op i's consumers are
            ``succ_dst[succ_ptr[i]:succ_ptr[i+1]]`` in program order.
        succ_dst: [S] int64 consumer op.  succ_bytes: [S] bytes of the edge.
        succ_grad: [S] bool, a gradient flows back along the edge (both ends require grad).
        is_cpu: [D] bool, the device is a CPU (its ops run on the host thread).
        host: the fixed host costs of a step (:class:`~envs.sim.cost_model.HostOverheads`).
        grad_bytes: [N] bytes of the largest gradient each op's backward makes (:func:`~envs.sim.memory_rules.gradient_bytes`);
            a device's peak holds :data:`~envs.sim.memory_rules.BACKWARD_WORK_FACTOR` times the largest of its ops'
            on top of the kept activations. None: ``out_bytes`` where ``requires_grad``.
        shared_grad_bytes: [N] the part of it that is a shared parameter's gradient
            (``shared_param_bytes``), which a micro-batch does not shrink; None: none.
        fixed_host: [N, D, 2] host seconds of each op's forward and backward that a
            micro-batch does not shrink (:meth:`~envs.sim.cost_model.CostModel.op_fixed`:
            measured where the graph was also profiled on a micro-batch, else
            :data:`~envs.sim.cost_model.CPU_DISPATCH_S` per op on a CPU); what pipelines and
            DDP cost a micro-batch with (``envs.sim.pipeline`` P2). None: the default rule.
        accumulate: [N, D, 2] host and device seconds each op pays per backward that adds into
            ``.grad`` (a pipeline stage's micro-batches after the first; rule P2b,
            :mod:`envs.sim.grad_accumulation`). None: nothing (problems built from arrays).
        tied_reads: ``(reader op, owner op, bytes)`` for each op reading parameters another op
            owns (``tied_param_bytes``: a tied embedding's head, an unrolled cell's later
            steps): a pipeline stage holding the reader but not the owner keeps a copy
            (:mod:`envs.sim.pipeline` P5c). Empty: none, or a graph captured before it was recorded.
        step_work: [N] bytes of the optimizer step's temporaries each op's parameters bring
            (:data:`~envs.sim.optimizer_state.OPTIMIZER_STEP_WORK` x ``param_bytes``). The step
            runs after the backward freed the kept activations and received copies, so a
            device's peak is the larger of its backward peak and its static memory plus the
            largest of these. None: none (problems built from arrays).
        foreach_work: [N] bytes the foreach implementation's temporaries take per op
            (:data:`~envs.sim.optimizer_state.OPTIMIZER_FOREACH_WORK` x ``param_bytes``): on a
            GPU (not ``is_cpu``) torch.optim updates all of a device's parameters at once, so
            they add up over the device's ops (:func:`~envs.sim.memory_rules.step_temporaries`). None: none.
        loop_held: [N] bytes the training loop still holds at the optimizer step: the batch
            (placeholders' outputs) and the model's output (the output node's), which
            ``out = model(x); loss_fn(out, y).backward(); optimizer.step()`` keeps referenced;
            :func:`~envs.sim.memory_rules.loop_held_bytes` (measured: the 16 KiB by which a six-Linear model's step
            otherwise exceeded the simulated peak). None: none.
        batch_held: [N] the part of ``loop_held`` that is the batch (a placeholder's), which a
            job of several processes already counts on every one (:mod:`envs.sim.pipeline` P5d).
        input_bytes: the bytes of the model's inputs (its placeholders' outputs): the batch,
            which every process of a multi-process job holds (:mod:`envs.sim.pipeline` P5d).
        one_process_per_device: the devices are ranks (``--devices cpu:0,cpu:1``), each its
            own process. Their step time is :mod:`envs.sim.ranks`'s
            (``PlacementProblem.rank_simulator``); for the copies it still counts,
            :mod:`envs.sim.simulator` runs each rank as an independent device with its own
            thread rather than sharing one host thread.
    """

    names: tuple[str, ...]
    op_group: np.ndarray
    cost: np.ndarray
    requires_grad: np.ndarray
    param_bytes: np.ndarray
    act_bytes: np.ndarray
    out_bytes: np.ndarray
    flops: np.ndarray
    succ_ptr: np.ndarray
    succ_dst: np.ndarray
    succ_bytes: np.ndarray
    succ_grad: np.ndarray
    is_cpu: np.ndarray
    host: HostOverheads = DEFAULT_HOST
    one_process_per_device: bool = False
    grad_bytes: np.ndarray | None = None
    shared_grad_bytes: np.ndarray | None = None
    fixed_host: np.ndarray | None = None
    accumulate: np.ndarray | None = None
    tied_reads: tuple[tuple[int, int, float], ...] = ()
    input_bytes: float = 0.0
    step_work: np.ndarray | None = None
    foreach_work: np.ndarray | None = None
    loop_held: np.ndarray | None = None
    batch_held: np.ndarray | None = None

    @property
    def num_ops(self) -> int:
        return len(self.names)

    def fixed_parts(self) -> np.ndarray:
        """[N, D, 2] the fixed host seconds of each op's forward and backward (``fixed_host``,
        else :data:`~envs.sim.cost_model.CPU_DISPATCH_S` per op), never above the op's host
        time: a copy whose costs were rescaled (``envs.sim.calibration.scaled_problem``)
        keeps them within its ops."""
        host = self.cost[:, :, (0, 2)]
        fixed = self.fixed_host if self.fixed_host is not None else CPU_DISPATCH_S
        return np.minimum(host, fixed)

    def gradient_work(self) -> np.ndarray:
        """[N] the backward working set each op brings to its device (:data:`~envs.sim.memory_rules.BACKWARD_WORK_FACTOR`)."""
        grads = (self.grad_bytes if self.grad_bytes is not None
                 else np.where(self.requires_grad, self.out_bytes, 0.0))
        return BACKWARD_WORK_FACTOR * np.asarray(grads, dtype=np.float64)

    def step_work_bytes(self) -> np.ndarray:
        """[N] the optimizer step's temporaries each op brings to its device (``step_work``; 0 when not given)."""
        return np.zeros(self.num_ops) if self.step_work is None else np.asarray(self.step_work, dtype=np.float64)

    def foreach_work_bytes(self) -> np.ndarray:
        """[N] the foreach implementation's temporaries per op (``foreach_work``; 0 when not given)."""
        return np.zeros(self.num_ops) if self.foreach_work is None else np.asarray(self.foreach_work, dtype=np.float64)

    def loop_held_bytes(self) -> np.ndarray:
        """[N] what the training loop holds at the optimizer step, per op (``loop_held``; 0 when not given)."""
        return np.zeros(self.num_ops) if self.loop_held is None else np.asarray(self.loop_held, dtype=np.float64)

    def batch_held_bytes(self) -> np.ndarray:
        """[N] the batch part of :meth:`loop_held_bytes` (``batch_held``; 0 when not given)."""
        return np.zeros(self.num_ops) if self.batch_held is None else np.asarray(self.batch_held, dtype=np.float64)

    def at_step_bytes(self, static: np.ndarray) -> np.ndarray:
        """[N] what each op holds on its device while the optimizer steps: its ``static``
        memory (parameters, gradients, state) and what the training loop holds (``loop_held``)."""
        return np.asarray(static, dtype=np.float64) + self.loop_held_bytes()

    def gradient_work_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """([N], [N]) the backward working set each op brings (:meth:`gradient_work`), split into
        the part that scales with the batch (its output's gradient) and the part that does not
        (a shared parameter's gradient): on a micro-batch of ``1/m`` an op brings
        ``max(out / m, shared)``, which with ``m = 1`` is :meth:`gradient_work`."""
        whole = self.gradient_work()
        shared = (np.zeros(self.num_ops) if self.shared_grad_bytes is None
                  else BACKWARD_WORK_FACTOR * np.asarray(self.shared_grad_bytes, dtype=np.float64))
        # gradient_bytes is max(output's, shared): where it exceeds the shared part it is the output's.
        return np.where(whole > shared, whole, 0.0), shared

    def gradient_work_at(self, fraction: float) -> np.ndarray:
        """[N] the backward working set each op brings on ``1/fraction`` of the batch (a
        micro-batch, a DDP replica's share): ``max(output's / fraction, shared parameter's)``."""
        out, shared = self.gradient_work_parts()
        return np.maximum(out / float(fraction), shared)

    def expand(self, rows: np.ndarray) -> np.ndarray:
        """Op rows ([B, N] or [N]) of group rows (for tests and reports; the kernels gather)."""
        return np.asarray(rows)[..., self.op_group]

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, bytes) of every op edge, by source then consumer order."""
        src = np.repeat(np.arange(self.num_ops), np.diff(self.succ_ptr))
        return src, self.succ_dst, self.succ_bytes


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
        """Bytes pinned for the whole step per parameter byte: the parameter, its gradient, the optimizer's state."""
        return 2.0 + self.optimizer_state_factor

    def static_memory(self) -> np.ndarray:
        """[N] bytes each node pins on its device for the whole step: params + grads + optimizer state."""
        return self.param_bytes * self.static_bytes_per_param_byte

    def op_static_memory(self) -> np.ndarray:
        """[num_ops] what :meth:`static_memory` is per node, per op of the op graph."""
        return self.ops.param_bytes * self.static_bytes_per_param_byte

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
    return _op_arrays(problem.node_names, np.arange(n), cost, rg, problem.param_bytes, problem.act_bytes,
                      problem.out_bytes, problem.flops, problem.edge_src, problem.edge_dst, problem.edge_bytes,
                      is_cpu, DEFAULT_HOST)


def _op_arrays(names, op_group, cost, rg, param_bytes, act_bytes, out_bytes, flops, src, dst, nbytes, is_cpu,
               host: HostOverheads, grad_bytes: np.ndarray | None = None,
               shared_grad_bytes: np.ndarray | None = None, fixed_host: np.ndarray | None = None,
               accumulate: np.ndarray | None = None) -> OpArrays:
    n = len(names)
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    nbytes = np.asarray(nbytes, dtype=np.float64)
    rg = np.asarray(rg, dtype=bool)
    order = np.lexsort((dst, src)) if src.size else np.zeros(0, dtype=np.int64)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n) if src.size else np.zeros(n, dtype=np.int64), out=ptr[1:])
    s_dst = np.ascontiguousarray(dst[order])
    return OpArrays(
        names=tuple(names),
        op_group=np.ascontiguousarray(op_group, dtype=np.int64),
        cost=np.ascontiguousarray(cost, dtype=np.float64),
        requires_grad=rg,
        param_bytes=np.asarray(param_bytes, dtype=np.float64),
        act_bytes=np.asarray(act_bytes, dtype=np.float64),
        out_bytes=np.asarray(out_bytes, dtype=np.float64),
        flops=np.asarray(flops, dtype=np.float64),
        succ_ptr=ptr,
        succ_dst=s_dst,
        succ_bytes=np.ascontiguousarray(nbytes[order]),
        succ_grad=np.ascontiguousarray(rg[src[order]] & rg[s_dst]) if src.size else np.zeros(0, dtype=bool),
        is_cpu=np.asarray(is_cpu, dtype=bool),
        host=host,
        grad_bytes=None if grad_bytes is None else np.asarray(grad_bytes, dtype=np.float64),
        shared_grad_bytes=None if shared_grad_bytes is None else np.asarray(shared_grad_bytes, dtype=np.float64),
        fixed_host=None if fixed_host is None else np.ascontiguousarray(fixed_host, dtype=np.float64),
        accumulate=None if accumulate is None else np.ascontiguousarray(accumulate, dtype=np.float64),
    )


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
    grouping: Grouping | None = None,
    leaves: Mapping[str, int] | None = None,
) -> PlacementProblem:
    """Compile a placement graph on a cluster into a :class:`PlacementProblem` (module doc).

    Args:
        graph: the op graph (placement graph with the attributes of docs/contracts.md);
            missing numeric attributes count as 0, a missing ``requires_grad`` as True
            except for placeholders and the output. (A group graph passed here is
            simulated as if each group were one op.)
        cluster: a :class:`~envs.hardware.cluster.Cluster`, or anything :func:`~envs.hardware.loading.load_cluster` takes.
        optimizer: name in :data:`OPTIMIZER_STATE_FACTOR`: its state bytes per parameter byte
            count in memory, and the default cost model estimates its update on unprofiled
            devices. Default: the optimizer the graph was profiled with
            (``graph.graph["optimizer"]``), else plain SGD.
        cost_model: op costs; default :meth:`CostModel.for_graph` (profiles where the device
            kind was profiled, calibrated roofline elsewhere).
        grouping: the :class:`graphs.grouping.Grouping` of ``graph`` whose groups are the
            placement unit (``node_names`` = its groups in topological order). None: every
            op is its own group.
        leaves: on a rank cluster, tensors per value (:func:`envs.sim.rank_compile.value_leaves` of
            the captured module: the runtime sends one message per tensor); default 1 each.

    Raises:
        PlacementError: unknown optimizer, or a grouping that does not cover the graph's ops.
        GraphError: empty graph or a cycle.
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
        # Measured at capture (graphs.saved_activations: the storages autograd saves, the
        # model outputs the training loop holds); a group graph sums its members'.
        act_bytes = column("act_bytes")
    else:
        # Fallback for graph files written before act_bytes was measured: each op that
        # requires grad keeps its output (off by 0.4-1.3x on the zoo, memory.md).
        # Parameters (get_attr) are counted in param_bytes; the output node is no tensor.
        keeps = requires_grad & np.array([a.get("op") not in ("get_attr", "output") for a in attrs])
        act_bytes = np.where(keeps, out_bytes, 0.0)
    parts = np.array([gradient_parts(a) for a in attrs], dtype=np.float64).reshape(-1, 2)
    grad_bytes, shared_grad = parts.max(axis=1), parts[:, 1]
    cost = cost_model.op_costs(graph, order, cluster.devices)
    cost[~requires_grad, :, 2:] = 0.0
    fixed_host = cost_model.op_fixed_costs(graph, order, cluster.devices, cost)
    accumulate = accumulate_costs(graph, order, cluster.devices, cost_model)
    param_bytes = column("param_bytes")
    flops = column("flops")

    edges = sorted((index[u], index[v], float(d.get("bytes") or 0)) for u, v, d in graph.edges(data=True))
    op_src = np.array([e[0] for e in edges], dtype=np.int64)
    op_dst = np.array([e[1] for e in edges], dtype=np.int64)
    op_bytes = np.array([e[2] for e in edges], dtype=np.float64)

    names = cluster.device_names
    d = len(names)
    is_cpu = np.array([dev.kind == "cpu" for dev in cluster.devices], dtype=bool)
    latency = np.zeros((d, d))
    bandwidth = np.full((d, d), np.inf)
    for a in range(d):
        for b in range(d):
            if a != b:
                link = cluster.link(names[a], names[b])
                latency[a, b] = link.latency_s
                bandwidth[a, b] = link.bandwidth_Bps

    if grouping is None:
        group_names = tuple(order)
        op_group = np.arange(len(order), dtype=np.int64)
    else:
        group_names, op_group = _group_slots(grouping, order)
    ops = _op_arrays(order, op_group, cost, requires_grad, param_bytes, act_bytes, out_bytes, flops,
                     op_src, op_dst, op_bytes, is_cpu, cost_model.host, grad_bytes, shared_grad, fixed_host,
                     accumulate)
    ops = replace(ops, tied_reads=tuple((index[v], index[owner], float(b)) for v, a in zip(order, attrs)
                                        for owner, b in (a.get("tied_param_bytes") or {}).items() if owner in index),
                  input_bytes=float(sum(out_bytes[i] for i, a in enumerate(attrs) if a.get("op") == "placeholder")),
                  step_work=OPTIMIZER_STEP_WORK[key] * np.where(requires_grad, param_bytes, 0.0),
                  foreach_work=OPTIMIZER_FOREACH_WORK[key] * np.where(requires_grad, param_bytes, 0.0),
                  loop_held=np.array([loop_held_bytes(graph, v) for v in order], dtype=np.float64),
                  batch_held=np.where([a.get("op") == "placeholder" for a in attrs], out_bytes, 0.0))
    rank_simulator = None
    if is_distributed_cluster(cluster):
        ops = replace(ops, one_process_per_device=True)
        # Processes exchange messages over gloo, which the one-process rules do not model.
        rank_simulator = RankSimulator(graph, cluster, leaves=leaves, op_to_group=(
            grouping.op_to_group if grouping is not None else {n: n for n in order}))
    g = len(group_names)

    def per_group(values: np.ndarray) -> np.ndarray:
        if grouping is None:
            return values.copy()
        out = np.zeros((g,) + values.shape[1:])
        np.add.at(out, op_group, values)
        return out

    fwd = cost[:, :, 0] + cost[:, :, 1]
    bwd = cost[:, :, 2:].sum(axis=2)
    if grouping is None:
        edge_src, edge_dst, edge_bytes = op_src, op_dst, op_bytes
        g_rg, g_out = requires_grad, out_bytes
    else:
        edge_src, edge_dst, edge_bytes = _group_edges(op_group, op_src, op_dst, op_bytes, g)
        g_rg = np.zeros(g, dtype=bool)
        np.logical_or.at(g_rg, op_group, requires_grad)
        gattrs = grouping.graph.nodes
        g_out = np.array([float(gattrs[v].get("out_bytes") or 0) for v in group_names], dtype=np.float64)
    node_attrs = attrs if grouping is None else [grouping.graph.nodes[v] for v in group_names]
    modules = tuple(str(a.get("module") or "") for a in node_attrs)

    return PlacementProblem(
        name=str(graph.graph.get("name", "graph")),
        node_names=tuple(group_names),
        device_names=tuple(names),
        device_kinds=tuple(dev.kind for dev in cluster.devices),
        fwd_time=per_group(fwd),
        bwd_time=per_group(bwd),
        param_bytes=per_group(param_bytes),
        act_bytes=per_group(act_bytes.astype(np.float64)),
        out_bytes=g_out,
        flops=per_group(flops),
        edge_src=edge_src,
        edge_dst=edge_dst,
        edge_bytes=edge_bytes,
        latency=latency,
        bandwidth=bandwidth,
        memory_capacity=np.array([dev.usable_bytes for dev in cluster.devices], dtype=np.float64),
        optimizer_state_factor=OPTIMIZER_STATE_FACTOR[key],
        simulated=cluster.simulated,
        requires_grad=g_rg,
        cluster_name=cluster.name,
        ops=ops,
        rank_simulator=rank_simulator,
        node_modules=modules if any(modules) else (),
    )


def _group_slots(grouping: Grouping, order: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(group names in the group graph's topological order, [N] group slot of each op)."""
    group_names = tuple(topological_order(grouping.graph))
    slot = {name: k for k, name in enumerate(group_names)}
    try:
        op_group = np.array([slot[grouping.op_to_group[op]] for op in order], dtype=np.int64)
    except KeyError as exc:
        raise PlacementError(f"the grouping does not cover op or group {exc.args[0]!r} of the graph; "
                             "expected the Grouping built from this op graph") from None
    if len(grouping.op_to_group) != len(order):
        raise PlacementError(f"the grouping maps {len(grouping.op_to_group)} ops, the graph has {len(order)}; "
                             "expected the Grouping built from this op graph")
    return group_names, op_group


def _group_edges(op_group: np.ndarray, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray,
                 g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group edges with :func:`graphs.grouping.build_group_graph`'s bytes rule: a producer op's
    tensor crosses to another group once (its largest edge there); summed per group pair."""
    gs, gd = op_group[src], op_group[dst]
    cut = gs != gd
    per_dest: dict[tuple[int, int], float] = {}
    for u, gv, b in zip(src[cut].tolist(), gd[cut].tolist(), nbytes[cut].tolist()):
        k = (u, gv)
        per_dest[k] = max(per_dest.get(k, 0.0), b)
    sent: dict[tuple[int, int], float] = {}
    for (u, gv), b in per_dest.items():
        k = (int(op_group[u]), gv)
        sent[k] = sent.get(k, 0.0) + b
    items = sorted(sent.items())
    return (np.array([k[0] for k, _ in items], dtype=np.int64), np.array([k[1] for k, _ in items], dtype=np.int64),
            np.array([float(int(b)) for _, b in items], dtype=np.float64))


_Derived = TypeVar("_Derived")


def cached_per_problem(build: Callable[[PlacementProblem], _Derived]) -> Callable[[PlacementProblem], _Derived]:
    """``build(problem)`` computed once per problem and kept while the problem lives.

    Problems are frozen and compared by identity, so what is derived from one (a simulator's
    kernel arrays, the pipeline search's prefix tables) can live beside it in a weak-keyed
    cache; a changed problem (``dataclasses.replace``) is a new key.
    """
    cache: weakref.WeakKeyDictionary[PlacementProblem, _Derived] = weakref.WeakKeyDictionary()

    @functools.wraps(build)
    def cached(problem: PlacementProblem) -> _Derived:
        hit = cache.get(problem)
        if hit is None:
            hit = cache[problem] = build(problem)
        return hit

    return cached


def memory_problem_lines(peak_memory: dict[str, float], over_memory: dict[str, float]) -> list[str]:
    """One line per device that does not fit: its peak against the memory a placement may fill
    there (usable: its memory less its reserve, a GPU's CUDA context), the one wording of
    every simulator.

    >>> memory_problem_lines({"gpu0": 3 * 2**30}, {"gpu0": 2**30})
    ['gpu0 needs 3.00 GiB where 2.00 GiB is usable (1.00 GiB over)']
    """
    return [f"{d} needs {peak_memory[d] / 2**30:.2f} GiB where {(peak_memory[d] - over) / 2**30:.2f} GiB is usable "
            f"({over / 2**30:.2f} GiB over)"
            for d, over in over_memory.items()]
