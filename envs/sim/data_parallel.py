"""Data parallelism (DDP) simulated: the baseline every pipelined or split placement must beat.

``N`` replicas, each the whole model on one device with ``1/N`` of the batch, as
``torch.nn.parallel.DistributedDataParallel`` runs them. Rules, each with the behaviour
behind it (paths in the installed torch 2.13):

**D1 Compute.** Each replica runs the forward and the backward of the whole model on its
share of the batch, every op costed as a pipeline stage's (:mod:`envs.sim.pipeline`, P2:
fixed part plus batch-proportional part divided by ``N``), one stage call each way. The
optimizer updates every parameter on every replica, unscaled (each replica steps the
full model after the all-reduce).

**D2 Buckets.** The reducer groups the gradients into buckets in reverse parameter order
(``nn/parallel/distributed.py``: ``_compute_bucket_assignment_by_size`` over the
parameters, then ``list(reversed(bucket_indices))``): the first bucket holds up to
``dist._DEFAULT_FIRST_BUCKET_BYTES`` (1 MiB), the others ``_DEFAULT_BUCKET_CAP_MB`` = 25 MiB
(``_MB_TO_BYTES`` = 2**20). Parameters are taken in the reverse of the op order (the
order the backward produces them); a bucket is ready when the backward has reached the
earliest op whose gradient it holds, on every replica (the slowest one decides).

**D3 Ring all-reduce.** Buckets are all-reduced one after another (one communication
stream, in bucket order: the reducer launches them in order, ``reducer.cpp:mark_bucket_ready``),
each as a ring over the replicas' devices: ``2(N-1)/N · bytes / bw + 2(N-1) · lat``
(reduce-scatter then all-gather, ``N - 1`` steps each), ``bw`` the slowest and ``lat`` the
slowest link of the ring ``d0 → d1 → … → d0``. An all-reduce overlaps the rest of the
backward; the optimizer starts when the last one is done (``finalize_backward`` waits for
all buckets before ``backward()`` returns).

**D4 Memory.** Per replica: parameters, gradients and optimizer state of the whole
model (``problem.static_memory``), ``1/N`` of the kept activations, and the reducer's
flat bucket buffers (one more copy of the gradients: ``gradient_as_bucket_view=False`` is
the default). A replica over its device's capacity makes the whole set "does not fit".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.pipeline import CPU_DISPATCH_S, ZERO_HOST, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.ranks import RankCosts

__all__ = ["FIRST_BUCKET_BYTES", "BUCKET_BYTES", "DataParallelResult", "buckets", "ring_allreduce_time",
           "simulate_data_parallel"]

#: ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``.
FIRST_BUCKET_BYTES = 1024 * 1024
#: ``_DEFAULT_BUCKET_CAP_MB * _MB_TO_BYTES`` of ``nn/parallel/distributed.py``.
BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class DataParallelResult:
    """One simulated DDP step.

    Attributes:
        replicas: the devices, one replica each.
        step_time: seconds (the slowest replica, all-reduces included).
        compute_time: forward + backward seconds of the slowest replica.
        exposed_allreduce: seconds the optimizer waited for the all-reduces after the backward.
        bucket_bytes: bytes of each bucket, in launch order.
        peak_memory: {device: bytes} per replica.
        over_memory: {device: bytes over capacity} of the replicas that do not fit.
    """

    replicas: tuple[str, ...]
    step_time: float
    compute_time: float
    exposed_allreduce: float
    bucket_bytes: list[float]
    peak_memory: dict[str, float]
    over_memory: dict[str, float]

    @property
    def fits(self) -> bool:
        return not self.over_memory

    def describe(self) -> str:
        """One line: the step time, or why it does not fit."""
        if not self.fits:
            worst = max(self.over_memory, key=self.over_memory.get)
            return (f"DDP x{len(self.replicas)}: does not fit ({worst} needs "
                    f"{self.peak_memory[worst] / 2**30:.2f} GiB for one replica)")
        return f"DDP x{len(self.replicas)}: {self.step_time * 1e3:.2f} ms per step"


def buckets(grad_bytes: Sequence[float], first: float = FIRST_BUCKET_BYTES, cap: float = BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``grad_bytes`` (already in reverse parameter order) per bucket (D2): a bucket
    closes once it holds at least its cap (the reducer's ``>=`` test), the first at ``first``."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0.0
    limit = first
    for i, b in enumerate(grad_bytes):
        if b <= 0:
            continue
        current.append(i)
        size += b
        if size >= limit:
            out.append(current)
            current, size, limit = [], 0.0, cap
    if current:
        out.append(current)
    return out


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``n`` devices (D3)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2.0 * (n - 1) * latency


def _replica_times(problem: PlacementProblem, d: int, n: int, scale: float) -> tuple[float, np.ndarray, float]:
    """(forward seconds, per-op backward seconds in op order, optimizer seconds) of one replica (D1)."""
    ops = problem.ops
    c = ops.cost[:, d, :]
    if ops.is_cpu[d]:
        per = []
        for h in (0, 2):
            host = c[:, h]
            fixed = np.minimum(host, CPU_DISPATCH_S)
            per.append((fixed + (host - fixed) / n) * scale)
        fwd, bwd = float(per[0].sum()), per[1]
    else:
        fwd = max(float(c[:, 0].sum()), float(c[:, 1].sum()) / n)
        raw = c[:, 2] + c[:, 3] / n
        total = max(float(c[:, 2].sum()), float(c[:, 3].sum()) / n)
        # Progress through the backward follows the ops' shares; the stage lasts as long as
        # the slower of the host issuing and the stream executing.
        bwd = raw * (total / raw.sum()) if raw.sum() > 0 else raw
    opt = float(c[:, 4:].sum()) * scale
    return fwd, bwd, opt


def simulate_data_parallel(problem: PlacementProblem, replicas: int | Sequence[str] | None = None,
                           costs: RankCosts | None = None) -> DataParallelResult:
    """Simulate one DDP step of the whole model over ``replicas`` (rules D1-D4 in the module doc).

    Args:
        problem: the compiled problem (op costs per device, links, capacities).
        replicas: the devices (names), or how many of the cluster's first devices; default all.
        costs: host constants of CPU processes (default :class:`RankCosts`); none on GPUs.

    Raises:
        PipelineError: no replica, or a device not in the cluster.
    """
    names = list(problem.device_names)
    if replicas is None:
        chosen = names
    elif isinstance(replicas, (int, np.integer)) and not isinstance(replicas, bool):
        if not 1 <= int(replicas) <= len(names):
            raise PipelineError(f"DDP over {replicas} replicas; expected 1 to {len(names)} (the cluster's devices)")
        chosen = names[:int(replicas)]
    else:
        chosen = [str(r) for r in replicas]
        bad = [r for r in chosen if r not in names]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise PipelineError(f"DDP replicas {chosen} must be distinct devices of the cluster {names}")
    n = len(chosen)
    idx = [names.index(r) for r in chosen]
    ops = problem.ops
    grad_bytes = np.where(ops.requires_grad, ops.param_bytes, 0.0)[::-1]  # reverse parameter order (D2)
    groups = buckets(grad_bytes.tolist())
    bucket_bytes = [float(grad_bytes[g].sum()) for g in groups]
    num = ops.num_ops
    # A bucket is ready once the backward reached its earliest op: reversed index max.
    first_op = [num - 1 - max(g) for g in groups]

    ready = np.zeros(len(groups))
    back_end = 0.0
    compute = 0.0
    opt_max = 0.0
    tail = 0.0
    for d in idx:
        hc = (costs or RankCosts()) if ops.is_cpu[d] else ZERO_HOST
        scale = hc.op_scale if ops.is_cpu[d] else 1.0
        fwd, bwd, opt = _replica_times(problem, d, n, scale)
        start_b = fwd + hc.stage_fwd_s + hc.loss_s + hc.stage_bwd_s
        # Backward runs in reverse op order: op i's gradient exists once ops num-1..i are done.
        done_at = start_b + np.cumsum(bwd[::-1])[::-1]
        for k, i in enumerate(first_op):
            ready[k] = max(ready[k], done_at[i])
        end = start_b + float(bwd.sum())
        back_end = max(back_end, end)
        compute = max(compute, end)
        has_params = bool(ops.param_bytes.sum() > 0)
        opt_max = max(opt_max, opt + (float(ops.host.step_s) if has_params else 0.0))
        tail = max(tail, hc.step_s)
    ring = [(idx[k], idx[(k + 1) % n]) for k in range(n)] if n > 1 else []
    bw = min((float(problem.bandwidth[a, b]) for a, b in ring), default=np.inf)
    lat = max((float(problem.latency[a, b]) for a, b in ring), default=0.0)
    comm_end = 0.0
    for k, nbytes in enumerate(bucket_bytes):
        comm_end = max(comm_end, ready[k]) + ring_allreduce_time(nbytes, n, bw, lat)
    synced = max(back_end, comm_end)
    step = synced + opt_max + tail

    static = float((ops.param_bytes * (2.0 + problem.optimizer_state_factor)).sum())
    peak_one = static + float(ops.act_bytes.sum()) / n + (float(grad_bytes.sum()) if n > 1 else 0.0)
    peak = {names[d]: peak_one for d in idx}
    over = {names[d]: peak_one - float(problem.memory_capacity[d]) for d in idx
            if peak_one > float(problem.memory_capacity[d])}
    return DataParallelResult(tuple(chosen), float(step), float(compute), float(synced - back_end), bucket_bytes,
                              peak, over)
