"""Pipeline x data parallel simulated: ``R`` replicas of one pipeline, each stage's gradients all-reduced over its replicas.

:func:`simulate_hybrid` runs ``R`` replicas, each the
same pipeline (stages, ``M``, schedule) on its own devices with ``1/R`` of the batch: the
usual composition of ``torch.distributed.pipelining`` with DDP, each stage module wrapped
in DDP over a process group of that stage's ``R`` devices. Rules:

* **H1** Each replica runs its pipeline exactly as :func:`envs.sim.pipeline.simulate_pipeline`
  does, its micro-batches ``1 / (R M)`` of the batch (P2 with ``M`` replaced by ``R M``).
* **H2** A stage's gradients are all-reduced only during the backward of its *last*
  micro-batch: the pipeline stage runs the earlier backwards under DDP's ``no_sync()``
  (``stage.py``: ``backward_maybe_with_nosync``, ``last_backward`` true only for the last
  one), so the reducer's hooks fire once per step, on the accumulated gradients. Within
  that backward the stage's buckets (D2 of :mod:`envs.sim.data_parallel`, over the stage's
  own parameters) become ready as the backward walks its ops in reverse, the backward's time
  shared out over its ops as D1 does, after the stage call's fixed host cost; a bucket is
  ready when every replica got there (the slowest decides).
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
the ``N`` devices (both tested). That pipeline (:func:`envs.sim.data_parallel.data_parallel_pipeline`) is how a
placement file holds DDP, and how ``torch.distributed.pipelining`` runs it: one stage module
per process, wrapped in DDP over the ``N`` processes.

:func:`simulate_pipelined` is what optimize, ``placer show`` and the benchmarks simulate a
pipelined placement with; :func:`check_runnable` what the launcher refuses before it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from envs.sim.data_parallel import (
    buckets,
    norm_channels,
    norm_sync_on,
    reducer_seconds,
    replica_host_seconds,
    ring_allreduce_time,
    ring_link,
    sparse_allreduce_seconds,
)
from envs.sim.memory_report import DeviceMemoryFit
from envs.sim.pipeline import PipelineResult, check_pipeline, engine_host_costs, simulate_pipeline
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.rank_costs import RankCosts
from envs.sim.stage_costs import StageCosts, shrunk_host, stage_costs

__all__ = ["HybridResult", "check_hybrid", "check_runnable", "simulate_hybrid", "simulate_pipelined"]


@dataclass
class HybridResult(DeviceMemoryFit):
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
    grad = np.where(ops.requires_grad[sel], ops.param_grad_bytes()[sel], 0.0).astype(np.float64)
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
    if m == 1 and norm_channels(problem).any():  # H5: each stage's BatchNorms over its replicas
        add_f, add_b = np.zeros(s_), np.zeros(s_)
        for s in range(s_):
            devs = [names.index(p.devices[s]) for p in pipelines]
            bw, lat, on_cpu = ring_link(problem, [(devs[k], devs[(k + 1) % r_]) for k in range(r_)])
            scale = engine_host_costs(problem, devs[0], costs).op_scale if on_cpu else 1.0
            mine = op_stage == s
            f, b = norm_sync_on(problem, devs[0], r_, scale, fixed_part, norm_channels(problem), r_, bw, lat,
                                 on_cpu, mine)
            add_f[s], add_b[s] = f.sum(), b.sum()
            sync_b += b
        per_costs = [replace(sc, fwd=sc.fwd + add_f, bwd=sc.bwd + add_b) for sc in per_costs]
    results = [simulate_pipeline(problem, p, costs, stage_cost=sc) for p, sc in zip(pipelines, per_costs)]
    grad_of = np.where(ops.requires_grad, ops.param_grad_bytes(), 0.0)
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
        bw, lat, on_cpu = ring_link(problem, ring)
        if on_cpu and ready is not None:  # D3c: the last backward holds the cores until it ends
            ready = np.full_like(ready, max(res.last_backward[s][1] for res in results))
        comm_end = 0.0
        for k, nbytes in enumerate(sizes):
            comm_end = max(comm_end, float(ready[k])) + ring_allreduce_time(nbytes, r_, bw, lat)
        comm_end += sparse_allreduce_seconds(problem, mine, on_cpu)  # D2b
        stage_grad = float(grad_of[mine].sum())
        comm_end += reducer_seconds(stage_grad, on_cpu)  # D3d: the stage's DDP copies its gradients
        comm_end += replica_host_seconds(on_cpu, r_)  # D3e: the stage's DDP beside its other replicas
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
