"""The pipeline search's space: its states, their moves, and the moves' features.

A point of the search (:class:`PipelineState`) is ``R`` replicas of one pipeline: the stage
boundaries, positions in the problem's fixed topological order of the groups
(``problem.node_names``; group edges only run forward in it, so every cut is a valid
pipeline: :class:`envs.sim.pipeline_layout.Pipeline` stages are contiguous), the device of every
stage of every replica, ``M`` and the schedule.

Moves (:func:`neighbours`): shift one boundary by ``k`` groups (``k`` = 1, 2, 4, ... both
ways), swap the devices of two stages, move a stage to an unused device, merge two adjacent
stages, split a stage at its cost midpoint onto an unused device, the next larger or smaller
``M``, another schedule (to interleaved 1F1B: the chain re-cut into two balanced stages per
device; back: one balanced stage per device), and reshape to another (replicas x stages)
layout of the devices (balanced cut by cost).

Features (:func:`move_features`) describe every candidate move by ratios and flags that
carry to any graph and cluster, so one linear policy scores them all
(:mod:`placer.search.pipeline_search` trains it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem import PlacementProblem
from envs.sim.stage_costs import StageCosts

__all__ = ["PipelineState", "Evaluation", "Move", "MOVE_KINDS", "NUM_FEATURES", "SCHEDULES", "MAX_MICROBATCHES",
           "microbatch_choices", "layouts", "balanced_bounds", "nearest_microbatches", "neighbours", "move_features"]

#: The schedules the search moves between (interleaved 1F1B with two stages per device).
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
#: The kinds of move, in the order of the features' one-hot block.
MOVE_KINDS = ("shift", "swap", "relocate", "merge", "split", "m_up", "m_down", "schedule", "reshape")
#: Features per move: the one-hot kind, then the numeric features of :func:`move_features`.
NUM_FEATURES = len(MOVE_KINDS) + 8
#: The largest ``M`` the search considers.
MAX_MICROBATCHES = 64


@dataclass(frozen=True)
class PipelineState:
    """A point of the search: ``R = len(devices)`` replicas of one pipeline.

    Attributes:
        bounds: ``0 = b_0 < b_1 < ... < b_S = N``: stage ``s`` holds the groups
            ``[b_s, b_{s+1})`` of ``problem.node_names``.
        devices: [R][S] device index of every stage of every replica.
        microbatches: ``M``, per replica.
        schedule: ``gpipe``, ``1f1b`` or ``interleaved_1f1b`` (one replica, two stages per
            device, stage ``s`` on the device of stage ``s mod P``).
    """

    bounds: tuple[int, ...]
    devices: tuple[tuple[int, ...], ...]
    microbatches: int
    schedule: str

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def replicas(self) -> int:
        return len(self.devices)

    def valid(self, batch_size: int | None, min_samples: int = 1) -> bool:
        """Whether torch can run it: non-empty stages, distinct devices, ``R M`` dividing the
        batch into micro-batches of at least ``min_samples`` samples (the model's smallest
        runnable batch), and 1F1B with ``M >= S`` (Schedule1F1B's rule)."""
        b = self.bounds
        if len(b) < 3 or any(b[i + 1] <= b[i] for i in range(len(b) - 1)):
            return False
        if any(len(r) != self.num_stages for r in self.devices):
            return False
        if batch_size is not None and (batch_size % (self.replicas * self.microbatches)
                                       or batch_size // (self.replicas * self.microbatches) < min_samples):
            return False
        if self.schedule == "interleaved_1f1b":
            # ScheduleInterleaved1F1B: stage s on device s mod P, the same number (> 1) of stages
            # on each of the P devices, M a multiple of max(1, M // P) rounds; no replicas here.
            row = self.devices[0]
            p = len(set(row))
            rounds = max(1, self.microbatches // p)
            return (self.replicas == 1 and self.num_stages % p == 0 and self.num_stages > p
                    and all(row[s] == row[s % p] for s in range(self.num_stages))
                    and self.microbatches % rounds == 0)
        flat = [d for r in self.devices for d in r]
        if len(set(flat)) != len(flat):
            return False
        return not (self.schedule == "1f1b" and self.microbatches < self.num_stages)

    def pipelines(self, problem: PlacementProblem) -> tuple[Pipeline, ...]:
        """One :class:`Pipeline` per replica, over ``problem.node_names``."""
        names = problem.node_names
        stages = tuple(tuple(names[self.bounds[i]:self.bounds[i + 1]]) for i in range(self.num_stages))
        return tuple(Pipeline(stages, tuple(problem.device_names[d] for d in r), self.microbatches, self.schedule)
                     for r in self.devices)

    def pipeline(self, problem: PlacementProblem) -> Pipeline:
        """The state as one :class:`Pipeline`, its further replicas in ``replicas``."""
        first, *rest = self.pipelines(problem)
        return Pipeline(first.stages, first.devices, first.microbatches, first.schedule,
                        tuple(p.devices for p in rest))

    def describe(self) -> str:
        """``"2 stages x 2 replicas, 1f1b, M=4"``."""
        rep = f" x {self.replicas} replicas" if self.replicas > 1 else ""
        return f"{self.num_stages} stages{rep}, {self.schedule}, M={self.microbatches}"


@dataclass
class Evaluation:
    """A simulated state: its step time, fit, and what the features read."""

    state: PipelineState
    step_time: float
    fits: bool
    stage_costs: StageCosts
    peak_memory: dict[str, float]
    exposed_allreduce: float

    @property
    def key(self) -> float:
        return self.step_time if self.fits else math.inf


@dataclass(frozen=True)
class Move:
    """A candidate move and the state it leads to."""

    kind: str
    state: PipelineState
    stage: int  # the stage (or boundary's left stage) it touches; -1: all
    amount: float = 0.0  # groups shifted (signed: > 0 moves the boundary later)


def microbatch_choices(batch_size: int | None, replicas: int, min_samples: int = 1) -> list[int]:
    """The ``M`` a replica may use: divisors of its batch, at most :data:`MAX_MICROBATCHES`,
    leaving micro-batches of at least ``min_samples`` samples.

    >>> microbatch_choices(8, 2), microbatch_choices(8, 2, min_samples=2), microbatch_choices(2, 2, min_samples=2)
    ([1, 2, 4], [1, 2], [])
    """
    if batch_size is None:
        return [1]
    if batch_size % replicas or batch_size // replicas < min_samples:
        return []
    b = batch_size // replicas
    return [m for m in range(1, min(b // min_samples, MAX_MICROBATCHES) + 1) if b % m == 0]


def layouts(num_devices: int) -> list[tuple[int, int]]:
    """(replicas, stages) with at least 2 stages that fit ``num_devices``."""
    return [(r, s) for r in range(1, num_devices // 2 + 1) for s in range(2, num_devices // r + 1)]


def balanced_bounds(cost: np.ndarray, stages: int) -> tuple[int, ...] | None:
    """Cuts giving each of ``stages`` about an equal share of ``cost`` (None: too few groups)."""
    n = len(cost)
    if stages > n:
        return None
    cum = np.cumsum(cost)
    total = float(cum[-1]) if n else 0.0
    bounds = [0]
    for j in range(1, stages):
        i = int(np.searchsorted(cum, total * j / stages, side="left")) + 1 if total > 0 else round(n * j / stages)
        bounds.append(min(max(i, bounds[-1] + 1), n - (stages - j)))
    bounds.append(n)
    return tuple(bounds)


def nearest_microbatches(choices: list[int], m: int, stages: int, schedule: str) -> tuple[int, str] | None:
    if not choices:
        return None
    ok = [c for c in choices if schedule != "1f1b" or c >= stages]
    if not ok:
        return min(choices, key=lambda c: abs(math.log(c / m))), "gpipe"
    return min(ok, key=lambda c: (abs(math.log(c / m)), c)), schedule


def neighbours(state: PipelineState, devices: Sequence[int], batch_size: int | None,
               cost: np.ndarray, min_samples: int = 1) -> list[Move]:
    """Every valid move of ``state`` (module doc). ``devices``: the devices pipelines may use;
    ``cost`` [N]: each group's compute (the split and reshape moves cut by it);
    ``min_samples``: the smallest micro-batch the model runs on."""
    out: list[Move] = []
    b, devs, m, sch = list(state.bounds), state.devices, state.microbatches, state.schedule
    s_, r_ = state.num_stages, state.replicas
    n = b[-1]
    used = {d for r in devs for d in r}
    free = [d for d in devices if d not in used]

    def add(kind: str, st: PipelineState, stage: int, amount: float = 0.0) -> None:
        if st != state and st.valid(batch_size, min_samples):
            out.append(Move(kind, st, stage, amount))

    for j in range(1, s_):  # boundary j sits between stage j-1 and stage j
        k = 1
        while k <= max(1, n // 2):
            for sign in (1, -1):
                nb = list(b)
                nb[j] += sign * k
                if b[j - 1] < nb[j] < b[j + 1]:
                    add("shift", PipelineState(tuple(nb), devs, m, sch), j - 1, sign * k)
            k *= 2
    flat = [(r, s) for r in range(r_) for s in range(s_)]
    for x in range(len(flat)):
        for y in range(x + 1, len(flat)):
            (ra, sa), (rb, sb) = flat[x], flat[y]
            cells = [list(r) for r in devs]
            cells[ra][sa], cells[rb][sb] = cells[rb][sb], cells[ra][sa]
            add("swap", PipelineState(state.bounds, tuple(tuple(r) for r in cells), m, sch), sa)
    for r, s in flat:
        for d in free:
            cells = [list(x) for x in devs]
            cells[r][s] = d
            add("relocate", PipelineState(state.bounds, tuple(tuple(x) for x in cells), m, sch), s)
    if s_ > 2:
        for j in range(1, s_):
            nb = b[:j] + b[j + 1:]
            grid = tuple(tuple(x for i, x in enumerate(row) if i != j) for row in devs)
            add("merge", PipelineState(tuple(nb), grid, m, sch), j - 1)
    if len(free) >= r_:
        for s in range(s_):
            lo, hi = b[s], b[s + 1]
            if hi - lo < 2:
                continue
            cum = np.cumsum(cost[lo:hi])
            cut = lo + int(np.searchsorted(cum, cum[-1] / 2, side="left")) + 1
            cut = min(max(cut, lo + 1), hi - 1)
            grid = tuple(tuple(row[:s + 1]) + (free[i],) + tuple(row[s + 1:]) for i, row in enumerate(devs))
            add("split", PipelineState(tuple(b[:s + 1] + [cut] + b[s + 1:]), grid, m, sch), s)
    choices = microbatch_choices(batch_size, r_, min_samples)
    bigger = [c for c in choices if c > m]
    smaller = [c for c in choices if c < m]
    if bigger:
        add("m_up", PipelineState(state.bounds, devs, bigger[0], sch), -1)
    if smaller:
        # 1F1B needs M >= S (Schedule1F1B): below that the move takes GPipe.
        down = "gpipe" if sch == "1f1b" and smaller[-1] < s_ else sch
        add("m_down", PipelineState(state.bounds, devs, smaller[-1], down), -1)
    if sch == "interleaved_1f1b":
        # back to one stage per device: the devices in their order, a balanced cut
        ranks = tuple(dict.fromkeys(devs[0]))
        nb1 = balanced_bounds(cost, len(ranks))
        if nb1 is not None:
            for other in ("1f1b", "gpipe"):
                add("schedule", PipelineState(nb1, (ranks,), m, other), -1)
    else:
        add("schedule", PipelineState(state.bounds, devs, m, "gpipe" if sch == "1f1b" else "1f1b"), -1)
        if r_ == 1:
            # interleaved 1F1B: the chain cut into 2 stages per device, stage s on device s mod P
            nb2 = balanced_bounds(cost, 2 * s_)
            if nb2 is not None:
                add("schedule", PipelineState(nb2, (devs[0] * 2,), m, "interleaved_1f1b"), -1)
    for r2, s2 in layouts(len(devices)):
        if (r2, s2) == (r_, s_):
            continue
        nb2 = balanced_bounds(cost, s2)
        base = "1f1b" if sch == "interleaved_1f1b" else sch
        picked = nearest_microbatches(microbatch_choices(batch_size, r2, min_samples), m * r_ // max(r2, 1) or 1, s2,
                                      base)
        if nb2 is None or picked is None:
            continue
        grid = tuple(tuple(devices[i * s2 + j] for j in range(s2)) for i in range(r2))
        add("reshape", PipelineState(nb2, grid, picked[0], picked[1]), -1)
    return out


# ---------------------------------------------------------------------------- features
def move_features(moves: Sequence[Move], current: Evaluation, problem: PlacementProblem) -> np.ndarray:
    """[K, NUM_FEATURES] features of ``moves`` from the incumbent ``current`` (module doc).

    Every feature is a ratio or a flag, so one policy scores any graph and cluster.
    """
    sc, st = current.stage_costs, current.state
    m, s_ = st.microbatches, st.num_stages
    stage_t = (sc.fwd + sc.bwd) * m
    worst = max(float(stage_t.max()), 1e-30)
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    names = list(problem.device_names)
    head = np.array([(cap[names.index(d)] - p) / max(cap[names.index(d)], 1.0)
                     for d, p in current.peak_memory.items()]) if current.peak_memory else np.zeros(1)
    bubble = (s_ - 1) / (m + s_ - 1)
    step = max(current.step_time, 1e-30)
    out = np.zeros((len(moves), NUM_FEATURES))
    for i, mv in enumerate(moves):
        out[i, MOVE_KINDS.index(mv.kind)] = 1.0
        f = out[i, len(MOVE_KINDS):]
        s = mv.stage
        if s >= 0:
            f[0] = stage_t[s] / worst  # how close the stage it touches is to the bottleneck
        if mv.kind == "shift":
            left, right = stage_t[s], stage_t[s + 1]
            # > 0: the shift moves groups from the slower stage to the faster one
            toward = (left - right) / worst
            f[1] = toward if mv.amount < 0 else -toward
            lo, hi = st.bounds[s], st.bounds[s + 2]
            f[2] = abs(mv.amount) / max(hi - lo, 1)
            link = float(problem.bandwidth[sc.device[s], sc.device[s + 1]])
            f[3] = min(float(sc.fwd_bytes[s] + sc.bwd_bytes[s]) * m / link / max(stage_t[s], 1e-30), 10.0) \
                if math.isfinite(link) and link > 0 else 0.0
        nst = mv.state
        nb = (nst.num_stages - 1) / (nst.microbatches + nst.num_stages - 1)
        f[4] = bubble
        f[5] = bubble - nb  # > 0: the move shrinks the bubble
        f[6] = float(head.min())
        f[7] = current.exposed_allreduce / step
    return out
