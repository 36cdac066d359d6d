"""Per-stage costs of one micro-batch of a pipeline (rules P2, P2b, P3 and P5 of
:mod:`envs.sim.pipeline`): :func:`stage_costs` from a :class:`~envs.sim.pipeline_layout.Pipeline`,
:func:`fast_stage_costs` from prefix tables over the problem's groups (the search's evaluator),
:func:`segment_step_seconds` the seconds a candidate stage keeps its process busy per step
(PipeDream's partitioner balances them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from envs.sim.memory_rules import BACKWARD_WORK_FACTOR
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.problem_cache import cached_per_problem
from envs.sim.rank_costs import RankCosts

__all__ = ["ENGINE_COSTS", "shrunk_host", "StageCosts", "stage_costs", "PipelineTables", "pipeline_tables",
           "segment_step_seconds", "fast_stage_costs"]

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



@dataclass(frozen=True)
class StageCosts:
    """Per stage, the seconds and bytes of one micro-batch (:mod:`envs.sim.pipeline`, P2-P3).

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
            :data:`~envs.sim.memory_rules.BACKWARD_WORK_FACTOR`.
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
    """Per-stage micro-batch costs of ``pipeline`` on ``problem`` (:mod:`envs.sim.pipeline`, P2-P3).

    ``share``: the pipeline runs 1/``share`` of the problem's batch (a data-parallel replica
    of :func:`envs.sim.hybrid.simulate_hybrid`), so a micro-batch is ``1 / (share * M)``.
    A CPU op's fixed part is the problem's (:meth:`~envs.sim.op_arrays.OpArrays.fixed_parts`).

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
    trained, param_grads = ops.trained_bytes(), ops.param_grad_bytes()
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
            work[s] = max(work[s], BACKWARD_WORK_FACTOR * float(param_grads[sel].max(initial=0.0)))
        has_params[s] = bool(trained[sel].sum() > 0)
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
        fixed_f, fixed_b: [N+1, D] the fixed per-op host part on a CPU (:mod:`envs.sim.pipeline`, P2).
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
        act=_prefix(ops.act_bytes.astype(np.float64), g, n), params=_prefix(ops.trained_bytes().astype(np.float64), g, n),
        cross_f=np.cumsum(diff_f)[: n + 1], cross_b=np.cumsum(diff_b)[: n + 1], cross_kept=np.cumsum(diff_k)[: n + 1],
        out_work=_sparse_max(_group_max(work_out, g, n)), shared_work=_sparse_max(_group_max(work_shared, g, n)),
        param_work=_sparse_max(_group_max(ops.param_grad_bytes().astype(np.float64), g, n)),
        step_work=_sparse_max(_group_max(ops.step_work_bytes(), g, n)),
        held=_prefix(ops.loop_held_bytes(), g, n), batch_held=_prefix(ops.batch_held_bytes(), g, n),
        foreach=_prefix(ops.foreach_work_bytes(), g, n))
    return tables


def _segment_seconds(t: PipelineTables, lo: np.ndarray, hi: np.ndarray | int, d: np.ndarray | int, div: float,
                     cpu: np.ndarray | bool, scale: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """(forward, backward, accumulating backward, optimizer update) seconds of one micro-batch of
    the segments ``[lo, hi)`` on devices ``d`` (broadcast), from the prefix tables (P2, P2b)."""

    def seg(table: np.ndarray) -> np.ndarray:
        return table[hi, d] - table[lo, d]

    hf, df, hb, db = seg(t.host_f), seg(t.dev_f), seg(t.host_b), seg(t.dev_b)
    ff, fb = seg(t.fixed_f), seg(t.fixed_b)
    fwd = np.where(cpu, shrunk_host(hf, ff, div) * scale, np.maximum(hf, df / div))
    bwd = np.where(cpu, shrunk_host(hb, fb, div) * scale, np.maximum(hb, db / div))
    ah, ad = seg(t.acc_h), seg(t.acc_d)
    bwd_acc = np.where(cpu, (shrunk_host(hb, fb, div) + ah) * scale, np.maximum(hb + ah, db / div + ad))
    return fwd, bwd, bwd_acc, seg(t.opt) * scale


def segment_step_seconds(problem: PlacementProblem, lo: np.ndarray, hi: int, device: int, microbatches: int,
                         host: RankCosts, first: bool, last: bool) -> np.ndarray:
    """Seconds a stage holding the groups ``[lo, hi)`` (one per entry of ``lo``) keeps its
    process busy in one step: what :func:`envs.sim.pipeline.simulate_pipeline` charges its
    device's thread, waiting aside. ``M`` forwards and one backward plus ``M - 1`` accumulating
    ones (P2, P2b), each a stage call with its receive and send on the stage's boundaries and,
    on the last stage, the loss (P4); then the optimizer update with the fixed per-step cost
    where the stage holds parameters (P5). ``host``: the device's host constants
    (:func:`envs.sim.pipeline.engine_host_costs`), whose ``op_scale`` scales op times on a CPU.

    The pipeline's throughput is bounded by its busiest stage (PipeDream's bottleneck), so a
    partitioner that balances these seconds balances what the simulator runs.
    """
    t = pipeline_tables(problem)
    lo = np.asarray(lo, dtype=np.int64)
    m = int(microbatches)
    cpu = bool(problem.ops.is_cpu[device])
    fwd, bwd, bwd_acc, opt = _segment_seconds(t, lo, hi, device, float(m), cpu, host.op_scale if cpu else 1.0)
    per_call = (host.stage_fwd_s + host.stage_bwd_s + (0.0 if first else host.recv_s + host.send_s)
                + (host.loss_s if last else host.recv_s + host.send_s))
    params = (t.params[hi] - t.params[lo]) > 0
    return (m * fwd + bwd + (m - 1) * bwd_acc + m * per_call + opt
            + np.where(params, float(problem.ops.host.step_s), 0.0) + host.step_s)


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

    fwd, bwd, bwd_acc, opt = _segment_seconds(t, lo, hi, d, div, cpu, scale)
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

