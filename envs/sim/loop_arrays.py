"""The placement problem in the layout the simulator's loops read: flat, contiguous arrays
(op costs per device, consumers and gradient producers in CSR, each device's stream slots and
backward thread, the links, the memory terms), built once per problem for every path of
:mod:`envs.sim.simulator` (:mod:`envs.sim.kernels` run as Python, compiled by numba, and the
numpy static pass of :mod:`envs.sim.simulator_numpy`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.sim import kernels_engine as _engine
from envs.sim.problem import PlacementError, PlacementProblem
from envs.sim.problem_cache import cached_per_problem

__all__ = ["LoopArrays", "loop_arrays"]


@dataclass(frozen=True)
class LoopArrays:
    """Contiguous arrays in the layout the loops read (built once per problem; see
    :mod:`envs.sim.kernels`). Op indices are int64; device rows are int32."""

    n_devices: int
    op_group: np.ndarray  # [N] int64
    cost: np.ndarray  # [N*D*6]
    cost3: np.ndarray  # [N, D, 6] view
    rg: np.ndarray  # [N] uint8
    succ_ptr: np.ndarray
    succ_dst: np.ndarray
    succ_bytes: np.ndarray
    succ_grad: np.ndarray  # uint8
    gpred_ptr: np.ndarray  # [N+1] gradient producers' CSR (edges both ends requiring grad)
    gpred_src: np.ndarray
    id_base: np.ndarray  # [N+1] each op's first backward node id (kernels_engine.node_ids)
    id_op: np.ndarray  # [M] the op of each backward node id
    rd: np.ndarray  # [D] stream slot read
    wr: np.ndarray  # [D] stream slot written
    thread_of: np.ndarray  # [D] backward thread (0: the host)
    n_threads: int
    is_cpu: np.ndarray  # [D] uint8
    lat_flat: np.ndarray  # [D*D]
    inv_bw_flat: np.ndarray  # [D*D]
    blocking: np.ndarray  # [D*D] uint8
    consts: np.ndarray  # [4] copy_s, loss_s, backward_call_s, step_s
    group_static: np.ndarray  # [G] params + grads + optimizer state + kept activations
    group_busy: np.ndarray  # [G, D]
    op_static: np.ndarray  # [N]
    op_busy: np.ndarray  # [N, D]
    capacity: np.ndarray  # [D]
    group_work: np.ndarray  # [G] the backward working set of a group's largest gradient
    op_work: np.ndarray  # [N]
    group_params: np.ndarray  # [G] params + grads + optimizer state + the loop's batch and output: what the step holds
    op_params: np.ndarray  # [N]
    group_step_work: np.ndarray  # [G] the optimizer step's temporaries of a group's largest parameters
    op_step_work: np.ndarray  # [N]
    group_foreach: np.ndarray  # [G] the foreach implementation's temporaries of a group's parameters
    op_foreach: np.ndarray  # [N]
    kind_is_cpu: np.ndarray  # [D] the device is a CPU (its optimizer loops over parameters)


@cached_per_problem
def loop_arrays(problem: PlacementProblem) -> LoopArrays:
    """The arrays of ``problem`` (checked: every time and size finite and >= 0), built once per problem."""
    ops = problem.ops
    nd = problem.num_devices
    cost3 = np.ascontiguousarray(ops.cost, dtype=np.float64)
    if ops.one_process_per_device:
        # Ranks: each device is a process with its own thread (OpArrays.one_process_per_device):
        # all of an op's seconds on that device's own timeline, none on a shared host thread.
        cost3 = cost3.copy()
        cost3[:, :, 1::2] += cost3[:, :, 0::2]
        cost3[:, :, 0::2] = 0.0
    latency = np.asarray(problem.latency, dtype=np.float64)
    bandwidth = np.asarray(problem.bandwidth, dtype=np.float64)
    # The schedule arithmetic relies on every time and size being a finite number >= 0; a
    # cost model that broke this is a bug worth a clear message rather than a wrong step time.
    for label, values in (("ops.cost", cost3), ("ops.succ_bytes", ops.succ_bytes), ("latency", latency),
                          ("fwd_time", problem.fwd_time), ("bwd_time", problem.bwd_time),
                          ("edge_bytes", problem.edge_bytes)):
        values = np.asarray(values, dtype=np.float64)
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
            raise PlacementError(f"problem.{label} must hold finite numbers >= 0; got min {np.min(values)!r}")
    if not np.all(bandwidth > 0):  # inf (a device to itself) is fine; 0, negative or NaN is not
        raise PlacementError(f"problem.bandwidth must be > 0; got min {np.min(bandwidth)!r}")
    is_cpu = np.asarray(ops.is_cpu, dtype=bool) & (not ops.one_process_per_device)
    # One process: a copy between two CPU devices is a no-op .to('cpu') (host cost only).
    same_memory = np.eye(nd, dtype=bool) | (is_cpu[:, None] & is_cpu[None, :])
    gpu_index = np.cumsum(~is_cpu)  # k-th GPU -> thread k (the host is thread 0)
    rg = np.asarray(ops.requires_grad, dtype=bool)
    src = np.repeat(np.arange(ops.num_ops), np.diff(ops.succ_ptr))
    grad_edges = np.flatnonzero(ops.succ_grad)
    order = grad_edges[np.lexsort((src[grad_edges], ops.succ_dst[grad_edges]))]
    gpred_ptr = np.zeros(ops.num_ops + 1, dtype=np.int64)
    np.cumsum(np.bincount(ops.succ_dst[grad_edges], minlength=ops.num_ops), out=gpred_ptr[1:])
    op_static = np.ascontiguousarray(problem.op_static_memory() + ops.act_bytes)
    op_busy = np.ascontiguousarray(cost3.sum(axis=2))
    group_static = np.zeros(problem.num_nodes)
    np.add.at(group_static, ops.op_group, op_static)
    op_work = np.ascontiguousarray(ops.gradient_work())
    group_work = problem.backward_work()
    op_params = np.ascontiguousarray(ops.at_step_bytes(problem.op_static_memory()))
    group_params = problem.at_step_memory()
    host = ops.host
    succ_ptr = np.ascontiguousarray(ops.succ_ptr, dtype=np.int64)
    id_base, id_op = _engine.node_ids(succ_ptr, nd)
    arrays = LoopArrays(
        n_devices=nd,
        op_group=np.ascontiguousarray(ops.op_group, dtype=np.int64),
        cost=cost3.ravel(),
        cost3=cost3,
        rg=rg.astype(np.uint8),
        succ_ptr=succ_ptr,
        succ_dst=np.ascontiguousarray(ops.succ_dst, dtype=np.int64),
        succ_bytes=np.ascontiguousarray(ops.succ_bytes, dtype=np.float64),
        succ_grad=np.ascontiguousarray(ops.succ_grad, dtype=np.uint8),
        gpred_ptr=gpred_ptr,
        gpred_src=np.ascontiguousarray(src[order], dtype=np.int64),
        id_base=id_base,
        id_op=id_op,
        rd=np.where(is_cpu, nd, np.arange(nd)).astype(np.int64),
        wr=np.where(is_cpu, nd + 1, np.arange(nd)).astype(np.int64),
        thread_of=np.where(is_cpu, 0, gpu_index).astype(np.int64),
        n_threads=int(1 + (~is_cpu).sum()),
        is_cpu=is_cpu.astype(np.uint8),
        lat_flat=np.ascontiguousarray(np.where(same_memory, 0.0, latency).ravel()),
        inv_bw_flat=np.ascontiguousarray(np.where(same_memory, 0.0, 1.0 / bandwidth).ravel()),
        blocking=np.ascontiguousarray((is_cpu[:, None] | is_cpu[None, :]).ravel().astype(np.uint8)),
        consts=np.array([host.copy_s, host.loss_s, host.backward_call_s, host.step_s], dtype=np.float64),
        group_static=group_static,
        group_busy=np.ascontiguousarray(problem.fwd_time + problem.bwd_time, dtype=np.float64),
        op_static=op_static,
        op_busy=op_busy,
        capacity=np.ascontiguousarray(problem.memory_capacity, dtype=np.float64),
        group_work=group_work,
        op_work=op_work,
        group_params=group_params,
        op_params=op_params,
        group_step_work=problem.step_work(),
        op_step_work=np.ascontiguousarray(ops.step_work_bytes()),
        group_foreach=problem.foreach_work(),
        op_foreach=np.ascontiguousarray(ops.foreach_work_bytes()),
        kind_is_cpu=np.asarray(ops.is_cpu, dtype=bool),
    )
    return arrays
