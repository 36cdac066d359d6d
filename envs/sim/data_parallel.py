"""Data parallelism (DDP) simulated: the baseline every pipelined or split placement must beat.

``N`` replicas, each the whole model on one device with ``1/N`` of the batch, as
``torch.nn.parallel.DistributedDataParallel`` runs them. Rules, each with the behaviour
behind it (paths in the installed torch 2.13):

**D1 Compute.** Each replica runs the forward and the backward of the whole model on its
share of the batch, every op costed as a pipeline stage's (:mod:`envs.sim.pipeline`, P2:
fixed part, measured where the model was also profiled on a micro-batch, plus
batch-proportional part divided by ``N``), one stage call each way, with the pipeline
engine's host constants (:data:`~envs.sim.stage_costs.ENGINE_COSTS`). The
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

**D3c CPU ranks.** Between CPU processes (gloo, one core each) the all-reduces do not
overlap the backward: they start when it ends, and a ring gets
:data:`CPU_RING_EFFICIENCY` of the link's ping-pong bandwidth. gloo's ring sends,
receives and sums on the CPU, on the cores the backward holds: measured here, a 44 MB
all-reduce between two idle 1-thread processes took 57-60 ms and 28 ms of CPU on each,
and gpt2's DDP step (batch 256 over 2 ranks) was 2416 ms against 2360 ms of profiled
compute per replica, the all-reduce's time exposed whole; resnet50's (102 MB) exposed 170
ms against the 97 ms the ring alone takes, so this rule is still optimistic there
(benchmarks/results/pipeline.md, "Calibrated"). Measured again on 2026-12-06 (14:18-14:27 UTC,
retaining allocator): a 100 MB all-reduce took 87.6 ms where this rule gives 78.0 at that run's
2.86 GB/s ping-pong, and a world-size-1 DDP step of ResNet-50 on half the batch cost 40-46 ms more
CPU than the plain step (the reducer's copies into and out of its 102 MB of buckets, its hooks;
GPT-2's 43 MB: within the +-60 ms noise of its 2.2 s steps), which rule D3d now charges: DDP
ResNet-50 measured 600-637 ms against 578 simulated before it.

**D3d The reducer's copies on CPU processes.** With ``gradient_as_bucket_view=False`` (the
default) the reducer copies every gradient into its bucket as the backward's hooks fire,
averages the bucket after its all-reduce and copies it back into ``.grad``
(``reducer.cpp``: ``copy_grad_to_bucket``, ``finalize_bucket_dense``); on a CPU process that
is work on the core the step runs on: :data:`CPU_REDUCER_SECONDS_PER_BYTE` per gradient byte,
charged after the all-reduces, before the optimizer (on one core the copies in, inside the
backward, end the step at the same time). Measured here (world-size-1 DDP against the plain
step, 1 thread): 0.30-0.32 ns per byte on Linear stacks of 67, 134 and 269 MB, linear in the
bytes; ResNet-50 (102 MB in 161 tensors, 159 buffers) 40-46 ms, 0.39-0.45 ns per byte. Its
extra ~10 ms is not the reducer's per-tensor work (3-7 us a tensor on stacks of 256 and 1,024
small tensors, ~1 ms for its 161; not charged) and was not found. With the rule, DDP ResNet-50
over two CPU processes simulates at 610-613 ms (the link is measured afresh each run) against
600-637 measured. On a GPU the copies are device memcpy kernels, under 1 ms per 100 MB at a
V100's bandwidth; not charged.

**D4 Memory.** Per replica: parameters, gradients and optimizer state of the whole
model (``problem.static_memory``), ``1/N`` of the kept activations, and the reducer's
flat bucket buffers (one more copy of the gradients: ``gradient_as_bucket_view=False`` is
the default), and the backward's working set on its ``1/N`` of the batch (as the op-level
simulator's, ``results/memory.md``), or, when larger, what the optimizer step holds after
the backward freed the activations: the static memory, the buckets, the batch and output the
training loop holds and the temporaries of
the largest parameter's update (``envs.sim.optimizer_state.OPTIMIZER_STEP_WORK``). A replica
over its device's capacity makes the whole set "does not fit".

**D5 Synchronised BatchNorm.** With one micro-batch per replica the runtime swaps every
BatchNorm module for :class:`~envs.runtime.replica_batch_norm.ReplicaBatchNorm`, which takes
its statistics over all the replicas' samples (the unsplit model's step; ``SyncBatchNorm``
does the same on GPUs only). Per BatchNorm op of ``C`` channels (``OpArrays.norm_channels``)
that is one all-gather of ``1 + 2C`` float32 values in the forward and one of ``2C`` in the
backward, each blocking the replica's thread (the op waits for the statistics):
:func:`norm_sync_seconds`, ``(N - 1) * (lat + bytes / bw)`` per gather as a ring of ``N``
replicas does it. Between CPU processes three more things were measured:

* a gather of a few kilobytes costs far more than the link's latency: 338-456 us for 65-4,096
  floats between two 1-thread gloo processes gathering back to back, against a one-way
  ping-pong latency of 56-65 us (``benchmarks/bench_small_gather.py``, 2026-12-06), and
  about 0.9 ms inside a DDP step, where the replicas reach each BatchNorm at different
  moments: :data:`CPU_GATHER_IN_STEP_S` per ring step, fitted on ResNet-50's step;
* each gather is a sleeping wait, after which the replica's next op time runs cold (R3 and
  R3b of :mod:`envs.sim.ranks`, with their fitted constants, :data:`SLEEPING_WAIT`): up to
  ``cold_s`` of the ops that follow, the forward's up to the next BatchNorm and the
  backward's down to the previous one;
* ReplicaBatchNorm's own kernels cost :data:`CPU_REPLICA_NORM_EXTRA` more than the profiled
  native op's (``benchmarks/bench_replica_batch_norm.py``: ResNet-50 at batch 16, 0.82-0.97).

Measured (ad-hoc decomposition of DDP ResNet-50, paper width, 64x64, batch 32 over two 1-thread
processes, 2026-12-06 16:33 UTC): native BatchNorm unsynchronised 620-624 ms a step,
ReplicaBatchNorm without communication 631-650, with its 106 gathers over gloo 810-835; the
gathers' wall cost is ~1.7 ms each, five times the lockstep figure, and the ranks' CPU time
grew by 70-85 ms, as R3b's cold op time does. With the gathers charged at the lockstep rate
(in ping-pong latencies) the calibrated prediction of that step was 828 ms against 828
measured at load 1.3-3.2 and 763 against 817 on a quiet machine, and Inception-v3's (94
BatchNorms, 107x107 images, batch 16) 675 against 799: the prediction followed the run's
ping-pong latency, the measured step did not, and every gather was short by 0.5-0.7 ms.
:data:`CPU_GATHER_IN_STEP_S` is fitted on ResNet-50's quiet step; Inception-v3 is the check
(``benchmarks/bench_pipeline_measured.py --cases resnet50,inception_v3``, figures in
``benchmarks/results/pipeline.md``). The graph does not record which BatchNorms are frozen in eval mode
(the runtime leaves those alone), so they are charged too. With ``M > 1`` nothing is
synchronised (the split check refuses such a split of a BatchNorm model).

**Hybrid: pipeline x data parallel** (:func:`simulate_hybrid`). ``R`` replicas, each the
same pipeline (stages, ``M``, schedule) on its own devices with ``1/R`` of the batch: the
usual composition of ``torch.distributed.pipelining`` with DDP, each stage module wrapped
in DDP over a process group of that stage's ``R`` devices. Rules:

* **H1** Each replica runs its pipeline exactly as :func:`envs.sim.pipeline.simulate_pipeline`
  does, its micro-batches ``1 / (R M)`` of the batch (P2 with ``M`` replaced by ``R M``).
* **H2** A stage's gradients are all-reduced only during the backward of its *last*
  micro-batch: the pipeline stage runs the earlier backwards under DDP's ``no_sync()``
  (``stage.py``: ``backward_maybe_with_nosync``, ``last_backward`` true only for the last
  one), so the reducer's hooks fire once per step, on the accumulated gradients. Within
  that backward the stage's buckets (D2, over the stage's own parameters) become ready as
  the backward walks its ops in reverse, the backward's time shared out over its ops as D1
  does, after the stage call's fixed host cost; a bucket is ready when every replica got
  there (the slowest decides).
* **H3** The buckets of one stage are all-reduced one after another as a ring over that
  stage's ``R`` devices (D3); the rings of different stages are independent (different
  process groups and devices, one stage per device: interleaved schedules are not
  combined with replicas here).
* **H4** A device steps its optimizer once its pipeline actions and sends are done (P5) and
  its stage's last all-reduce is; its memory is the pipeline's (P5) plus DDP's bucket copy
  of the stage's gradients (D4).
* **H5** With ``M = 1`` each stage's BatchNorms are synchronised over the stage's replicas
  (D5), their gathers added to the stage's forward and backward.

With ``R = 1`` this is the pipeline; with one stage, ``M = 1`` and ``R = N`` it is DDP over
the ``N`` devices (both tested). That pipeline (:func:`data_parallel_pipeline`) is how a
placement file holds DDP, and how ``torch.distributed.pipelining`` runs it: one stage module
per process, wrapped in DDP over the ``N`` processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from envs.sim.memory_report import memory_problem_lines
from envs.sim.memory_rules import step_temporaries
from envs.sim.pipeline import PipelineResult, check_pipeline, engine_host_costs, simulate_pipeline
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.rank_costs import RankCosts
from envs.sim.stage_costs import StageCosts, shrunk_host, stage_costs

__all__ = ["FIRST_BUCKET_BYTES", "BUCKET_BYTES", "CPU_RING_EFFICIENCY", "CPU_REDUCER_SECONDS_PER_BYTE",
           "CPU_GATHER_IN_STEP_S", "DataParallelResult", "buckets", "norm_sync_seconds",
           "data_parallel_pipeline", "ring_allreduce_time",
           "simulate_data_parallel", "HybridResult", "check_hybrid", "check_runnable", "simulate_hybrid",
           "simulate_pipelined"]

#: ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``.
FIRST_BUCKET_BYTES = 1024 * 1024
#: ``_DEFAULT_BUCKET_CAP_MB * _MB_TO_BYTES`` of ``nn/parallel/distributed.py``.
BUCKET_BYTES = 25 * 1024 * 1024
#: The share of a CPU link's ping-pong bandwidth that gloo's ring all-reduce gets (D3c):
#: measured here between two 1-thread processes (2026-12-05, load 2.5), 25, 44 and 100 MB
#: all-reduced in 28, 57-60 and 96 ms against 13, 23 and 52 ms at the 2.0 GB/s the rank
#: cluster's ping-pong measured (factors 0.47, 0.40, 0.54): each rank sends and receives at
#: once and sums what it receives, on the same cores.
CPU_RING_EFFICIENCY = 0.47
#: The DDP reducer's copies into and out of its buckets on a CPU process, seconds per gradient
#: byte (D3d): world-size-1 DDP against the plain step on Linear stacks of 67-269 MB, 1 thread,
#: 2026-12-06 (0.30-0.35 ns per byte, linear in the bytes; ``benchmarks/bench_ddp_reducer.py``).
CPU_REDUCER_SECONDS_PER_BYTE = 0.31e-9
#: A BatchNorm's gather between CPU processes (gloo) inside a DDP step, seconds per ring step
#: (D5). Two 1-thread processes gathering back to back take 338-456 us
#: (``benchmarks/bench_small_gather.py``), but in a step the replicas reach each BatchNorm
#: at different moments and the first waits: fitted on DDP ResNet-50's measured step (0.9 ms
#: a gather, besides the waits' cold op time), it predicts Inception-v3's within 4%
#: (``benchmarks/results/pipeline.md``). Not a multiple of the link's latency: the step did
#: not move when the measured ping-pong latency did.
CPU_GATHER_IN_STEP_S = 0.9e-3
#: Bytes of one value of the BatchNorm statistics the replicas gather (float32).
NORM_STAT_BYTES = 4
#: D5 on CPU processes: what ReplicaBatchNorm's forward and backward cost beyond the profiled
#: native BatchNorm op's, as a share of it (``benchmarks/bench_replica_batch_norm.py``).
CPU_REPLICA_NORM_EXTRA = 0.9
#: D5 on CPU processes: a gather is a sleeping wait of the kind the rank runtime measured (R3's
#: expected wake-up, R3b's cold op time after it), with those rules' fitted constants.
#: :data:`~envs.sim.stage_costs.ENGINE_COSTS` leaves R3b out of pipelines, whose few waits it
#: moved by under 1%; a BatchNorm model's DDP step waits twice per BatchNorm.
SLEEPING_WAIT = RankCosts()


@dataclass
class DataParallelResult:
    """One simulated DDP step.

    Attributes:
        replicas: the devices, one replica each.
        step_time: seconds (the slowest replica, all-reduces included).
        compute_time: forward + backward seconds of the slowest replica.
        exposed_allreduce: seconds the optimizer waited for the all-reduces after the backward
            (on CPU processes with the reducer's copies, D3d).
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


def data_parallel_pipeline(problem: PlacementProblem, devices: Sequence[str]) -> Pipeline:
    """DDP over ``devices`` as a pipeline: one stage holding every node of ``problem`` on the
    first device, one micro-batch, a replica on each other device. :func:`simulate_pipelined`
    gives it :func:`simulate_data_parallel`'s step (H1-H5 reduce to D1-D5).

    Raises:
        PipelineError: no device, or one named twice.
    """
    if not devices:
        raise PipelineError("DDP needs at least one device")
    return Pipeline((tuple(problem.node_names),), (str(devices[0]),), 1, "gpipe",
                    tuple((str(d),) for d in devices[1:]))


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``n`` devices (D3)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2.0 * (n - 1) * latency


def reducer_seconds(grad_bytes: float, on_cpu: bool) -> float:
    """Seconds the DDP reducer's copies of ``grad_bytes`` of gradients take on each replica (D3d):
    on CPU processes, :data:`CPU_REDUCER_SECONDS_PER_BYTE` per byte; none charged on GPUs.

    >>> round(reducer_seconds(100e6, True) * 1e3, 1)
    31.0
    """
    return CPU_REDUCER_SECONDS_PER_BYTE * grad_bytes if on_cpu else 0.0


def norm_sync_seconds(channels: np.ndarray, fwd_op: np.ndarray, bwd_op: np.ndarray, n: int, bandwidth: float,
                      latency: float, on_cpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per op, the (forward, backward) seconds a synchronised BatchNorm adds to a replica over a
    ring of ``n`` (D5). ``channels`` [N] as ``OpArrays.norm_channels`` (0: no BatchNorm);
    ``fwd_op``/``bwd_op`` [N] the replica's op seconds in op order (used on CPU processes);
    ``bandwidth`` and ``latency`` the ring's link as D3 takes it.

    >>> zero = np.zeros(2)
    >>> f, b = norm_sync_seconds(np.array([0.0, 64.0]), zero, zero, 2, 1e9, 65e-6, on_cpu=False)
    >>> [round(float(x) * 1e6, 2) for x in (f[0], f[1], b[1])]
    [0.0, 65.52, 65.51]
    """
    channels = np.asarray(channels, dtype=np.float64)
    is_norm = channels > 0
    if n <= 1 or not is_norm.any():
        return np.zeros_like(channels), np.zeros_like(channels)
    lat = CPU_GATHER_IN_STEP_S if on_cpu else latency

    def gather(values: np.ndarray) -> np.ndarray:
        return (n - 1) * (lat + values * NORM_STAT_BYTES / bandwidth)

    fwd = np.where(is_norm, gather(1 + 2 * channels), 0.0)
    bwd = np.where(is_norm, gather(2 * channels), 0.0)
    if on_cpu:
        fwd_op = np.asarray(fwd_op, dtype=np.float64)
        bwd_op = np.asarray(bwd_op, dtype=np.float64)
        at = np.flatnonzero(is_norm)
        # The op time run cold after each gather: the forward goes on with the ops after the
        # BatchNorm up to the next one, the backward with those before it down to the previous.
        f_sum = np.concatenate([[0.0], np.cumsum(fwd_op)])
        b_sum = np.concatenate([[0.0], np.cumsum(bwd_op)])
        after = f_sum[np.append(at[1:], len(channels))] - f_sum[at + 1]
        before = b_sum[at] - b_sum[np.concatenate([[0], at[:-1] + 1])]
        wait = SLEEPING_WAIT.expected_wake_s
        cold = SLEEPING_WAIT.cold_factor
        fwd[at] += wait + cold * np.minimum(after, SLEEPING_WAIT.cold_s) + CPU_REPLICA_NORM_EXTRA * fwd_op[at]
        bwd[at] += wait + cold * np.minimum(before, SLEEPING_WAIT.cold_s) + CPU_REPLICA_NORM_EXTRA * bwd_op[at]
    return fwd, bwd


def _norm_channels(problem: PlacementProblem) -> np.ndarray:
    """``OpArrays.norm_channels``, zeros where the problem has none."""
    ops = problem.ops
    return ops.norm_channels if ops.norm_channels is not None else np.zeros(ops.num_ops)


def _ring_link(problem: PlacementProblem, ring: Sequence[tuple[int, int]]) -> tuple[float, float, bool]:
    """(bandwidth, latency, every device a CPU) of a ring's slowest links (D3, D3c)."""
    bw = min((float(problem.bandwidth[a, b]) for a, b in ring), default=np.inf)
    lat = max((float(problem.latency[a, b]) for a, b in ring), default=0.0)
    on_cpu = bool(ring) and all(bool(problem.ops.is_cpu[a]) for a, _ in ring)
    return (bw * CPU_RING_EFFICIENCY if on_cpu else bw), lat, on_cpu


def _cpu_op_seconds(problem: PlacementProblem, d: int, share: float, scale: float,
                    fixed_part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] forward and [N] backward seconds of each op on CPU device ``d`` at ``1/share`` of the
    batch (P2's fixed part kept), times the engine's ``op_scale``."""
    c = problem.ops.cost[:, d, :]
    return (shrunk_host(c[:, 0], fixed_part[:, d, 0], share) * scale,
            shrunk_host(c[:, 2], fixed_part[:, d, 1], share) * scale)


def _norm_sync_on(problem: PlacementProblem, d: int, share: float, scale: float, fixed_part: np.ndarray,
                  channels: np.ndarray, n: int, bw: float, lat: float, on_cpu: bool,
                  mine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`norm_sync_seconds` for a replica on device ``d`` at ``1/share`` of the batch; with
    ``mine`` [N] bool, of the ops of one stage only (the others run elsewhere)."""
    if mine is not None:
        channels = np.where(mine, channels, 0.0)
    if on_cpu:
        fwd_op, bwd_op = _cpu_op_seconds(problem, d, share, scale, fixed_part)
        if mine is not None:
            fwd_op, bwd_op = np.where(mine, fwd_op, 0.0), np.where(mine, bwd_op, 0.0)
    else:
        fwd_op = bwd_op = np.zeros(problem.ops.num_ops)
    return norm_sync_seconds(channels, fwd_op, bwd_op, n, bw, lat, on_cpu)


def _replica_times(problem: PlacementProblem, d: int, n: int, scale: float, fixed_part: np.ndarray,
                   sync_b: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(forward seconds, per-op backward seconds in op order, optimizer seconds) of one replica
    (D1); ``fixed_part`` [N, D, 2] the host seconds a smaller batch does not shrink (P2);
    ``sync_b`` [N] each op's BatchNorm gather in the backward (D5), added where it blocks."""
    ops = problem.ops
    c = ops.cost[:, d, :]
    if ops.is_cpu[d]:
        fwd_op, bwd_op = _cpu_op_seconds(problem, d, n, scale, fixed_part)
        fwd, bwd = float(fwd_op.sum()), bwd_op + sync_b
    else:
        fwd = max(float(c[:, 0].sum()), float(c[:, 1].sum()) / n)
        raw = c[:, 2] + c[:, 3] / n + sync_b
        total = max(float(c[:, 2].sum()), float(c[:, 3].sum()) / n) + float(sync_b.sum())
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
        costs: host constants of CPU processes (default :data:`envs.sim.stage_costs.ENGINE_COSTS`);
            none on GPUs.

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
    fixed_part = problem.ops.fixed_parts()
    ring = [(idx[k], idx[(k + 1) % n]) for k in range(n)] if n > 1 else []
    bw, lat, on_cpu = _ring_link(problem, ring)
    channels = _norm_channels(problem)
    for d in idx:
        hc = engine_host_costs(problem, d, costs)
        scale = hc.op_scale if ops.is_cpu[d] else 1.0
        sync_f, sync_b = _norm_sync_on(problem, d, n, scale, fixed_part, channels, n, bw, lat, on_cpu)  # D5
        fwd, bwd, opt = _replica_times(problem, d, n, scale, fixed_part, sync_b)
        fwd += float(sync_f.sum())
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
    if on_cpu:
        ready[:] = back_end  # D3c: the backward holds the cores until it ends
    comm_end = 0.0
    for k, nbytes in enumerate(bucket_bytes):
        comm_end = max(comm_end, ready[k]) + ring_allreduce_time(nbytes, n, bw, lat)
    reducer = reducer_seconds(float(grad_bytes.sum()), on_cpu)
    synced = max(back_end, comm_end) + reducer
    step = synced + opt_max + tail

    static = float(problem.op_static_memory().sum())
    work = float(ops.gradient_work_at(n).max(initial=0.0))  # the backward's working set, on 1/n of the batch
    buckets_held = float(grad_bytes.sum()) if n > 1 else 0.0
    peak_one = static + float(ops.act_bytes.sum()) / n + buckets_held + work
    # The optimizer step, after the backward freed the activations: its temporaries (the
    # op-level simulators' rule, envs.sim.memory_rules.step_temporaries; a GPU's foreach default).
    temporaries = step_temporaries(np.asarray(ops.is_cpu)[idx], np.float64(ops.step_work_bytes().max(initial=0.0)),
                                   np.float64(ops.foreach_work_bytes().sum()))
    at_step = static + buckets_held + float(ops.loop_held_bytes().sum()) + temporaries
    peaks = np.maximum(peak_one, at_step)
    peak = {names[d]: float(p) for d, p in zip(idx, peaks)}
    over = {names[d]: float(p) - float(problem.memory_capacity[d]) for d, p in zip(idx, peaks)
            if p > float(problem.memory_capacity[d])}
    return DataParallelResult(tuple(chosen), float(step), float(compute), float(synced - back_end), bucket_bytes,
                              peak, over)


@dataclass
class HybridResult:
    """One simulated step of ``R`` pipeline replicas with per-stage gradient all-reduce (H1-H5).

    Attributes:
        pipelines: each replica's pipeline (same stages, ``M`` and schedule).
        step_time: seconds until the last device has stepped.
        replicas: each replica's own pipelined step before the all-reduces (:func:`simulate_pipeline`).
        exposed_allreduce: [S] seconds each stage's devices waited for its all-reduces.
        peak_memory: {device: bytes}.
        over_memory: {device: bytes over capacity} of the devices that do not fit.
    """

    pipelines: tuple[Pipeline, ...]
    step_time: float
    replicas: list[PipelineResult]
    exposed_allreduce: list[float]
    peak_memory: dict[str, float]
    over_memory: dict[str, float]

    @property
    def fits(self) -> bool:
        return not self.over_memory

    def memory_problems(self) -> list[str]:
        """One line per device that does not fit."""
        return memory_problem_lines(self.peak_memory, self.over_memory)


def check_hybrid(pipelines: Sequence[Pipeline], batch_size: int | None = None) -> None:
    """Raise :class:`PipelineError` unless ``pipelines`` are replicas of one pipeline on distinct
    devices, one stage per device, and ``R * M`` divides ``batch_size`` (when given)."""
    if not pipelines:
        raise PipelineError("a hybrid needs at least one replica")
    first = pipelines[0]
    for r, p in enumerate(pipelines[1:], 1):
        if p.stages != first.stages or p.microbatches != first.microbatches or p.schedule != first.schedule:
            raise PipelineError(f"replica {r} is not the same pipeline as replica 0; expected the same stages, "
                                "micro-batches and schedule on other devices")
    if len(pipelines) > 1 and first.schedule == "interleaved_1f1b":
        raise PipelineError("replicated pipelines run gpipe or 1f1b here; expected one stage per device")
    used = [d for p in pipelines for d in p.devices]
    if len(pipelines) > 1 and len(set(used)) != len(used):  # one replica: its own rules (interleaved repeats)
        raise PipelineError(f"the replicas share devices ({used}); expected each device in one replica's one stage")
    r_m = len(pipelines) * first.microbatches
    if batch_size is not None and batch_size % r_m:
        raise PipelineError(f"{len(pipelines)} replica(s) x {first.microbatches} micro-batches do not divide the "
                            f"batch of {batch_size}; expected R * M to divide it")


def check_runnable(problem: PlacementProblem, pipelines: Sequence[Pipeline], batch_size: int | None = None,
                   costs: RankCosts | None = None) -> None:
    """Refuse, before anything starts, a pipeline (one replica) or a pipeline x DDP hybrid
    (several) that cannot run: the checks of :func:`envs.sim.pipeline.check_pipeline` or of
    :func:`check_hybrid`, then a device it does not fit (its simulated peak).

    Raises:
        PipelineError: one line naming what was wrong and what was expected.
    """
    if len(pipelines) == 1:
        check_pipeline(problem, pipelines[0], batch_size, costs)
        return
    check_hybrid(pipelines, batch_size)
    hybrid = simulate_hybrid(problem, pipelines, costs)
    if not hybrid.fits:
        raise PipelineError(f"the pipeline x DDP hybrid does not fit: {'; '.join(hybrid.memory_problems())}; "
                            "expected a cut, M or R that fits")


def _stage_bucket_offsets(problem: PlacementProblem, ops_of_stage: np.ndarray, d: int, sc: StageCosts, s: int,
                          div: float, scale: float, fixed_part: np.ndarray, microbatches: int,
                          sync_b: np.ndarray) -> tuple[list[float], np.ndarray]:
    """(bytes of each bucket, seconds into the stage's backward when it is ready) on device ``d`` (H2);
    ``sync_b`` [N] each op's BatchNorm gather in the backward (H5)."""
    ops = problem.ops
    sel = ops_of_stage[::-1]  # reverse op order: the order the backward produces gradients (D2)
    grad = np.where(ops.requires_grad[sel], ops.param_bytes[sel], 0.0).astype(np.float64)
    groups = buckets(grad.tolist())
    c = ops.cost[sel, d, :]
    # With M > 1 the last micro-batch's backward adds into .grad (P2b of envs.sim.pipeline):
    # each op's adds come right after it, before its gradient is ready for the bucket.
    adds = (ops.accumulate[sel, d, :] if ops.accumulate is not None and microbatches > 1
            else np.zeros((len(sel), 2)))
    if ops.is_cpu[d]:
        per = (shrunk_host(c[:, 2], fixed_part[sel, d, 1], div) + adds[:, 0]) * scale + sync_b[sel]
    else:
        raw = c[:, 2] + adds[:, 0] + c[:, 3] / div + adds[:, 1] + sync_b[sel]
        whole = sc.backward_s(s, microbatches > 1)
        per = raw * (whole / raw.sum()) if raw.sum() > 0 else raw
    done = np.cumsum(per)  # done[j]: the reversed ops 0..j have run
    return [float(grad[g].sum()) for g in groups], np.array([done[max(g)] for g in groups])


def simulate_hybrid(problem: PlacementProblem, pipelines: Sequence[Pipeline], costs: RankCosts | None = None,
                    replica_costs: Sequence[StageCosts] | None = None) -> HybridResult:
    """Simulate one step of ``R = len(pipelines)`` data-parallel pipeline replicas (rules H1-H5
    in the module doc). ``replica_costs``: each replica's stage costs at its share of the
    batch when the caller has them (:func:`envs.sim.stage_costs.fast_stage_costs` with ``share=R``).

    Raises:
        PipelineError: replicas that differ or share devices (:func:`check_hybrid`), or a
            malformed pipeline (:func:`envs.sim.stage_costs.stage_costs`).
    """
    check_hybrid(pipelines)
    r_ = len(pipelines)
    first = pipelines[0]
    s_, m = first.num_stages, first.microbatches
    names = list(problem.device_names)
    per_costs = (list(replica_costs) if replica_costs is not None
                 else [stage_costs(problem, p, costs, share=r_) for p in pipelines])
    ops = problem.ops
    if r_ == 1:  # one replica is the pipeline (H1-H5 reduce to it); the pipeline search's common case
        res = simulate_pipeline(problem, pipelines[0], costs, stage_cost=per_costs[0])
        return HybridResult(tuple(pipelines), res.step_time, [res], [0.0] * s_, dict(res.peak_memory),
                            dict(res.over_memory))
    stage_of = first.stage_of()
    op_stage = np.array([stage_of[problem.node_names[g]] for g in range(problem.num_nodes)],
                        dtype=np.int64)[ops.op_group]
    fixed_part = problem.ops.fixed_parts()
    sync_b = np.zeros(ops.num_ops)
    if m == 1 and _norm_channels(problem).any():  # H5: each stage's BatchNorms over its replicas
        add_f, add_b = np.zeros(s_), np.zeros(s_)
        for s in range(s_):
            devs = [names.index(p.devices[s]) for p in pipelines]
            bw, lat, on_cpu = _ring_link(problem, [(devs[k], devs[(k + 1) % r_]) for k in range(r_)])
            scale = engine_host_costs(problem, devs[0], costs).op_scale if on_cpu else 1.0
            mine = op_stage == s
            f, b = _norm_sync_on(problem, devs[0], r_, scale, fixed_part, _norm_channels(problem), r_, bw, lat,
                                 on_cpu, mine)
            add_f[s], add_b[s] = f.sum(), b.sum()
            sync_b += b
        per_costs = [replace(sc, fwd=sc.fwd + add_f, bwd=sc.bwd + add_b) for sc in per_costs]
    results = [simulate_pipeline(problem, p, costs, stage_cost=sc) for p, sc in zip(pipelines, per_costs)]
    grad_of = np.where(ops.requires_grad, ops.param_bytes, 0.0)
    end_of: dict[str, float] = {}
    peak: dict[str, float] = {}
    exposed: list[float] = []
    div = float(r_ * m)
    for s in range(s_):
        mine = np.nonzero(op_stage == s)[0]
        devs = [names.index(p.devices[s]) for p in pipelines]
        sizes: list[float] = []
        ready = None
        for r, (p, sc, res) in enumerate(zip(pipelines, per_costs, results)):
            d = devs[r]
            hc = engine_host_costs(problem, d, costs)
            scale = hc.op_scale if ops.is_cpu[d] else 1.0
            sizes, offsets = _stage_bucket_offsets(problem, mine, d, sc, s, div, scale, fixed_part, m, sync_b)
            at = res.last_backward[s][0] + hc.stage_bwd_s + offsets
            ready = at if ready is None else np.maximum(ready, at)
        ring = [(devs[k], devs[(k + 1) % r_]) for k in range(r_)]
        bw, lat, on_cpu = _ring_link(problem, ring)
        if on_cpu and ready is not None:  # D3c: the last backward holds the cores until it ends
            ready = np.full_like(ready, max(res.last_backward[s][1] for res in results))
        comm_end = 0.0
        for k, nbytes in enumerate(sizes):
            comm_end = max(comm_end, float(ready[k])) + ring_allreduce_time(nbytes, r_, bw, lat)
        stage_grad = float(grad_of[mine].sum())
        comm_end += reducer_seconds(stage_grad, on_cpu)  # D3d: the stage's DDP copies its gradients
        wait = 0.0
        for p, res in zip(pipelines, results):
            name = p.devices[s]
            before = res.ready_to_step[name]
            wait = max(wait, comm_end - before)
            end_of[name] = max(before, comm_end) + (res.device_end[name] - before)
            peak[name] = res.peak_memory[name] + stage_grad
        exposed.append(max(wait, 0.0))
    over = {n: peak[n] - float(problem.memory_capacity[names.index(n)]) for n in peak
            if peak[n] > float(problem.memory_capacity[names.index(n)])}
    return HybridResult(tuple(pipelines), float(max(end_of.values())), results, exposed, peak, over)


def simulate_pipelined(problem: PlacementProblem, pipeline: Pipeline, costs: RankCosts | None = None) -> HybridResult:
    """One step of a placement's pipeline, replicas included (:attr:`Pipeline.replicas`): what
    optimize, ``placer show`` and the benchmarks all simulate a pipelined placement with."""
    return simulate_hybrid(problem, pipeline.replica_pipelines(), costs)
