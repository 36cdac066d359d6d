"""The op level of a placement problem: every op of the graph in program order, as the arrays the simulators execute.

Issue 15: "ops execute, groups only constrain". A :class:`~envs.sim.problem.PlacementProblem`
is placed by groups, but its simulators run its ops (:class:`OpArrays`, ``problem.ops``):
every op of the graph in program order (the fixed topological order,
:func:`envs.sim.problem_compile.topological_order`), with its host and device costs per
device, its consumers and its group. The simulators read op i's device as
``row[ops.op_group[i]]``, so a group row is never expanded into an op row in Python.

Kept apart from the problem so that what executes (these arrays and :func:`op_arrays`, which
lays them out, consumers in CSR) reads on its own; :mod:`envs.sim.problem_compile` builds
them from an op graph, :class:`~envs.sim.problem.PlacementProblem` from its group arrays
when a problem is built directly from arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.sim.cost_model import CPU_DISPATCH_S, DEFAULT_HOST, HostOverheads
from envs.sim.memory_rules import BACKWARD_WORK_FACTOR


def trained_bytes(param_bytes: np.ndarray, frozen_bytes: np.ndarray | None) -> np.ndarray:
    """Parameter bytes that get a gradient: ``param_bytes`` less ``frozen_bytes`` (None: none frozen).

    >>> trained_bytes(np.array([10.0, 4.0]), np.array([10.0, 1.0])).tolist()
    [0.0, 3.0]
    """
    return param_bytes if frozen_bytes is None else np.maximum(param_bytes - frozen_bytes, 0.0)


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
            (:data:`~envs.sim.optimizer_state.OPTIMIZER_STEP_WORK` x :meth:`trained_bytes`). The step
            runs after the backward freed the kept activations and received copies, so a
            device's peak is the larger of its backward peak and its static memory plus the
            largest of these. None: none (problems built from arrays).
        foreach_work: [N] bytes the foreach implementation's temporaries take per op
            (:data:`~envs.sim.optimizer_state.OPTIMIZER_FOREACH_WORK` x :meth:`trained_bytes`): on a
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
        frozen_bytes: [N] the part of ``param_bytes`` that gets no gradient (buffers, parameters
            with ``requires_grad=False``: a LoRA base layer, a frozen backbone): held, but with no
            gradient, optimizer state, optimizer step or all-reduce (:meth:`trained_bytes`). None: none.
        param_grads: [N] bytes of each op's parameter gradients: :meth:`trained_bytes`, but a sparse
            gradient (``nn.Embedding(sparse=True)``) counts the rows it holds, not the table
            (:func:`~envs.sim.cost_model.param_grad_bytes`); what DDP all-reduces and an
            optimizer step reads. None: :meth:`trained_bytes`.
        sparse_grad: [N] bool, the op's parameter gradient is sparse (``nn.Embedding(sparse=True)``):
            DDP all-reduces it by itself (:mod:`envs.sim.data_parallel` D2b). None: none.
        norm_channels: [N] channels of each op that is a BatchNorm module (``module_type``
            BatchNorm1d/2d/3d or SyncBatchNorm), 0 for every other op: data-parallel replicas synchronise their
            statistics (:mod:`envs.sim.data_parallel` D5). None: none.
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
    norm_channels: np.ndarray | None = None
    frozen_bytes: np.ndarray | None = None
    param_grads: np.ndarray | None = None
    sparse_grad: np.ndarray | None = None

    @property
    def num_ops(self) -> int:
        return len(self.names)

    def trained_bytes(self) -> np.ndarray:
        """[N] parameter bytes that get a gradient (:func:`trained_bytes`)."""
        return trained_bytes(self.param_bytes, self.frozen_bytes)

    def param_grad_bytes(self) -> np.ndarray:
        """[N] bytes of each op's parameter gradients (``param_grads``; :meth:`trained_bytes` where none)."""
        return self.trained_bytes() if self.param_grads is None else self.param_grads

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


#: The BatchNorm modules whose statistics data-parallel replicas synchronise (D5).
BATCH_NORM_MODULES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})


def batch_norm_channels(attrs: Mapping[str, Any]) -> int:
    """Channels of a BatchNorm module's op (dim 1 of its output), else 0 (``norm_channels``).

    >>> batch_norm_channels({"op": "call_module", "module_type": "BatchNorm2d", "shape": [8, 64, 7, 7]})
    64
    >>> batch_norm_channels({"op": "call_function", "module_type": "BatchNorm2d", "shape": [8, 64, 7, 7]})
    0
    """
    shape = attrs.get("shape") or ()
    if attrs.get("op") != "call_module" or attrs.get("module_type") not in BATCH_NORM_MODULES or len(shape) < 2:
        return 0
    return int(shape[1])


def op_arrays(names, op_group, cost, rg, param_bytes, act_bytes, out_bytes, flops, src, dst, nbytes, is_cpu,
              host: HostOverheads, grad_bytes: np.ndarray | None = None,
              shared_grad_bytes: np.ndarray | None = None, fixed_host: np.ndarray | None = None,
              accumulate: np.ndarray | None = None, frozen_bytes: np.ndarray | None = None,
              param_grads: np.ndarray | None = None) -> OpArrays:
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
        frozen_bytes=None if frozen_bytes is None else np.asarray(frozen_bytes, dtype=np.float64),
        param_grads=None if param_grads is None else np.asarray(param_grads, dtype=np.float64),
    )
