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
earliest op whose gradient it holds, on every replica (the slowest one decides). Only
gradients that exist count: a frozen parameter's or a buffer's none, and a sparse embedding's
(``sparse=True``) the rows it looked up (``OpArrays.param_grad_bytes``).

**D2b Sparse gradients.** The reducer gives each sparse gradient a bucket of its own and
all-reduces it as a sparse tensor (``reducer.cpp``: ``expect_sparse_gradient``): a ring of its
bytes, and between CPU processes :data:`CPU_SPARSE_ALLREDUCE_S` more per sparse gradient
(gloo's sparse all-reduce gathers the sizes, indices and values of every rank and sums them).
Measured here (2026-12-07, 2 ranks, ``benchmarks/models/dlrm.py --model-arg sparse=1``, 1,024
lookups a table a replica): DDP measured 6.4, 24.8 and 44.3 ms above the ring-only rule with 2,
8 and 16 tables, 2.8-3.2 ms a table. Between GPUs not measured: the ring alone.

**D3 Ring all-reduce.** Buckets are all-reduced one after another (one communication
stream, in bucket order: the reducer launches them in order, ``reducer.cpp:mark_bucket_ready``),
each as a ring over the replicas' devices: ``2(N-1)/N · bytes / bw + 2(N-1) · lat``
(reduce-scatter then all-gather, ``N - 1`` steps each), ``bw`` the slowest and ``lat`` the
slowest link of the ring ``d0 → d1 → … → d0``. An all-reduce overlaps the rest of the
backward; the optimizer starts when the last one is done (``finalize_backward`` waits for
all buckets before ``backward()`` returns).

**D3c CPU ranks.** Between CPU processes (gloo, one core each) the all-reduces do not
overlap the backward: they start when it ends. gloo's ring sends, receives and sums on the CPU,
on the cores the backward holds, so its speed is the host's, not the link's: each ring step costs
at least :data:`CPU_ALLREDUCE_STEP_S` and the bytes go at most at
:data:`CPU_ALLREDUCE_BYTES_PER_S` (the link's figures where they are worse, as between hosts).
Measured here with ``benchmarks/bench_cpu_allreduce.py`` (2026-12-07 12:20-12:45 UTC, three runs,
two 1-thread processes on loopback): 17 KB to 34 MB all-reduced in 0.25-0.35 ms to 29-30 ms,
0.87 ms per MB (1.15 GB/s) above 0.3 ms, while the same day's ping-pong measured 5.46 GB/s. The
rule this replaces took 0.47 of the ping-pong bandwidth (fitted on 2026-12-05, when the ping-pong
gave 2.0 GB/s and 25-100 MB went at 0.75-1.04 GB/s): the ping-pong moved 2.7x between days, the
all-reduce did not, and small DDP steps were simulated 1.4-1.7x short (4-layer Linear stacks of
17 KB to 17 MB, ``placer optimize --devices cpu:0,cpu:1``: measured 1.51-36.0 ms, simulated
0.997-22.2). Earlier figures: a 44 MB all-reduce between two idle 1-thread processes took
57-60 ms and 28 ms of CPU on each; gpt2's DDP step (batch 256 over 2 ranks) was 2416 ms against
2360 ms of profiled compute per replica, the all-reduce's time exposed whole; a world-size-1 DDP
step of ResNet-50 on half the batch cost 40-46 ms more CPU than the plain step (the reducer's
copies into and out of its 102 MB of buckets, its hooks), which rule D3d charges.

**D3e DDP beside another replica on CPU processes.** Beyond D1's compute, the all-reduces and
D3d's copies, a DDP step between two CPU processes measured :data:`CPU_DDP_STEP_S` more than the
plain step (the median, over stacks of 17 KB to 4 MB, of DDP's extra less those rules' share; its
wrapper's forward, the reducer's per-step preparation and hooks, the bucket views, beside the
other replica's process). Above a few MB the measured extra grows by about 0.2 ns per gradient
byte more than the rules charge (forward and update slowed beside the other process's copies):
not charged, so a DDP step of tens of MB of gradients is simulated up to ~15% short. Not charged
on GPUs. Checked with ``placer optimize`` over ``cpu:0,cpu:1`` on the 4-layer stacks (widths 32
to 1024, batch 16; the link measured afresh each run): DDP simulated at 0.60-0.69 of its measured
step before D3c's host limit and this rule, at 0.76-1.12 after them (the 0.76 the 17 MB stack;
``benchmarks/results/pipeline.md``, "DDP between CPU processes").

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

Pipelines replicated over devices (pipeline x DDP hybrids, rules H1-H5) are simulated in
:mod:`envs.sim.hybrid`, over these rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.memory_report import DeviceMemoryFit
from envs.sim.memory_rules import step_temporaries
from envs.sim.pipeline import engine_host_costs
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.rank_costs import RankCosts
from envs.sim.stage_costs import shrunk_host

__all__ = ["FIRST_BUCKET_BYTES", "BUCKET_BYTES", "CPU_ALLREDUCE_STEP_S", "CPU_ALLREDUCE_BYTES_PER_S",
           "CPU_DDP_STEP_S", "CPU_REDUCER_SECONDS_PER_BYTE", "replica_host_seconds",
           "CPU_GATHER_IN_STEP_S", "DataParallelResult", "buckets", "norm_sync_seconds", "norm_channels",
           "ring_link", "norm_sync_on", "reducer_seconds", "data_parallel_pipeline", "ring_allreduce_time",
           "simulate_data_parallel"]

#: ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``.
FIRST_BUCKET_BYTES = 1024 * 1024
#: ``_DEFAULT_BUCKET_CAP_MB * _MB_TO_BYTES`` of ``nn/parallel/distributed.py``.
BUCKET_BYTES = 25 * 1024 * 1024
#: The least a ring step of gloo's all-reduce takes between CPU processes (D3c): at 2 ranks,
#: 2 steps, 17 KB all-reduced in 0.25-0.35 ms (``benchmarks/bench_cpu_allreduce.py``).
CPU_ALLREDUCE_STEP_S = 0.15e-3
#: The most bytes per second gloo's ring all-reduce moves between CPU processes (D3c): it
#: sends, receives and sums on the CPU; 0.87 ms per MB above the fixed part, 1 to 34 MB
#: (``benchmarks/bench_cpu_allreduce.py``, 2026-12-07; 0.75-1.04 GB/s on 25-100 MB, 2026-12-05).
CPU_ALLREDUCE_BYTES_PER_S = 1.15e9
#: A DDP step between CPU processes beyond its compute, all-reduces and copies (D3e): on a 4-layer
#: Linear stack of 17 KB of gradients, where nothing else is left, DDP's extra over the plain step
#: less the all-reduce measured beside it was 0.30, 0.36, 0.63 and 0.96 ms in four runs of
#: ``benchmarks/bench_cpu_allreduce.py`` (2026-12-07); about their median. (0.8 ms, the median over
#: the stacks up to 4 MB, over-predicted the 17 KB stack's measured DDP step by 36%.)
CPU_DDP_STEP_S = 0.5e-3
#: The DDP reducer's copies into and out of its buckets on a CPU process, seconds per gradient
#: byte (D3d): world-size-1 DDP against the plain step on Linear stacks of 67-269 MB, 1 thread,
#: 2026-12-06 (0.30-0.35 ns per byte, linear in the bytes; ``benchmarks/bench_ddp_reducer.py``).
CPU_REDUCER_SECONDS_PER_BYTE = 0.31e-9
#: Seconds each sparse gradient's all-reduce takes between CPU processes beyond a ring of its
#: bytes (D2b): DDP of a DLRM with 2, 8 and 16 sparse tables over 2 ranks measured 6.4, 24.8 and
#: 44.3 ms above that rule (2026-12-07); the least-squares slope through them.
CPU_SPARSE_ALLREDUCE_S = 2.84e-3
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
class DataParallelResult(DeviceMemoryFit):
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

    def describe(self) -> str:
        """One line: the step time, or why it does not fit."""
        if not self.fits:
            worst = max(self.over_memory, key=self.over_memory.get)
            return (f"DDP x{len(self.replicas)}: does not fit ({worst} needs "
                    f"{self.peak_memory[worst] / 2**30:.2f} GiB for one replica)")
        return f"DDP x{len(self.replicas)}: {self.step_time * 1e3:.2f} ms per step"


def sparse_allreduce_seconds(problem: PlacementProblem, ops: np.ndarray, on_cpu: bool) -> float:
    """D2b: the extra seconds the sparse gradients of ``ops`` (op indices) take to all-reduce."""
    flags = problem.ops.sparse_grad
    if not on_cpu or flags is None or not len(ops):
        return 0.0
    return CPU_SPARSE_ALLREDUCE_S * float(np.count_nonzero(flags[ops] & problem.ops.requires_grad[ops]))


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
    first device, one micro-batch, a replica on each other device. :func:`envs.sim.hybrid.simulate_pipelined`
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


def replica_host_seconds(on_cpu: bool, replicas: int) -> float:
    """What a DDP step costs a CPU replica beside another one beyond its compute, all-reduces and
    copies (D3e): :data:`CPU_DDP_STEP_S`; nothing on GPUs or alone.

    >>> replica_host_seconds(True, 2) * 1e3, replica_host_seconds(False, 2), replica_host_seconds(True, 1)
    (0.5, 0.0, 0.0)
    """
    return CPU_DDP_STEP_S if on_cpu and replicas > 1 else 0.0


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


def norm_channels(problem: PlacementProblem) -> np.ndarray:
    """``OpArrays.norm_channels``, zeros where the problem has none."""
    ops = problem.ops
    return ops.norm_channels if ops.norm_channels is not None else np.zeros(ops.num_ops)


def ring_link(problem: PlacementProblem, ring: Sequence[tuple[int, int]]) -> tuple[float, float, bool]:
    """(bandwidth, latency, every device a CPU) of a ring's slowest links (D3); between CPU
    processes no faster than gloo's ring runs on the host (D3c)."""
    bw = min((float(problem.bandwidth[a, b]) for a, b in ring), default=np.inf)
    lat = max((float(problem.latency[a, b]) for a, b in ring), default=0.0)
    on_cpu = bool(ring) and all(bool(problem.ops.is_cpu[a]) for a, _ in ring)
    if on_cpu:
        return min(bw, CPU_ALLREDUCE_BYTES_PER_S), max(lat, CPU_ALLREDUCE_STEP_S), on_cpu
    return bw, lat, on_cpu


def _cpu_op_seconds(problem: PlacementProblem, d: int, share: float, scale: float,
                    fixed_part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] forward and [N] backward seconds of each op on CPU device ``d`` at ``1/share`` of the
    batch (P2's fixed part kept), times the engine's ``op_scale``."""
    c = problem.ops.cost[:, d, :]
    return (shrunk_host(c[:, 0], fixed_part[:, d, 0], share) * scale,
            shrunk_host(c[:, 2], fixed_part[:, d, 1], share) * scale)


def norm_sync_on(problem: PlacementProblem, d: int, share: float, scale: float, fixed_part: np.ndarray,
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
    grad_bytes = np.where(ops.requires_grad, ops.param_grad_bytes(), 0.0)[::-1]  # reverse parameter order (D2)
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
    bw, lat, on_cpu = ring_link(problem, ring)
    channels = norm_channels(problem)
    for d in idx:
        hc = engine_host_costs(problem, d, costs)
        scale = hc.op_scale if ops.is_cpu[d] else 1.0
        sync_f, sync_b = norm_sync_on(problem, d, n, scale, fixed_part, channels, n, bw, lat, on_cpu)  # D5
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
        has_params = bool(ops.trained_bytes().sum() > 0)
        opt_max = max(opt_max, opt + (float(ops.host.step_s) if has_params else 0.0))
        tail = max(tail, hc.step_s)
    if on_cpu:
        ready[:] = back_end  # D3c: the backward holds the cores until it ends
    comm_end = 0.0
    for k, nbytes in enumerate(bucket_bytes):
        comm_end = max(comm_end, ready[k]) + ring_allreduce_time(nbytes, n, bw, lat)
    comm_end += sparse_allreduce_seconds(problem, np.arange(num), on_cpu) if n > 1 else 0.0  # D2b
    reducer = reducer_seconds(float(grad_bytes.sum()), on_cpu) + replica_host_seconds(on_cpu, n)  # D3d, D3e
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
