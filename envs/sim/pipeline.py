"""Pipelined placements simulated: one training step of stages, micro-batches and a schedule.

The pipeline as data is :mod:`envs.sim.pipeline_layout`, each device's order of actions
:mod:`envs.sim.pipeline_schedules` (P1), the per-stage micro-batch costs
:mod:`envs.sim.stage_costs` (P2, P3, P5); this module runs them (P1-P5) and checks that a
pipeline can run. A :class:`~envs.sim.pipeline_layout.Pipeline` cuts the placement graph
into stages that are contiguous in a topological order (no edge goes from a later stage to an earlier one), puts each stage on
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
on the host, and its fixed part (:meth:`envs.sim.op_arrays.OpArrays.fixed_parts`) is
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
per-call constants of :class:`envs.sim.rank_costs.RankCosts`, calibrated there on the
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
at least :data:`~envs.sim.memory_rules.BACKWARD_WORK_FACTOR` x the stage's largest op's parameter
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

import heapq
import math
from dataclasses import dataclass, field, replace

import numpy as np

from envs.sim.memory_report import DeviceMemoryFit
from envs.sim.memory_rules import step_temporaries
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.pipeline_schedules import schedule_orders
from envs.sim.problem import PlacementProblem
from envs.sim.problem_cache import cached_per_problem
from envs.sim.rank_costs import ZERO_COSTS, RankCosts
from envs.sim.stage_costs import ENGINE_COSTS, StageCosts, stage_costs

__all__ = ["PipelineResult", "engine_host_costs", "simulate_pipeline", "check_pipeline"]


@dataclass
class PipelineResult(DeviceMemoryFit):
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
            (the one :mod:`envs.sim.hybrid` all-reduces during).
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
                            "envs.sim.hybrid.simulate_hybrid; expected one replica here")
    sc = stage_cost if stage_cost is not None else stage_costs(problem, pipeline, costs)
    orders = schedule_orders(pipeline.schedule, pipeline.num_stages, pipeline.microbatches, len(pipeline.ranks))
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

