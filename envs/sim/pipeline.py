"""Pipelined placements: stages, micro-batches and a schedule, as data and simulated.

A :class:`Pipeline` cuts the placement graph into stages that are contiguous in a
topological order (no edge goes from a later stage to an earlier one), puts each stage on
one device (one process per device at run time), splits the batch into ``M`` micro-batches
and names the schedule that orders their forwards and backwards: ``"gpipe"``, ``"1f1b"``
(one stage per device) or ``"interleaved_1f1b"`` (stage ``s`` on device ``s mod P``, more
than one stage per device), the three schedules of ``torch.distributed.pipelining``.

Rules of :func:`simulate_pipeline`, each with the PyTorch behaviour behind it (paths are
in the installed torch 2.13, ``torch/distributed/pipelining/``):

**P1 Action order.** Each device runs its actions (forward or full backward of one
micro-batch of one of its stages) in exactly the order of :func:`action_order`, which
rebuilds the schedule's order: GPipe all forwards then all backwards
(``schedules.py:ScheduleGPipe._step_microbatches``); 1F1B ``min(M, S - s)`` warm-up
forwards, then alternately one backward and one forward, then the remaining backwards
(``Schedule1F1B._step_microbatches``: ``warmup_chunks``); interleaved 1F1B the order of
``ScheduleInterleaved1F1B._calculate_single_rank_operations`` (``_get_warmup_ops`` with
``multiply_factor=2``, ``_get_1f1b_rank_ops``; the ``None`` padding is dropped, it only
aligns the ranks' lists). An action starts when its device is free and its inputs are
there: a forward of stage ``s > 0`` needs the micro-batch's activations from ``s - 1``; a
backward needs the stage's own forward and, but on the last stage, the gradient from
``s + 1``; the last stage computes the loss of a micro-batch right after its forward
(``_maybe_compute_loss``).

**P2 Micro-batch cost.** An op's cost on a micro-batch is its fixed part plus its
batch-proportional part divided by ``M``, from the simulator's cost arrays
(``problem.ops.cost``, :meth:`envs.sim.cost_model.CostModel.op_cost`): on a GPU the host
part (the kernel launches) is fixed and the device part proportional; on a CPU the op runs
on the host, and its fixed part (:meth:`envs.sim.problem.OpArrays.fixed_parts`) is
*measured* when the model was also profiled on a micro-batch
(:mod:`graphs.profile.batch_scaling`: ``fixed + per_sample * b`` through the profiles at
the batch and at 1/8 of it, per op, stored in the graph and compiled into the problem by
:meth:`~envs.sim.cost_model.CostModel.op_fixed`; ``placer optimize --devices cpu:0,cpu:1``
takes that profile), else its per-op dispatch (:data:`CPU_DISPATCH_S`, the 2.1-2.7 us per
fx node measured for :class:`~envs.sim.cost_model.HostOverheads`). The measurement won: with the dispatch alone the simulator put resnet50's 2-stage pipeline
(batch 32, M=4) at 583 ms and its stages equal, while it ran 1031 ms with 0.50 and 0.92 CPU
s per rank; profiled at the micro-batch size it predicts 986 ms and 0.56 + 0.89 s (the late
stages' convolutions on 2x2 maps cost 1.5x per sample at batch 8: per-call work that does
not shrink), and gpt2's (batch 256, M=16) 2888 ms against 2874 measured, where the dispatch
rule gave 2736 (2309 with the op scale 0.86 of P4 before; benchmarks/results/pipeline.md,
"Calibrated"). A stage call on a GPU lasts
``max(host, device)`` (the host issues ahead of the stream); on a CPU the sum. The optimizer
update is not scaled: it runs once per step on the accumulated gradients
(``perform_reduce_grad`` then the user's ``optimizer.step()``).

**P2b Gradient accumulation.** Each stage's first backward of a step stores its gradients
as ``.grad`` (after ``zero_grad(set_to_none=True)``: ``AccumulateGrad`` steals them); the
other ``M - 1`` add into ``.grad`` in place (``stage.py``: ``backward_one_chunk`` runs
``stage_backward`` -> ``torch.autograd.backward`` per micro-batch). The op profiles hold no
such add, so those backwards cost more (``StageCosts.bwd_acc``; :mod:`envs.sim.grad_accumulation`:
measured per model on a CPU, the adds' roofline on a GPU). Measured here, a 2-stage ResNet-50
pipeline (M=4, benchmarks/results/pipeline.md): its second stage's backwards after the first
took 25% more CPU than its first.

**P3 Transfers.** ``PipelineStage`` sends a stage's outputs to stage ``s + 1`` only
(``stage.py``: ``stage_index + 1`` in ``get_fwd_send_ops``), so a value read by a later
stage is relayed through every stage in between: boundary ``b`` carries every value
produced at or before stage ``b`` and read after it, each once. A micro-batch carries
``bytes / M`` over the link of the two stages' devices in ``latency + bytes / bandwidth``;
the gradient of the values that require grad goes back the same way after the backward.
Each direction of a boundary is one FIFO channel (gloo's one connection per pair). A
device waits for its last sends before it steps (``_wait_batch_p2p(send_work)``).

**P4 Host constants.** On CPU devices every stage call, send, receive and loss and the
step cost what the measured multi-process runtime costs (:data:`ENGINE_COSTS`: the
per-call constants of :class:`envs.sim.ranks.RankCosts`, calibrated there on the
point-to-point runtime); on GPUs the single-process host overheads of the op-level
simulator (:func:`engine_host_costs`: every backward is one ``torch.autograd.backward`` call,
``backward_call_s``, the last stage's loss ``loss_s``), so that one stage on one GPU costs
what the op-level simulator gives that placement when the host leads. ``op_scale`` multiplies the op
times: 1.0 for this engine (measured: its ranks' CPU seconds are 0.96-0.98x the profiled
op costs at the micro-batch size, summed over the ranks), not the point-to-point runtime's 0.86, which put
gpt2's pipeline and DDP 11-20% under their measured steps.

**P5 Step and memory.** The step ends when the last device has stepped its optimizer
(its ops' update time plus the problem's fixed host cost, once per device that holds
parameters). Peak memory per device: its stages' parameters, gradients and optimizer
state (``problem.static_memory``), plus for each micro-batch in flight ``1/M`` of the
stage's kept activations (in flight = forwards done minus backwards done, walked along the
action order: GPipe all ``M``; 1F1B at most the number of stages from ``s`` to the last),
plus the receive buffers ``PipelineStage`` allocates at its first step for every
micro-batch and keeps (``stage.py``: the activation buffers of ``_prepare_forward_infra``
and the gradient buffers of ``_prepare_backward_infra``, one per micro-batch): ``M``
micro-batches of its incoming boundary and of its outgoing boundary's gradients, plus the
backward's working set of its largest gradient (the op-level simulator's rule, measured on
the CPU allocator, ``results/memory.md``), an output's gradient at ``1/M`` size, a shared
parameter's whole; with one stage and ``M = 1`` the peak is the op-level simulator's.
Two rules measured on real two-process pipelines (``torch.profiler`` memory events of each
rank, 2026-12-05 21:13-21:31 UTC; ``results/memory.md``): **P5a** with ``M >= 2`` every
backward after the first allocates each weight's gradient afresh beside its ``.grad`` before
``AccumulateGrad`` adds it in (P2b), a convolution a same-size temporary too (ResNet-50's
stage: +9 + 9 MiB for a 512x512x3x3 weight, where the rule gave 0.25), so the working set is
at least :data:`~envs.sim.problem.BACKWARD_WORK_FACTOR` x the stage's largest op's parameter
bytes; **P5b** ``PipelineStage`` keeps a stage's sent outputs until that micro-batch's backward
(``fwd_cache``), and ``StageModule`` sends ``.contiguous()`` copies of views, so each value
crossing the stage's outgoing cut adds its bytes that autograd does not save already
(``out_bytes - act_bytes``) per micro-batch in flight (GPT-2's MLP output sent to the next
stage's residual add: +0.25 MiB per micro-batch at M=8); a value relayed through the stage is
counted too, which over-counts (its receive buffer already holds it). **P5c** a parameter
read on a device other than its owner's (a tied embedding's head on the last stage, an
unrolled cell's later steps) is held there as a copy with its own ``.grad`` and optimizer
state (the runtime all-reduces the copies' gradients: ``tied_holders``), once per device
(GPT-2's tied ``wte`` on the head's rank: +2 MiB with AdamW, measured). **P5d** every
process of a job with several holds the whole input batch (the job file ships it to every
rank, and a stage's micro-batches are views of it), so each device of a pipeline over
several adds the model's input bytes once (ResNet-50's first stage under 1F1B: 0.75 MiB
under without it, measured). **P5e** the optimizer step runs after the last backward freed
the kept activations; a device's peak is then its static memory, its receive buffers (kept),
the batch and output the training loop holds, and the temporaries of its largest parameters' update
(:data:`~envs.sim.optimizer_state.OPTIMIZER_STEP_WORK`, measured on the CPU allocator:
Adam 4x the parameter; on a GPU the foreach default's, ``OPTIMIZER_FOREACH_WORK`` x all of its
parameters), when that is larger (the op-level simulators' rule).

With ``M = 1`` and one stage per device the step is the un-pipelined step of the same
placement over one process per device (:mod:`envs.sim.ranks`; tested equal with the
host constants at zero, where both reduce to op times and transfers).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from envs.sim.cost_model import CPU_DISPATCH_S
from envs.sim.problem import (
    BACKWARD_WORK_FACTOR,
    PlacementProblem,
    cached_per_problem,
    memory_problem_lines,
    step_temporaries,
)
from envs.sim.ranks import ZERO_COSTS, RankCosts
from graphs.errors import PlacerError

__all__ = [
    "SCHEDULES",
    "CPU_DISPATCH_S",
    "ENGINE_COSTS",
    "engine_host_costs",
    "shrunk_host",
    "PipelineError",
    "Pipeline",
    "Action",
    "action_order",
    "StageCosts",
    "stage_costs",
    "PipelineResult",
    "simulate_pipeline",
    "check_pipeline",
    "pipeline_orders",
    "contiguous_pipeline",
    "stage_nodes_of",
    "PipelineTables",
    "pipeline_tables",
    "fast_stage_costs",
    "group_pipeline",
]

#: The schedule names a pipeline may carry (``torch.distributed.pipelining`` classes
#: ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``).
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

#: The host constants of a CPU process running ``torch.distributed.pipelining`` or DDP (P4).
#: ``op_scale`` 1.0, not :class:`RankCosts`' 0.86 (fitted on the point-to-point runtime's small
#: models): the ranks' CPU seconds per step measured through this engine were 0.96x and 0.98x
#: (0.88-1.04x per rank) the profiled op costs at the micro-batch size (gpt2 width 384 batch
#: 256 M=16 and resnet50 batch 32 M=4, 2026-12-05, benchmarks/results/pipeline.md,
#: "Calibrated"). The per-call constants are :class:`RankCosts`' (measured on the
#: point-to-point runtime, 0.6 ms per micro-batch and rank); through the engine a
#: micro-batch's calls, sends, receives and loss cost 0.75-1.0 ms of CPU per rank on a 5-op
#: chain at load 3.7 (same section), under 1% of the zoo cases' steps: not refitted.
#: No cold slowdown after a sleep (``cold_factor`` 0: :func:`simulate_pipeline` does not apply rule
#: R3b of :mod:`envs.sim.ranks`). Applied to this engine's actions (an action that waited for its
#: input runs its next 20 ms of op time 1.19x slower), it moved the calibrated predictions of the
#: measured gpt2 and resnet50 pipelines by 0.3% and 0.8% (benchmarks/results/pipeline.md, 11:46).
ENGINE_COSTS = replace(RankCosts(), op_scale=1.0, cold_factor=0.0)


def shrunk_host(host: np.ndarray, fixed: np.ndarray, m: float) -> np.ndarray:
    """Host seconds of CPU ops on ``1/m`` of the batch (P2): the fixed part, plus the rest
    divided by ``m``.

    >>> float(shrunk_host(np.array(10.0), np.array(2.0), 4))
    4.0
    """
    return fixed + (host - fixed) / m


class PipelineError(PlacerError, ValueError):
    """A pipeline that is malformed or does not fit the model, the batch or the devices."""


@dataclass(frozen=True)
class Pipeline:
    """Stages (node names, in stage order), the device of each, micro-batches and schedule.

    Attributes:
        stages: the placement nodes of each stage, stage 0 first.
        devices: the device name of each stage.
        microbatches: ``M``, the number of micro-batches the batch is split into.
        schedule: one of :data:`SCHEDULES`.
        replicas: the stage devices of each further data-parallel replica (empty: one
            replica). ``R = 1 + len(replicas)`` copies of the pipeline each take ``1/R`` of
            the batch, gradients all-reduced per stage
            (:func:`envs.sim.data_parallel.simulate_hybrid`); :meth:`assignment` and
            ``devices`` are replica 0's.
    """

    stages: tuple[tuple[str, ...], ...]
    devices: tuple[str, ...]
    microbatches: int
    schedule: str = "1f1b"
    replicas: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(str(n) for n in s) for s in self.stages))
        object.__setattr__(self, "devices", tuple(str(d) for d in self.devices))
        object.__setattr__(self, "replicas", tuple(tuple(str(d) for d in r) for r in self.replicas))
        if self.replicas:
            if self.schedule == "interleaved_1f1b":
                raise PipelineError("replicated pipelines run gpipe or 1f1b; expected one stage per device")
            wrong = [i + 1 for i, r in enumerate(self.replicas) if len(r) != len(self.stages)]
            if wrong:
                raise PipelineError(f"replica(s) {wrong} name a number of devices other than the {len(self.stages)} "
                                    "stages; expected one device per stage in every replica")
            used = [*self.devices, *(d for r in self.replicas for d in r)]
            if len(set(used)) != len(used):
                raise PipelineError(f"the replicas share devices ({used}); expected each device in one replica")
        if self.schedule not in SCHEDULES:
            raise PipelineError(f"unknown pipeline schedule {self.schedule!r}; expected one of {list(SCHEDULES)}")
        m = self.microbatches
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise PipelineError(f"micro-batches must be an integer >= 1, got {m!r}")
        object.__setattr__(self, "microbatches", int(m))
        if not self.stages:
            raise PipelineError("a pipeline needs at least one stage")
        if len(self.devices) != len(self.stages):
            raise PipelineError(f"a pipeline of {len(self.stages)} stage(s) names {len(self.devices)} device(s); "
                                "expected one device per stage")
        empty = [i for i, s in enumerate(self.stages) if not s]
        if empty:
            raise PipelineError(f"stage(s) {empty} hold no node; expected every stage to hold at least one")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.stages):
            for n in s:
                if n in seen:
                    raise PipelineError(f"node {n!r} is in stage {seen[n]} and stage {i}; expected one stage per node")
                seen[n] = i
        ranks = self.ranks
        if self.schedule == "interleaved_1f1b":
            p = len(ranks)
            if len(self.stages) % p or len(self.stages) == p:
                raise PipelineError(f"interleaved_1f1b needs the same number (> 1) of stages on each of its {p} "
                                    f"device(s); got {len(self.stages)} stages")
            for s, d in enumerate(self.devices):
                if d != ranks[s % p]:
                    raise PipelineError(f"interleaved_1f1b puts stage {s} on device {ranks[s % p]!r} (stage s on "
                                        f"device s mod {p}, as ScheduleInterleaved1F1B does); it is on {d!r}")
            rounds = max(1, self.microbatches // p)
            if self.microbatches % rounds:
                raise PipelineError(f"interleaved_1f1b needs micro-batches a multiple of {rounds} rounds "
                                    f"(ScheduleInterleaved1F1B); got {self.microbatches}")
        elif len(ranks) != len(self.stages):
            raise PipelineError(f"{self.schedule} runs one stage per device; devices {list(self.devices)} repeat "
                                "(use interleaved_1f1b for several stages per device)")
        if self.schedule == "1f1b" and self.microbatches < len(self.stages):
            raise PipelineError(f"1f1b needs at least as many micro-batches as stages (Schedule1F1B); got "
                                f"{self.microbatches} for {len(self.stages)} stages (use gpipe, or M >= "
                                f"{len(self.stages)})")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ranks(self) -> tuple[str, ...]:
        """The distinct devices in order of their first stage (rank r runs stages r, r + P, ...)."""
        return tuple(dict.fromkeys(self.devices))

    def stage_of(self) -> dict[str, int]:
        """``{node: stage}``."""
        return {n: i for i, s in enumerate(self.stages) for n in s}

    def assignment(self) -> dict[str, str]:
        """``{node: device}`` of the pipeline's nodes."""
        return {n: self.devices[i] for i, s in enumerate(self.stages) for n in s}

    @property
    def num_replicas(self) -> int:
        return 1 + len(self.replicas)

    @property
    def replica_devices(self) -> tuple[tuple[str, ...], ...]:
        """The stage devices of every replica, replica 0 (``devices``) first."""
        return (self.devices, *self.replicas)

    @property
    def rank_devices(self) -> tuple[str, ...]:
        """The device of every process of the job, in global rank order: replica ``r``'s
        pipeline rank ``l`` is rank ``r * P + l`` (replicas share no device).

        >>> Pipeline((("a",), ("b",)), ("cpu:0", "cpu:1"), 2, "1f1b", replicas=(("cpu:2", "cpu:3"),)).rank_devices
        ('cpu:0', 'cpu:1', 'cpu:2', 'cpu:3')
        """
        return tuple(dict.fromkeys(d for devs in self.replica_devices for d in devs))

    @property
    def is_data_parallel(self) -> bool:
        """One stage, one micro-batch, replicas: DDP itself."""
        return self.num_stages == 1 and self.microbatches == 1 and bool(self.replicas)

    def describe(self) -> str:
        """``"pipelined (2 stages x 2 replicas, 1f1b, M=4)"``; one stage, one micro-batch and
        replicas is DDP: ``"data parallel (DDP over 4 replicas)"``."""
        if self.is_data_parallel:
            return f"data parallel (DDP over {self.num_replicas} replicas)"
        replicas = f" x {self.num_replicas} replicas" if self.replicas else ""
        return f"pipelined ({self.num_stages} stages{replicas}, {self.schedule}, M={self.microbatches})"

    def replica_pipelines(self) -> tuple[Pipeline, ...]:
        """Each replica as a pipeline of its own (no replicas), replica 0 first."""
        return tuple(Pipeline(self.stages, devs, self.microbatches, self.schedule) for devs in self.replica_devices)

    def check_batch(self, batch_size: int) -> None:
        """Raise :class:`PipelineError` unless ``R * M`` divides ``batch_size`` (equal micro-batches:
        ``torch.tensor_split`` in ``microbatch.py`` would make them unequal)."""
        parts = self.microbatches * self.num_replicas
        if batch_size % parts:
            what = (f"{self.microbatches} micro-batches" if self.num_replicas == 1 else
                    f"{self.num_replicas} replicas x {self.microbatches} micro-batches")
            raise PipelineError(f"{what} do not divide the batch of {batch_size}; expected a divisor of {batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in placement files."""
        return {"stages": [list(s) for s in self.stages], "devices": list(self.devices),
                "microbatches": self.microbatches, "schedule": self.schedule,
                **({"replicas": [list(r) for r in self.replicas]} if self.replicas else {})}

    @classmethod
    def from_dict(cls, doc: Any) -> Pipeline:
        """Read :meth:`to_dict`'s form; :class:`PipelineError` naming what is wrong."""
        if not isinstance(doc, dict):
            raise PipelineError(f"pipeline must be an object, got {type(doc).__name__}")
        missing = [k for k in ("stages", "devices", "microbatches", "schedule") if k not in doc]
        if missing:
            raise PipelineError(f"pipeline lacks the field(s) {missing}")
        stages, devices = doc["stages"], doc["devices"]
        if not isinstance(stages, list) or not all(isinstance(s, list) and all(isinstance(n, str) for n in s)
                                                   for s in stages):
            raise PipelineError("pipeline stages must be a list of lists of node names")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise PipelineError("pipeline devices must be a list of device names")
        replicas = doc.get("replicas", [])
        if not isinstance(replicas, list) or not all(isinstance(r, list) and all(isinstance(d, str) for d in r)
                                                     for r in replicas):
            raise PipelineError("pipeline replicas must be a list of lists of device names")
        return cls(tuple(tuple(s) for s in stages), tuple(devices), doc["microbatches"], doc["schedule"],
                   tuple(tuple(r) for r in replicas))


@dataclass(frozen=True)
class Action:
    """One entry of a device's schedule: ``kind`` "F" or "B" of micro-batch ``mb`` of ``stage``."""

    stage: int
    kind: str
    mb: int


def _interleaved_rank_ops(rank: int, n_local: int, p: int, m: int) -> list[Action]:
    # ScheduleInterleaved1F1B._calculate_single_rank_operations + _get_1f1b_rank_ops (no zero bubble).
    rounds = max(1, m // p)
    per_round = m // rounds
    warmup = min((n_local - 1) * per_round + 2 * (p - 1 - rank), m * n_local)
    total_mb_ops = n_local * m
    fwd_bwd = total_mb_ops - warmup
    cooldown = total_mb_ops - fwd_bwd

    def fwd_stage(step: int) -> int:
        return ((step // per_round) % n_local) * p + rank

    def bwd_stage(step: int) -> int:
        return (n_local - 1 - ((step - warmup) // per_round) % n_local) * p + rank

    f_mb: dict[int, int] = {}
    b_mb: dict[int, int] = {}
    out: list[Action] = []
    for op in range(warmup + fwd_bwd + cooldown):
        if op < warmup or op < warmup + fwd_bwd:
            s = fwd_stage(op)
            out.append(Action(s, "F", f_mb.get(s, 0)))
            f_mb[s] = f_mb.get(s, 0) + 1
        if op >= warmup:
            s = bwd_stage(op)
            out.append(Action(s, "B", b_mb.get(s, 0)))
            b_mb[s] = b_mb.get(s, 0) + 1
    return out


def action_order(schedule: str, num_stages: int, microbatches: int) -> list[list[Action]]:
    """Per device (rank), the order in which it runs its micro-batch forwards and backwards
    under ``schedule`` (module doc, P1). Rank ``r`` holds stages ``r, r + P, ...``."""
    if schedule not in SCHEDULES:
        raise PipelineError(f"unknown pipeline schedule {schedule!r}; expected one of {list(SCHEDULES)}")
    s_, m = num_stages, microbatches
    if schedule == "gpipe":
        return [[Action(s, "F", i) for i in range(m)] + [Action(s, "B", i) for i in range(m)] for s in range(s_)]
    if schedule == "1f1b":
        orders = []
        for s in range(s_):
            warm = min(m, s_ - s)  # Schedule1F1B: warmup_chunks = min(n_microbatches, num_stages - stage_index)
            acts = [Action(s, "F", i) for i in range(warm)]
            f = warm
            for b in range(m):
                acts.append(Action(s, "B", b))
                if f < m:
                    acts.append(Action(s, "F", f))
                    f += 1
            orders.append(acts)
        return orders
    raise PipelineError("interleaved_1f1b needs the number of devices: use Pipeline orders (pipeline_orders)")


def pipeline_orders(pipeline: Pipeline) -> list[list[Action]]:
    """Per rank of ``pipeline`` (``pipeline.ranks`` order), its action order (module doc, P1)."""
    return [list(o) for o in _orders(pipeline.schedule, pipeline.num_stages, pipeline.microbatches,
                                      len(pipeline.ranks))]


@functools.lru_cache(maxsize=1024)
def _orders(schedule: str, num_stages: int, microbatches: int, num_ranks: int) -> tuple[tuple[Action, ...], ...]:
    """:func:`pipeline_orders` of every pipeline with this shape, built once: the order depends on
    nothing else, and the pipeline search simulates thousands of cuts of a few shapes (building
    the orders was a fifth of :func:`simulate_pipeline`'s time). Tuples: the cached orders are
    shared, so nobody may change them."""
    if schedule != "interleaved_1f1b":
        return tuple(tuple(o) for o in action_order(schedule, num_stages, microbatches))
    p = num_ranks
    return tuple(tuple(_interleaved_rank_ops(r, num_stages // p, p, microbatches)) for r in range(p))


@dataclass(frozen=True)
class StageCosts:
    """Per stage, the seconds and bytes of one micro-batch (module doc, P2-P3).

    Attributes:
        fwd, bwd: [S] seconds of one micro-batch's forward / backward of each stage.
        opt: [S] seconds of the optimizer update of each stage's parameters.
        has_params: [S] bool.
        static: [S] bytes the stage pins for the step (params, grads, optimizer state).
        act: [S] kept activation bytes of one micro-batch.
        fwd_bytes, bwd_bytes: [S-1] bytes over boundary b (stage b to b+1) per micro-batch,
            forward (activations) and backward (gradients).
        device: [S] device index of each stage.
        work: [S] the backward working set of one micro-batch (P5): the largest of the
            stage's ops' ``max(output gradient / M, shared parameter gradient)``, times
            :data:`~envs.sim.problem.BACKWARD_WORK_FACTOR`.
        bwd_acc: [S] seconds of one micro-batch's backward that adds into ``.grad`` (every
            backward of the stage but its first of the step, P2b); ``bwd`` where None.
        step_work: [S] the optimizer step's temporaries of the stage's largest parameters
            (P5e); none where None.
        foreach: [S] the foreach implementation's temporaries of the stage's parameters
            (P5e, summed over the device's stages on a GPU); none where None.
        held: [S] the model output (and, in one process, the batch) the training loop holds
            at the step (P5e, ``OpArrays.loop_held``; a job of several processes counts the
            batch by P5d); none where None.
    """

    fwd: np.ndarray
    bwd: np.ndarray
    opt: np.ndarray
    has_params: np.ndarray
    static: np.ndarray
    act: np.ndarray
    fwd_bytes: np.ndarray
    bwd_bytes: np.ndarray
    device: np.ndarray
    work: np.ndarray
    bwd_acc: np.ndarray | None = None
    step_work: np.ndarray | None = None
    held: np.ndarray | None = None
    foreach: np.ndarray | None = None

    def backward_s(self, stage: int, accumulates: bool) -> float:
        """Seconds of one micro-batch's backward of ``stage``: ``bwd_acc`` when it adds into
        ``.grad`` (not the stage's first backward of the step, P2b), else ``bwd``."""
        if accumulates and self.bwd_acc is not None:
            return float(self.bwd_acc[stage])
        return float(self.bwd[stage])


def _phase_seconds(host: np.ndarray, dev: np.ndarray, fixed: np.ndarray, is_cpu: bool, m: int, scale: float,
                   add_host: float = 0.0, add_dev: float = 0.0) -> float:
    """Seconds of one phase of ops (their ``host``/``dev`` columns [K]) on one device for a
    micro-batch of 1/m, ``fixed`` [K] the host seconds that do not shrink (P2), plus
    ``add_host``/``add_dev`` seconds that do not shrink either (P2b's adds into ``.grad``)."""
    if is_cpu:
        return (float(shrunk_host(host, fixed, m).sum()) + add_host) * scale
    return max(float(host.sum()) + add_host, float(dev.sum()) / m + add_dev) * scale


def _stage_index(problem: PlacementProblem, pipeline: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """(stage of each group, device index of each stage); PipelineError on a bad cover or device."""
    names = set(problem.node_names)
    unknown = sorted(n for s in pipeline.stages for n in s if n not in names)
    if unknown:
        raise PipelineError(f"the pipeline names {len(unknown)} node(s) the model does not have, e.g. {unknown[:3]}")
    stage_of = pipeline.stage_of()
    missing = [n for n in problem.node_names if n not in stage_of]
    if missing:
        raise PipelineError(f"the pipeline's stages miss {len(missing)} node(s) of the model, e.g. {missing[:3]}")
    dev_index = {d: i for i, d in enumerate(problem.device_names)}
    bad = sorted({d for d in pipeline.devices if d not in dev_index})
    if bad:
        raise PipelineError(f"the pipeline uses device(s) {bad}, which are not in the cluster {list(problem.device_names)}")
    return (np.array([stage_of[n] for n in problem.node_names], dtype=np.int64),
            np.array([dev_index[d] for d in pipeline.devices], dtype=np.int64))


def stage_costs(problem: PlacementProblem, pipeline: Pipeline, costs: RankCosts | None = None,
                share: int = 1) -> StageCosts:
    """Per-stage micro-batch costs of ``pipeline`` on ``problem`` (module doc, P2-P3).

    ``share``: the pipeline runs 1/``share`` of the problem's batch (a data-parallel replica
    of :func:`envs.sim.data_parallel.simulate_hybrid`), so a micro-batch is ``1 / (share * M)``.
    A CPU op's fixed part is the problem's (:meth:`~envs.sim.problem.OpArrays.fixed_parts`).

    Raises:
        PipelineError: nodes missing or unknown, a device not in the cluster, or an edge
            from a later stage to an earlier one (stages must be contiguous in a
            topological order: PipelineStage only sends forward).
    """
    group_stage, stage_dev = _stage_index(problem, pipeline)
    ops = problem.ops
    op_stage = group_stage[ops.op_group]
    src, dst, _ = ops.edges()
    back = np.nonzero(op_stage[src] > op_stage[dst])[0]
    if back.size:
        e = back[0]
        raise PipelineError(f"op {ops.names[src[e]]!r} (stage {op_stage[src[e]]}) feeds {ops.names[dst[e]]!r} "
                            f"(stage {op_stage[dst[e]]}); expected stages contiguous in a topological order "
                            "(no stage sends back to an earlier one)")
    m = pipeline.microbatches * share
    s_ = pipeline.num_stages
    fwd, bwd, opt, bwd_acc = np.zeros(s_), np.zeros(s_), np.zeros(s_), np.zeros(s_)
    static, act, has_params = np.zeros(s_), np.zeros(s_), np.zeros(s_, dtype=bool)
    work, step_work, held, foreach = np.zeros(s_), np.zeros(s_), np.zeros(s_), np.zeros(s_)
    op_foreach = ops.foreach_work_bytes()
    op_step_work, op_held = ops.step_work_bytes(), ops.loop_held_bytes()
    if len(set(stage_dev.tolist())) > 1:  # P5d counts the batch on every process
        op_held = op_held - ops.batch_held_bytes()
    acc_all = ops.accumulate if ops.accumulate is not None else np.zeros((ops.num_ops, problem.num_devices, 2))
    op_work = ops.gradient_work_at(m)
    op_static = problem.op_static_memory()
    fixed_all = problem.ops.fixed_parts()
    for s in range(s_):
        d = int(stage_dev[s])
        cpu = bool(ops.is_cpu[d])
        scale = (costs or ENGINE_COSTS).op_scale if cpu else 1.0
        sel = op_stage == s
        c = ops.cost[sel, d, :]
        fixed = fixed_all[sel, d, :]
        fwd[s] = _phase_seconds(c[:, 0], c[:, 1], fixed[:, 0], cpu, m, scale)
        bwd[s] = _phase_seconds(c[:, 2], c[:, 3], fixed[:, 1], cpu, m, scale)
        acc_h, acc_d = acc_all[sel, d, :].sum(axis=0)
        bwd_acc[s] = _phase_seconds(c[:, 2], c[:, 3], fixed[:, 1], cpu, m, scale, float(acc_h), float(acc_d))
        opt[s] = float(c[:, 4:].sum()) * scale
        static[s] = float(op_static[sel].sum())
        act[s] = float(ops.act_bytes[sel].sum()) / m
        work[s] = float(op_work[sel].max(initial=0.0))
        step_work[s] = float(op_step_work[sel].max(initial=0.0))  # P5e
        held[s] = float(op_held[sel].sum())
        foreach[s] = float(op_foreach[sel].sum())
        if pipeline.microbatches > 1:  # P5a
            work[s] = max(work[s], BACKWARD_WORK_FACTOR * float(ops.param_bytes[sel].max(initial=0.0)))
        has_params[s] = bool(ops.param_bytes[sel].sum() > 0)
    # P3: the last reader of each produced value decides how many boundaries it crosses.
    last_reader = np.full(ops.num_ops, -1, dtype=np.int64)
    np.maximum.at(last_reader, src, op_stage[dst])
    fwd_bytes, bwd_bytes = np.zeros(max(s_ - 1, 0)), np.zeros(max(s_ - 1, 0))
    static += _tied_copies(problem, lambda idx: op_stage[idx], stage_dev)  # P5c
    unsaved = _unsaved_bytes(ops)
    for i in np.nonzero(last_reader > op_stage)[0]:
        for b in range(int(op_stage[i]), int(last_reader[i])):
            fwd_bytes[b] += ops.out_bytes[i] / m
            act[b] += unsaved[i] / m  # P5b
            if ops.requires_grad[i]:
                bwd_bytes[b] += ops.out_bytes[i] / m
    return StageCosts(fwd, bwd, opt, has_params, static, act, fwd_bytes, bwd_bytes, stage_dev, work, bwd_acc,
                      step_work, held, foreach)


@cached_per_problem
def _tied_by_owner(problem: PlacementProblem) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(owner op, reader ops, bytes each reads)`` per parameter owner with readers elsewhere."""
    owners: dict[int, list[tuple[int, float]]] = {}
    for reader, owner, nbytes in problem.ops.tied_reads:
        owners.setdefault(owner, []).append((reader, nbytes))
    return [(o, np.array([r for r, _ in reads], dtype=np.int64), np.array([b for _, b in reads]))
            for o, reads in owners.items()]


def _tied_copies(problem: PlacementProblem, stage_of: Any, stage_dev: np.ndarray) -> np.ndarray:
    """[S] P5c: the static bytes of the parameter copies each stage's device holds for readers
    whose owner sits on another device, charged once per device (to its first reading stage).
    ``stage_of(op indices)`` gives their stages."""
    extra = np.zeros(len(stage_dev))
    factor = problem.static_bytes_per_param_byte
    for owner, readers, nbytes in _tied_by_owner(problem):
        owner_dev = stage_dev[int(stage_of(np.array([owner]))[0])]
        stages = stage_of(readers)
        held: dict[int, tuple[int, float]] = {}
        for s, b in zip(stages.tolist(), nbytes.tolist()):
            dev = int(stage_dev[s])
            if dev != owner_dev:
                first, most = held.get(dev, (s, 0.0))
                held[dev] = (min(first, s), max(most, b))
        for first, most in held.values():
            extra[first] += most * factor
    return extra


def _unsaved_bytes(ops: Any) -> np.ndarray:
    """[N] the bytes of each op's output that autograd does not save (P5b): what a stage keeps
    beyond its activations for a value it sends."""
    return np.maximum(ops.out_bytes.astype(np.float64) - ops.act_bytes.astype(np.float64), 0.0)


@dataclass(frozen=True, eq=False)
class PipelineTables:
    """Prefix sums over the problem's groups (its topological ``node_names`` order) that give
    a contiguous stage's costs in O(1): :func:`fast_stage_costs` (the search's evaluator).

    A stage holds the groups ``[a, b)``; every array is indexed by group position ``0..N``
    (entry ``i``: the sum over groups before ``i``), per device where costs differ.

    Attributes:
        host_f, dev_f, host_b, dev_b: [N+1, D] host and device seconds of forward, backward.
        fixed_f, fixed_b: [N+1, D] the fixed per-op host part on a CPU (module doc, P2).
        opt: [N+1, D] optimizer update seconds (host + device).
        acc_h, acc_d: [N+1, D] host and device seconds of a backward's adds into ``.grad`` (P2b).
        static, act, params: [N+1] pinned bytes, kept activation bytes, parameter bytes.
        cross_f, cross_b: [N+1] bytes over a cut before group ``i``: every value produced
            before ``i`` and last read at or after ``i`` (relayed, P3); the backward ones those
            that require grad; ``cross_kept`` their bytes autograd does not save (P5b).
        param_work: sparse table of each group's largest op parameter bytes (P5a).
        out_work, shared_work: sparse tables (level k: the max over groups ``[i, i + 2^k)``)
            of the backward working set's two parts (``OpArrays.gradient_work_parts``).
        step_work: sparse table of each group's largest optimizer step temporaries (P5e).
        held, batch_held: [N+1] the bytes the training loop holds at the step, and their
            batch part (P5e).
        foreach: [N+1] the foreach implementation's temporaries (P5e).
    """

    host_f: np.ndarray
    dev_f: np.ndarray
    host_b: np.ndarray
    dev_b: np.ndarray
    fixed_f: np.ndarray
    fixed_b: np.ndarray
    opt: np.ndarray
    acc_h: np.ndarray
    acc_d: np.ndarray
    static: np.ndarray
    act: np.ndarray
    params: np.ndarray
    cross_f: np.ndarray
    cross_b: np.ndarray
    cross_kept: np.ndarray
    out_work: np.ndarray
    shared_work: np.ndarray
    param_work: np.ndarray
    step_work: np.ndarray
    held: np.ndarray
    batch_held: np.ndarray
    foreach: np.ndarray


def _sparse_max(per_group: np.ndarray) -> np.ndarray:
    """[L, N]: row ``k`` holds the max over ``[i, i + 2^k)`` (0 past the end; the values are
    bytes, >= 0): any range's max in two lookups."""
    levels = [per_group]
    while 2 ** len(levels) <= len(per_group):
        prev, half = levels[-1], 2 ** (len(levels) - 1)
        levels.append(np.maximum(prev[:-half], prev[half:]))
    table = np.zeros((len(levels), len(per_group)))
    for k, row in enumerate(levels):
        table[k, :len(row)] = row
    return table


def _range_max(table: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Max over ``[lo, hi)`` (``hi > lo``) of the array behind ``table`` (:func:`_sparse_max`)."""
    k = np.floor(np.log2(hi - lo)).astype(np.int64)
    return np.maximum(table[k, lo], table[k, hi - 2 ** k])


def _prefix(per_op: np.ndarray, op_group: np.ndarray, n: int) -> np.ndarray:
    shape = (n,) + per_op.shape[1:]
    per_group = np.zeros(shape)
    np.add.at(per_group, op_group, per_op)
    return np.concatenate([np.zeros((1,) + per_op.shape[1:]), np.cumsum(per_group, axis=0)])


def _group_max(per_op: np.ndarray, op_group: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    np.maximum.at(out, op_group, per_op)
    return out


@cached_per_problem
def pipeline_tables(problem: PlacementProblem) -> PipelineTables:
    """The prefix tables of ``problem`` (built once per problem, kept while it lives)."""
    ops = problem.ops
    n = problem.num_nodes
    g = ops.op_group
    c = ops.cost
    fixed = problem.ops.fixed_parts()
    src, dst, _ = ops.edges()
    last_reader = np.full(ops.num_ops, -1, dtype=np.int64)
    np.maximum.at(last_reader, src, g[dst])
    crossing = np.nonzero(last_reader > g)[0]
    diff_f, diff_b = np.zeros(n + 2), np.zeros(n + 2)
    out = ops.out_bytes[crossing].astype(np.float64)
    np.add.at(diff_f, g[crossing] + 1, out)
    np.add.at(diff_f, last_reader[crossing] + 1, -out)
    grad = np.where(ops.requires_grad[crossing], out, 0.0)
    np.add.at(diff_b, g[crossing] + 1, grad)
    np.add.at(diff_b, last_reader[crossing] + 1, -grad)
    diff_k = np.zeros(n + 2)
    kept = _unsaved_bytes(ops)[crossing]
    np.add.at(diff_k, g[crossing] + 1, kept)
    np.add.at(diff_k, last_reader[crossing] + 1, -kept)
    work_out, work_shared = ops.gradient_work_parts()
    acc = ops.accumulate if ops.accumulate is not None else np.zeros((ops.num_ops, problem.num_devices, 2))
    tables = PipelineTables(
        host_f=_prefix(c[:, :, 0], g, n), dev_f=_prefix(c[:, :, 1], g, n), host_b=_prefix(c[:, :, 2], g, n),
        dev_b=_prefix(c[:, :, 3], g, n), fixed_f=_prefix(fixed[:, :, 0], g, n), fixed_b=_prefix(fixed[:, :, 1], g, n),
        opt=_prefix(c[:, :, 4] + c[:, :, 5], g, n), acc_h=_prefix(acc[:, :, 0], g, n), acc_d=_prefix(acc[:, :, 1], g, n),
        static=_prefix(problem.op_static_memory(), g, n),
        act=_prefix(ops.act_bytes.astype(np.float64), g, n), params=_prefix(ops.param_bytes.astype(np.float64), g, n),
        cross_f=np.cumsum(diff_f)[: n + 1], cross_b=np.cumsum(diff_b)[: n + 1], cross_kept=np.cumsum(diff_k)[: n + 1],
        out_work=_sparse_max(_group_max(work_out, g, n)), shared_work=_sparse_max(_group_max(work_shared, g, n)),
        param_work=_sparse_max(_group_max(ops.param_bytes.astype(np.float64), g, n)),
        step_work=_sparse_max(_group_max(ops.step_work_bytes(), g, n)),
        held=_prefix(ops.loop_held_bytes(), g, n), batch_held=_prefix(ops.batch_held_bytes(), g, n),
        foreach=_prefix(ops.foreach_work_bytes(), g, n))
    return tables


def fast_stage_costs(problem: PlacementProblem, bounds: Sequence[int], devices: Sequence[int], microbatches: int,
                     costs: RankCosts | None = None, share: int = 1) -> StageCosts:
    """:func:`stage_costs` of the stages ``[bounds[s], bounds[s+1])`` of ``problem.node_names``
    on device indices ``devices``, from :func:`pipeline_tables` (equal up to rounding).

    ``share``: the batch is 1/``share`` of the problem's (a data-parallel replica's), so a
    micro-batch is ``1 / (share * M)`` of it. The caller guarantees the stages are
    contiguous groups in the problem's order (group edges always run forward in it).
    """
    t = pipeline_tables(problem)
    b = np.asarray(bounds, dtype=np.int64)
    lo, hi = b[:-1], b[1:]
    d = np.asarray(devices, dtype=np.int64)
    div = float(microbatches * share)
    cpu = np.asarray(problem.ops.is_cpu, dtype=bool)[d]
    scale = np.where(cpu, (costs or ENGINE_COSTS).op_scale, 1.0)

    def seg(table: np.ndarray) -> np.ndarray:
        return table[hi, d] - table[lo, d]

    hf, df, hb, db = seg(t.host_f), seg(t.dev_f), seg(t.host_b), seg(t.dev_b)
    ff, fb = seg(t.fixed_f), seg(t.fixed_b)
    fwd = np.where(cpu, shrunk_host(hf, ff, div) * scale, np.maximum(hf, df / div))
    bwd = np.where(cpu, shrunk_host(hb, fb, div) * scale, np.maximum(hb, db / div))
    ah, ad = seg(t.acc_h), seg(t.acc_d)
    bwd_acc = np.where(cpu, (shrunk_host(hb, fb, div) + ah) * scale, np.maximum(hb + ah, db / div + ad))
    opt = seg(t.opt) * scale
    static = t.static[hi] - t.static[lo]
    if problem.ops.tied_reads:  # P5c
        groups = problem.ops.op_group
        static = static + _tied_copies(problem, lambda idx: np.searchsorted(b, groups[idx], side="right") - 1, d)
    inner = b[1:-1]
    act = (t.act[hi] - t.act[lo]) / div
    act[:-1] += t.cross_kept[inner] / div  # P5b: what the stage keeps of what it sends
    has_params = (t.params[hi] - t.params[lo]) > 0
    work = np.maximum(_range_max(t.out_work, lo, hi) / div, _range_max(t.shared_work, lo, hi))
    held = t.held[hi] - t.held[lo]
    if len(set(d.tolist())) > 1:  # P5d counts the batch on every process
        held = held - (t.batch_held[hi] - t.batch_held[lo])
    if microbatches > 1:  # P5a
        work = np.maximum(work, BACKWARD_WORK_FACTOR * _range_max(t.param_work, lo, hi))
    return StageCosts(fwd, bwd, opt, has_params, static, act, t.cross_f[inner] / div, t.cross_b[inner] / div, d,
                      work, bwd_acc, _range_max(t.step_work, lo, hi), held, t.foreach[hi] - t.foreach[lo])


@dataclass
class PipelineResult:
    """One simulated pipelined step.

    Attributes:
        step_time: seconds until the last device has stepped.
        device_end: {device name: its end}.
        busy: {device name: seconds of compute}.
        peak_memory: {device name: bytes}.
        over_memory: {device name: bytes over its capacity} for the devices that do not fit.
        events: (stage, kind, micro-batch, start, end) of every action, in device order.
        in_flight: [S] the most micro-batches each stage held activations for at once.
        last_backward: [S] (start, end) of each stage's backward of its last micro-batch
            (the one :mod:`envs.sim.data_parallel`'s hybrid all-reduces during).
        ready_to_step: {device name: when its last action and its sends were done}, before
            its optimizer.
    """

    step_time: float
    device_end: dict[str, float]
    busy: dict[str, float]
    peak_memory: dict[str, float]
    over_memory: dict[str, float]
    in_flight: list[int]
    events: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    last_backward: list[tuple[float, float]] = field(default_factory=list)
    ready_to_step: dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.over_memory

    def memory_problems(self) -> list[str]:
        """One line per device that does not fit."""
        return memory_problem_lines(self.peak_memory, self.over_memory)


def engine_host_costs(problem: PlacementProblem, device: int, costs: RankCosts | None = None) -> RankCosts:
    """The host constants of one process of the engine on ``device`` (P4): on a CPU the measured
    multi-process ones (``costs`` or :data:`ENGINE_COSTS`); on a GPU the single-process host
    overheads the op-level simulator charges (:class:`envs.sim.cost_model.HostOverheads`): each
    backward is a ``torch.autograd.backward`` call (``backward_call_s``) and the last stage
    computes the loss (``loss_s``). They were zero here, so one GPU running one stage priced the
    same step 20 us (the backward call) under the op-level simulator's figure for it."""
    if problem.ops.is_cpu[device]:
        return costs or ENGINE_COSTS
    return _gpu_host_costs(problem)


@cached_per_problem
def _gpu_host_costs(problem: PlacementProblem) -> RankCosts:
    # Once per problem: the pipeline search simulates thousands of pipelines, and a dataclass
    # replace per GPU per pipeline cost 7.5 us each.
    host = problem.ops.host
    return replace(ZERO_COSTS, stage_bwd_s=float(host.backward_call_s), loss_s=float(host.loss_s))


def _host_costs(problem: PlacementProblem, costs: RankCosts | None) -> list[RankCosts]:
    return [engine_host_costs(problem, d, costs) for d in range(problem.num_devices)]


def simulate_pipeline(problem: PlacementProblem, pipeline: Pipeline, costs: RankCosts | None = None,
                      trace: bool = False, stage_cost: StageCosts | None = None) -> PipelineResult:
    """Simulate one training step of ``pipeline`` on ``problem`` (rules P1-P5 in the module doc).

    Args:
        problem: the compiled problem (op costs per device, links, capacities).
        pipeline: the stages over ``problem.node_names``, their devices, ``M`` and the schedule.
        costs: the host constants of CPU processes (default :data:`ENGINE_COSTS`, measured
            through ``torch.distributed.pipelining``); GPUs are charged none.
        trace: keep every action's interval in ``events``.
        stage_cost: the stages' costs when the caller has them (:func:`fast_stage_costs`,
            or a data-parallel replica's share of the batch); default :func:`stage_costs`.

    Raises:
        PipelineError: see :func:`stage_costs`.
    """
    if pipeline.replicas:
        raise PipelineError(f"a pipeline with {pipeline.num_replicas} replicas is simulated by "
                            "envs.sim.data_parallel.simulate_hybrid; expected one replica here")
    sc = stage_cost if stage_cost is not None else stage_costs(problem, pipeline, costs)
    orders = _orders(pipeline.schedule, pipeline.num_stages, pipeline.microbatches, len(pipeline.ranks))
    ranks = pipeline.ranks
    rank_of_stage = [ranks.index(d) for d in pipeline.devices]
    host = _host_costs(problem, costs)
    lat, bw = problem.latency, problem.bandwidth
    s_, m = pipeline.num_stages, pipeline.microbatches
    dev = sc.device

    def link(a: int, b: int, nbytes: float) -> tuple[float, float]:
        """(occupation, latency) of a message from stage a's device to stage b's."""
        da, db = int(dev[a]), int(dev[b])
        if da == db:
            return 0.0, 0.0
        occ = nbytes / bw[da, db] if nbytes > 0 else 0.0
        return occ, float(lat[da, db])

    f_done = np.full((s_, m), np.nan)
    b_done = np.full((s_, m), np.nan)
    b_start = np.full((s_, m), np.nan)
    f_arrive = np.full((s_, m), np.nan)  # activations of micro-batch at stage s (s > 0)
    b_arrive = np.full((s_, m), np.nan)  # gradient of micro-batch at stage s (s < S-1)
    chan_f = np.zeros(max(s_ - 1, 1))
    chan_b = np.zeros(max(s_ - 1, 1))
    clock = [0.0] * len(ranks)
    busy = [0.0] * len(ranks)
    send_done = [0.0] * len(ranks)
    pos = [0] * len(ranks)
    live = np.zeros(s_, dtype=np.int64)
    accumulated = [False] * s_  # P2b: the stage has run a backward this step
    peak_live = np.zeros(s_, dtype=np.int64)
    events: list[tuple[int, str, int, float, float]] = []
    for r in range(len(ranks)):
        clock[r] = 0.0
    remaining = sum(len(o) for o in orders)
    # Ranks advance in time order; a rank whose next action's input has not been produced
    # yet waits until another rank produces it (torch's order is deadlock-free).
    while remaining:
        progressed = False
        heap = [(clock[r], r) for r in range(len(ranks)) if pos[r] < len(orders[r])]
        heapq.heapify(heap)
        while heap:
            _, r = heapq.heappop(heap)
            a = orders[r][pos[r]]
            s, mb = a.stage, a.mb
            hc = host[int(dev[s])]
            if a.kind == "F":
                ready = 0.0 if s == 0 else f_arrive[s, mb]
                if math.isnan(ready):
                    continue
                start = max(clock[r], ready) + (hc.recv_s if s > 0 else 0.0)
                dt = sc.fwd[s] + hc.stage_fwd_s + (hc.loss_s if s == s_ - 1 else 0.0)
                end = start + dt
                f_done[s, mb] = end
                live[s] += 1
                peak_live[s] = max(peak_live[s], live[s])
                if s < s_ - 1:
                    end += hc.send_s
                    occ, lt = link(s, s + 1, sc.fwd_bytes[s])
                    begin = max(end, chan_f[s])
                    chan_f[s] = begin + occ
                    f_arrive[s + 1, mb] = begin + occ + lt
                    send_done[r] = max(send_done[r], begin + occ)
            else:
                if math.isnan(f_done[s, mb]):
                    continue
                ready = f_done[s, mb] if s == s_ - 1 else b_arrive[s, mb]
                if math.isnan(ready):
                    continue
                start = max(clock[r], ready) + (hc.recv_s if s < s_ - 1 else 0.0)
                dt = sc.backward_s(s, accumulated[s]) + hc.stage_bwd_s
                accumulated[s] = True
                end = start + dt
                b_done[s, mb] = end
                b_start[s, mb] = start
                live[s] -= 1
                if s > 0:
                    end += hc.send_s
                    occ, lt = link(s, s - 1, sc.bwd_bytes[s - 1])
                    begin = max(end, chan_b[s - 1])
                    chan_b[s - 1] = begin + occ
                    b_arrive[s - 1, mb] = begin + occ + lt
                    send_done[r] = max(send_done[r], begin + occ)
            busy[r] += dt
            if trace:
                events.append((s, a.kind, mb, start, start + dt))
            clock[r] = end
            pos[r] += 1
            remaining -= 1
            progressed = True
            if pos[r] < len(orders[r]):
                heapq.heappush(heap, (clock[r], r))
        if not progressed:  # pragma: no cover - torch's orders never deadlock
            raise PipelineError(f"the {pipeline.schedule} order deadlocked (stage order {orders})")
    fixed = float(problem.ops.host.step_s)
    end_of: dict[str, float] = {}
    busy_of: dict[str, float] = {}
    ready_of: dict[str, float] = {}
    for r, name in enumerate(ranks):
        d = problem.device_names.index(name)
        hc = host[d]
        mine = [s for s in range(s_) if rank_of_stage[s] == r]
        t = max(clock[r], send_done[r])
        ready_of[name] = t
        opt = float(sum(sc.opt[s] for s in mine))
        if any(sc.has_params[s] for s in mine):
            opt += fixed
        end_of[name] = t + opt + hc.step_s
        busy_of[name] = busy[r] + opt
    peak: dict[str, float] = {}
    recv_in = np.concatenate([[0.0], sc.fwd_bytes]) if s_ > 1 else np.zeros(1)
    grad_in = np.concatenate([sc.bwd_bytes, [0.0]]) if s_ > 1 else np.zeros(1)
    work: dict[str, float] = {}
    at_step: dict[str, float] = {}  # P5e: static memory and receive buffers, then the step's temporaries
    step_work: dict[str, float] = {}
    foreach: dict[str, float] = {}
    for s in range(s_):
        name = pipeline.devices[s]
        buffers = m * (recv_in[s] + grad_in[s])
        peak[name] = peak.get(name, 0.0) + sc.static[s] + int(peak_live[s]) * sc.act[s] + buffers
        work[name] = max(work.get(name, 0.0), float(sc.work[s]))
        at_step[name] = at_step.get(name, 0.0) + sc.static[s] + buffers + (
            float(sc.held[s]) if sc.held is not None else 0.0)
        own = float(sc.step_work[s]) if sc.step_work is not None else 0.0
        step_work[name] = max(step_work.get(name, 0.0), own)
        foreach[name] = foreach.get(name, 0.0) + (float(sc.foreach[s]) if sc.foreach is not None else 0.0)
    for name, w in work.items():  # one backward at a time per device: its largest working set
        d = problem.device_names.index(name)
        temporaries = float(step_temporaries(problem.ops.is_cpu[d], np.float64(step_work[name]), np.float64(foreach[name])))
        peak[name] = max(peak[name] + w, at_step[name] + temporaries)
    if len(work) > 1:  # P5d: a job of several processes; one process is the op-level simulator's rule
        for name in work:
            peak[name] += problem.ops.input_bytes
    cap = {n: float(problem.memory_capacity[i]) for i, n in enumerate(problem.device_names)}
    over = {n: peak[n] - cap[n] for n in peak if peak[n] > cap[n]}
    last = [(float(b_start[s, m - 1]), float(b_done[s, m - 1])) for s in range(s_)]
    return PipelineResult(float(max(end_of.values())), end_of, busy_of, peak, over,
                          [int(x) for x in peak_live], events, last, ready_of)


def check_pipeline(problem: PlacementProblem, pipeline: Pipeline, batch_size: int | None = None,
                   costs: RankCosts | None = None) -> PipelineResult:
    """Simulate ``pipeline`` and refuse it when it cannot run: ``M`` not dividing
    ``batch_size``, a malformed cut (:func:`stage_costs`), or a device it does not fit.

    Raises:
        PipelineError: one line naming what was wrong and what was expected.
    """
    if batch_size is not None:
        pipeline.check_batch(batch_size)
    result = simulate_pipeline(problem, pipeline, costs)
    if not result.fits:
        worst = max(result.over_memory, key=result.over_memory.get)
        stages = [i for i, d in enumerate(pipeline.devices) if d == worst]
        cap = float(problem.memory_capacity[problem.device_names.index(worst)])
        raise PipelineError(f"stage(s) {stages} do not fit {worst}: they need {result.peak_memory[worst] / 2**30:.2f} "
                            f"GiB with {pipeline.microbatches} micro-batch(es) under {pipeline.schedule}, the device "
                            f"has {cap / 2**30:.2f} GiB; expected a cut or M that fits")
    return result


def contiguous_pipeline(order: Sequence[str], cuts: Sequence[int], devices: Sequence[str], microbatches: int,
                        schedule: str = "1f1b") -> Pipeline:
    """The pipeline that cuts ``order`` (a topological order of the nodes) before each index of ``cuts``."""
    bounds = [0, *cuts, len(order)]
    stages = tuple(tuple(order[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1))
    return Pipeline(stages, tuple(devices), microbatches, schedule)


def stage_nodes_of(assignment: Mapping[str, str], order: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Runs of consecutive nodes of ``order`` on one device: (device, nodes) per run."""
    runs: list[tuple[str, list[str]]] = []
    for n in order:
        d = assignment[n]
        if runs and runs[-1][0] == d:
            runs[-1][1].append(n)
        else:
            runs.append((d, [n]))
    return runs


def group_pipeline(problem: PlacementProblem, pipeline: Pipeline) -> Pipeline:
    """``pipeline`` over ``problem.node_names``: a placement file's pipeline names ops, the
    problem's nodes are their groups (each group in the stage of its ops). A pipeline already
    over the problem's nodes is returned as it is.

    Raises:
        PipelineError: an op the problem does not have, or a group whose ops are in two stages.
    """
    names = set(problem.node_names)
    if all(n in names for s in pipeline.stages for n in s):
        return pipeline
    op_index = {n: i for i, n in enumerate(problem.ops.names)}
    group_stage: dict[int, int] = {}
    for s, stage in enumerate(pipeline.stages):
        for op in stage:
            if op not in op_index:
                raise PipelineError(f"the pipeline names {op!r}, which is neither a node nor an op of the model")
            g = int(problem.ops.op_group[op_index[op]])
            if group_stage.setdefault(g, s) != s:
                raise PipelineError(f"group {problem.node_names[g]!r} has ops in stages {group_stage[g]} and {s}; "
                                    "expected each group in one stage")
    stages: list[list[str]] = [[] for _ in pipeline.stages]
    for g, name in enumerate(problem.node_names):
        if g not in group_stage:
            raise PipelineError(f"the pipeline's stages miss the ops of group {name!r}")
        stages[group_stage[g]].append(name)
    return Pipeline(tuple(tuple(s) for s in stages), pipeline.devices, pipeline.microbatches, pipeline.schedule,
                    pipeline.replicas)
