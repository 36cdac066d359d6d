"""The order in which each device runs its micro-batch forwards and backwards (rule P1 of
:mod:`envs.sim.pipeline`), rebuilt from ``torch.distributed.pipelining``'s schedules."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from envs.sim.pipeline_layout import SCHEDULES, Pipeline, PipelineError

__all__ = ["Action", "action_order", "pipeline_orders", "schedule_orders"]


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
    under ``schedule`` (:mod:`envs.sim.pipeline`, P1). Rank ``r`` holds stages ``r, r + P, ...``."""
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
    """Per rank of ``pipeline`` (``pipeline.ranks`` order), its action order (:mod:`envs.sim.pipeline`, P1)."""
    return [list(o) for o in schedule_orders(pipeline.schedule, pipeline.num_stages, pipeline.microbatches,
                                      len(pipeline.ranks))]


@functools.lru_cache(maxsize=1024)
def schedule_orders(schedule: str, num_stages: int, microbatches: int, num_ranks: int) -> tuple[tuple[Action, ...], ...]:
    """:func:`pipeline_orders` of every pipeline with this shape, built once: the order depends on
    nothing else, and the pipeline search simulates thousands of cuts of a few shapes (building
    the orders was a fifth of :func:`simulate_pipeline`'s time). Tuples: the cached orders are
    shared, so nobody may change them."""
    if schedule != "interleaved_1f1b":
        return tuple(tuple(o) for o in action_order(schedule, num_stages, microbatches))
    p = num_ranks
    return tuple(tuple(_interleaved_rank_ops(r, num_stages // p, p, microbatches)) for r in range(p))


