"""Searching pipelines: stage boundaries, stage -> device, micro-batches, schedule and replicas.

The placement search (:mod:`placer.search.search`) moves groups between devices; a pipeline
is a different object, so it has its own search here, over :class:`PipelineState`:

* the stage **boundaries**, positions in the problem's fixed topological order of the groups
  (``problem.node_names``; group edges only run forward in it, so every cut is a valid
  pipeline: :class:`envs.sim.pipeline.Pipeline` stages are contiguous);
* the **device** of every stage of every replica (the accelerators, else every device);
* ``M`` from the divisors of the (replica's) batch, and the **schedule** (``gpipe``, ``1f1b``,
  ``interleaved_1f1b`` with two stages per device);
* the number of data-parallel **replicas** ``R``: ``R`` copies of the pipeline, each on its own
  devices with ``1/R`` of the batch, gradients all-reduced per stage
  (:func:`envs.sim.data_parallel.simulate_hybrid`). A state always has at least two stages:
  one stage on every device is DDP itself, which the comparison table shows as its own row,
  not as something the search found.

Moves (:func:`neighbours`): shift one boundary by ``k`` groups (``k`` = 1, 2, 4, ... both
ways), swap the devices of two stages, move a stage to an unused device, merge two adjacent
stages, split a stage at its cost midpoint onto an unused device, the next larger or smaller
``M``, another schedule (to interleaved 1F1B: the chain re-cut into two balanced stages per
device; back: one balanced stage per device), and reshape to another (replicas x stages) layout of the devices
(balanced cut by cost). Every simulated state counts one placement of the budget, the
seeds included; a state seen before is not simulated again.

The search runs three phases, credited as the placement search's tracker credits them
(:class:`placer.search.tracker.Improvement`, :func:`~placer.search.tracker.credit`):

1. ``seeds``: the partitioners' pipelines (:mod:`placer.search.baselines.pipeline_split`:
   PipeDream's DP, even splits by layers and by parameters) at every allowed ``M``, ranked by
   the bubble estimate ``(M + S - 1)`` x the slowest stage's micro-batch; the best few are
   simulated.
2. ``policy_moves``: a learned move policy. Every candidate move of the incumbent is
   described by features that carry to any graph (:func:`move_features`: the move's kind,
   how unbalanced the two stages around a boundary are and whether the shift moves work
   from the slower to the faster one, the bottleneck share of the stages it touches, the
   pipeline bubble ``(S-1)/(M+S-1)`` and how the move changes it, the boundary's transfer
   time against the stage's compute, memory headroom, the exposed all-reduce); a linear
   softmax over them proposes a batch of distinct moves, trained by REINFORCE on the
   simulated relative improvement (a state that does not fit earns -1, baseline the batch
   mean). The best improving proposal becomes the incumbent.
3. ``local_search``: every move of the incumbent, best improvement first, until none
   improves; then the policy again from there while budget is left.

Same problem, seed and budget give the same result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from envs.sim.data_parallel import HybridResult, simulate_hybrid
from envs.sim.pipeline import Pipeline, PipelineError, StageCosts, fast_stage_costs, simulate_pipeline
from envs.sim.problem import PlacementProblem
from envs.sim.ranks import RankCosts
from placer.search.baselines.common import NoFit, node_cost
from placer.search.baselines.pipeline_split import PARTITIONERS, pipeline_devices
from placer.search.tracker import SEEDS, Improvement, credit

__all__ = ["PipelineState", "Evaluation", "PipelineSearchResult", "MOVE_KINDS", "NUM_FEATURES", "Move",
           "neighbours", "move_features", "microbatch_choices", "search_pipeline", "DEFAULT_PIPELINE_PLACEMENTS",
           "SCHEDULES"]

#: Placements (simulated pipelines) a search evaluates when the caller gives no budget.
DEFAULT_PIPELINE_PLACEMENTS = 600
#: The schedules the search moves between (interleaved 1F1B with two stages per device).
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
#: The kinds of move, in the order of the features' one-hot block.
MOVE_KINDS = ("shift", "swap", "relocate", "merge", "split", "m_up", "m_down", "schedule", "reshape")
#: Features per move: the one-hot kind, then the numeric features of :func:`move_features`.
NUM_FEATURES = len(MOVE_KINDS) + 8
#: The largest ``M`` the search considers.
MAX_MICROBATCHES = 64
#: Partitioner pipelines simulated as seeds (the best by the bubble estimate, :func:`_seed_states`).
SEED_COUNT = 4
#: Kicks in a row that reach only simulated states before the search gives up its budget.
MAX_STUCK = 30
#: Phase names (those of :mod:`placer.search.tracker`).
POLICY = "policy_moves"
LOCAL = "local_search"


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

    def valid(self, batch_size: int | None) -> bool:
        """Whether torch can run it: non-empty stages, distinct devices, ``R M`` dividing the
        batch, and 1F1B with ``M >= S`` (Schedule1F1B's rule)."""
        b = self.bounds
        if len(b) < 3 or any(b[i + 1] <= b[i] for i in range(len(b) - 1)):
            return False
        if any(len(r) != self.num_stages for r in self.devices):
            return False
        if batch_size is not None and batch_size % (self.replicas * self.microbatches):
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


@dataclass
class PipelineSearchResult:
    """The outcome of :func:`search_pipeline`.

    Attributes:
        best: the fastest fitting state found (None: nothing fits).
        pipelines: its replicas' pipelines.
        step_time: its simulated step (``inf`` if nothing fits).
        evaluated: simulated states, seeds included (the budget's unit).
        phase_evaluated: simulated states per phase.
        improvements: every improvement of the best, with the phase that found it.
        history: ``(evaluated, best step time)`` at every improvement.
        wall_s: seconds the search ran.
    """

    best: PipelineState | None
    pipelines: tuple[Pipeline, ...]
    step_time: float
    evaluated: int
    phase_evaluated: dict[str, int]
    improvements: list[Improvement]
    history: list[tuple[int, float]]
    wall_s: float
    best_phase: str = ""
    seed_methods: dict[str, float] = field(default_factory=dict)
    by_replicas: dict[int, tuple[PipelineState, float]] = field(default_factory=dict)

    def best_with_replicas(self, replicas: int) -> tuple[PipelineState | None, float]:
        """The fastest fitting state found with exactly ``replicas`` replicas, and its step."""
        return self.by_replicas.get(replicas, (None, math.inf))

    @property
    def fits(self) -> bool:
        return self.best is not None

    def credit(self) -> dict[str, float]:
        """Share of the gain over the best seed found by each phase (:func:`placer.search.tracker.credit`)."""
        return credit(self.improvements)

    @property
    def seed_step_time(self) -> float:
        seeds = [i.after for i in self.improvements if i.phase == SEEDS]
        return min(seeds) if seeds else math.inf


# ------------------------------------------------------------------------------- moves
@dataclass(frozen=True)
class Move:
    """A candidate move and the state it leads to."""

    kind: str
    state: PipelineState
    stage: int  # the stage (or boundary's left stage) it touches; -1: all
    amount: float = 0.0  # groups shifted (signed: > 0 moves the boundary later)


def microbatch_choices(batch_size: int | None, replicas: int) -> list[int]:
    """The ``M`` a replica may use: divisors of its batch, at most :data:`MAX_MICROBATCHES`."""
    if batch_size is None:
        return [1]
    if batch_size % replicas:
        return []
    b = batch_size // replicas
    return [m for m in range(1, min(b, MAX_MICROBATCHES) + 1) if b % m == 0]


def _layouts(num_devices: int) -> list[tuple[int, int]]:
    """(replicas, stages) with at least 2 stages that fit ``num_devices``."""
    return [(r, s) for r in range(1, num_devices // 2 + 1) for s in range(2, num_devices // r + 1)]


def _balanced_bounds(cost: np.ndarray, stages: int) -> tuple[int, ...] | None:
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


def _nearest_m(choices: list[int], m: int, stages: int, schedule: str) -> tuple[int, str] | None:
    if not choices:
        return None
    ok = [c for c in choices if schedule != "1f1b" or c >= stages]
    if not ok:
        return min(choices, key=lambda c: abs(math.log(c / m))), "gpipe"
    return min(ok, key=lambda c: (abs(math.log(c / m)), c)), schedule


def neighbours(state: PipelineState, devices: Sequence[int], batch_size: int | None,
               cost: np.ndarray) -> list[Move]:
    """Every valid move of ``state`` (module doc). ``devices``: the devices pipelines may use;
    ``cost`` [N]: each group's compute (the split and reshape moves cut by it)."""
    out: list[Move] = []
    b, devs, m, sch = list(state.bounds), state.devices, state.microbatches, state.schedule
    s_, r_ = state.num_stages, state.replicas
    n = b[-1]
    used = {d for r in devs for d in r}
    free = [d for d in devices if d not in used]

    def add(kind: str, st: PipelineState, stage: int, amount: float = 0.0) -> None:
        if st != state and st.valid(batch_size):
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
    choices = microbatch_choices(batch_size, r_)
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
        nb1 = _balanced_bounds(cost, len(ranks))
        if nb1 is not None:
            for other in ("1f1b", "gpipe"):
                add("schedule", PipelineState(nb1, (ranks,), m, other), -1)
    else:
        add("schedule", PipelineState(state.bounds, devs, m, "gpipe" if sch == "1f1b" else "1f1b"), -1)
        if r_ == 1:
            # interleaved 1F1B: the chain cut into 2 stages per device, stage s on device s mod P
            nb2 = _balanced_bounds(cost, 2 * s_)
            if nb2 is not None:
                add("schedule", PipelineState(nb2, (devs[0] * 2,), m, "interleaved_1f1b"), -1)
    for r2, s2 in _layouts(len(devices)):
        if (r2, s2) == (r_, s_):
            continue
        nb2 = _balanced_bounds(cost, s2)
        base = "1f1b" if sch == "interleaved_1f1b" else sch
        picked = _nearest_m(microbatch_choices(batch_size, r2), m * r_ // max(r2, 1) or 1, s2, base)
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


# ------------------------------------------------------------------------------ search
class _Evaluator:
    """Simulates states once each and counts them against the budget."""

    def __init__(self, problem: PlacementProblem, costs: RankCosts | None, budget: int) -> None:
        self.problem, self.costs, self.budget = problem, costs, budget
        self.cache: dict[PipelineState, Evaluation | None] = {}
        self.evaluated = 0
        self.phase_evaluated: dict[str, int] = {}
        self.best: Evaluation | None = None
        self.best_by_replicas: dict[int, Evaluation] = {}
        self.best_phase = ""
        self.improvements: list[Improvement] = []
        self.history: list[tuple[int, float]] = []
        self.start = time.perf_counter()

    @property
    def left(self) -> int:
        return self.budget - self.evaluated

    def __call__(self, state: PipelineState, phase: str) -> Evaluation | None:
        if state in self.cache:
            return self.cache[state]
        if self.left <= 0:
            return None
        self.evaluated += 1
        self.phase_evaluated[phase] = self.phase_evaluated.get(phase, 0) + 1
        try:
            ev = self._simulate(state)
        except PipelineError:
            ev = None
        self.cache[state] = ev
        if ev is not None and ev.fits:
            held = self.best_by_replicas.get(state.replicas)
            if held is None or ev.step_time < held.step_time:
                self.best_by_replicas[state.replicas] = ev
        if ev is not None and ev.fits and (self.best is None or ev.step_time < self.best.step_time * (1 - 1e-9)):
            before = self.best.step_time if self.best is not None else math.inf
            self.improvements.append(Improvement(self.evaluated, time.perf_counter() - self.start, phase, before,
                                                 ev.step_time))
            self.history.append((self.evaluated, ev.step_time))
            self.best, self.best_phase = ev, phase
        return ev

    def _simulate(self, state: PipelineState) -> Evaluation:
        problem, r_ = self.problem, state.replicas
        pipes = state.pipelines(problem)
        per = [fast_stage_costs(problem, state.bounds, row, state.microbatches, self.costs, share=r_)
               for row in state.devices]
        if r_ == 1:
            res = simulate_pipeline(problem, pipes[0], self.costs, stage_cost=per[0])
            return Evaluation(state, res.step_time, res.fits, per[0], dict(res.peak_memory), 0.0)
        hyb: HybridResult = simulate_hybrid(problem, pipes, self.costs, replica_costs=per)
        return Evaluation(state, hyb.step_time, hyb.fits, per[0], dict(hyb.peak_memory),
                          float(max(hyb.exposed_allreduce, default=0.0)))


def _state_of(problem: PlacementProblem, pipe: Pipeline) -> PipelineState | None:
    """The search state of a partitioner's pipeline (None: its stages are not contiguous runs)."""
    pos = {n: i for i, n in enumerate(problem.node_names)}
    if pipe.schedule not in SCHEDULES or any(n not in pos for s in pipe.stages for n in s):
        return None
    bounds = [0]
    for stage in pipe.stages:
        idx = sorted(pos[n] for n in stage)
        if idx != list(range(bounds[-1], bounds[-1] + len(idx))):
            return None
        bounds.append(bounds[-1] + len(idx))
    names = list(problem.device_names)
    if any(d not in names for r in (pipe.devices, *pipe.replicas) for d in r):
        return None
    return PipelineState(tuple(bounds), tuple(tuple(names.index(d) for d in r) for r in (pipe.devices, *pipe.replicas)),
                         pipe.microbatches, pipe.schedule)


def _estimate(problem: PlacementProblem, state: PipelineState, costs: RankCosts | None) -> float:
    """A pipeline's step without simulating it: ``(M + S - 1)`` times its slowest stage's
    micro-batch (forward, backward and the boundary's transfers), the classic bubble model."""
    sc = fast_stage_costs(problem, state.bounds, state.devices[0], state.microbatches, costs)
    per = sc.fwd + sc.bwd
    lat, bw = problem.latency, problem.bandwidth
    for b in range(state.num_stages - 1):
        a, c = int(sc.device[b]), int(sc.device[b + 1])
        per[b] += float(lat[a, c]) + float(sc.fwd_bytes[b] + sc.bwd_bytes[b]) / float(bw[a, c])
    return (state.microbatches + state.num_stages - 1) * float(per.max()) + float(sc.opt.max())


def _seed_states(problem: PlacementProblem, batch_size: int | None, devices: list[int], costs: RankCosts | None,
                 count: int) -> list[tuple[str, PipelineState]]:
    """The partitioners' pipelines over all devices at every allowed ``M`` (1F1B where it may
    run, else GPipe), ranked by :func:`_estimate`: the ``count`` best are the seeds (only they
    are simulated, so they cost ``count`` of the budget)."""
    s_ = len(devices)
    ranked: list[tuple[float, str, PipelineState]] = []
    for m in microbatch_choices(batch_size, 1):
        schedule = "1f1b" if m >= s_ else "gpipe"
        for name in ("pipedream_dp", "even_layers", "even_params"):
            try:
                pipe = PARTITIONERS[name](problem, m, schedule, devices)
            except (NoFit, PipelineError):
                continue
            st = _state_of(problem, pipe)
            if st is not None:
                ranked.append((_estimate(problem, st, costs), name, st))
    ranked.sort(key=lambda x: x[0])
    out: list[tuple[str, PipelineState]] = []
    for _, name, st in ranked:
        if all(st != other for _, other in out):
            out.append((name, st))
        if len(out) >= count:
            break
    return out


def _closest(choices: list[int], target: int) -> int | None:
    return min(choices, key=lambda c: (abs(c - target), c)) if choices else None


def search_pipeline(problem: PlacementProblem, batch_size: int | None, budget: int, seed: int = 0, costs: RankCosts | None = None, batch: int = 8, learning_rate: float = 0.5,
                    policy_share: float = 0.5, initial: Sequence[Pipeline] = ()) -> PipelineSearchResult:
    """Search pipelines (and pipeline x data-parallel hybrids) of ``problem`` (module doc).

    Args:
        problem: the compiled problem (its ``node_names`` a topological order of the groups).
        batch_size: the training batch; ``M`` and the replicas must divide it (None: ``M = 1``).
        budget: simulated states in all, seeds included (``optimize`` gives its placement budget,
            else :data:`DEFAULT_PIPELINE_PLACEMENTS`).
        seed: seeds the policy's sampling.
        costs: host constants of CPU processes (:class:`envs.sim.ranks.RankCosts`).
        batch: proposals the policy makes per round.
        learning_rate: the policy's REINFORCE step size.
        policy_share: the share of each round's budget the policy gets before local search.
        initial: pipelines over ``problem.node_names`` to start from (a resumed run's), simulated
            first as seeds; those the search cannot represent are skipped.

    Raises:
        PipelineError: fewer than two devices, or a budget below one.
    """
    if budget < 1:
        raise PipelineError(f"a pipeline search needs a budget of at least 1 placement, got {budget}")
    devices = pipeline_devices(problem)
    if len(devices) < 2:
        raise PipelineError(f"a pipeline needs at least 2 devices; the cluster offers {len(devices)}")
    rng = np.random.default_rng(seed)
    cost = node_cost(problem)[:, devices[0]]
    ev = _Evaluator(problem, costs, budget)
    seeds: dict[str, float] = {}
    given = [("initial", st) for st in (_state_of(problem, p) for p in initial) if st is not None]
    for name, st in given + _seed_states(problem, batch_size, devices, costs, SEED_COUNT):
        e = ev(st, SEEDS)
        if e is not None and e.fits:
            seeds[name] = min(seeds.get(name, math.inf), e.step_time)
    if ev.best is None:  # no partitioner fits: start from the balanced layouts
        for r2, s2 in _layouts(len(devices)):
            nb = _balanced_bounds(cost, s2)
            picked = _nearest_m(microbatch_choices(batch_size, r2), 4 * s2, s2, "1f1b")
            if nb is None or picked is None:
                continue
            grid = tuple(tuple(devices[i * s2 + j] for j in range(s2)) for i in range(r2))
            ev(PipelineState(nb, grid, picked[0], picked[1]), SEEDS)
    w = np.zeros(NUM_FEATURES)
    current = ev.best
    stuck = 0
    while ev.left > 0 and current is not None:
        before = ev.evaluated
        round_budget = max(batch, min(ev.left, 8 * batch))
        current = _policy_round(problem, ev, current, devices, batch_size, cost, w, rng,
                                int(round_budget * policy_share), batch, learning_rate)
        current = _local_search(problem, ev, current, devices, batch_size, cost)
        stuck = stuck + 1 if ev.evaluated == before else 0
        if stuck > MAX_STUCK:
            break  # the kicks only reach states already simulated
        # A local optimum: kick the best state by a few random moves and climb again (iterated local search).
        current = _kick(problem, ev, devices, batch_size, cost, rng, 1 + stuck % 3) or ev.best
    best = ev.best
    return PipelineSearchResult(
        best.state if best is not None else None, best.state.pipelines(problem) if best is not None else (),
        best.step_time if best is not None else math.inf, ev.evaluated, dict(ev.phase_evaluated),
        list(ev.improvements), list(ev.history), time.perf_counter() - ev.start, ev.best_phase, seeds,
        {r: (e.state, e.step_time) for r, e in sorted(ev.best_by_replicas.items())})


def _policy_round(problem: PlacementProblem, ev: _Evaluator, current: Evaluation, devices: list[int],
                  batch_size: int | None, cost: np.ndarray, w: np.ndarray, rng: np.random.Generator, budget: int,
                  batch: int, lr: float) -> Evaluation:
    """REINFORCE over move features from ``current``, ``budget`` simulations at most; returns
    where the walk ended (the best proposal that improved on its point, round after round)."""
    spent = 0
    while spent < budget and ev.left > 0:
        moves = neighbours(current.state, devices, batch_size, cost)
        if not moves:
            break
        feats = move_features(moves, current, problem)
        logits = feats @ w
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = min(batch, len(moves))
        # k distinct moves drawn by the policy (Gumbel top-k sampling of the softmax)
        gumbel = logits - np.log(-np.log(rng.uniform(size=len(moves)).clip(1e-300, 1.0)))
        picked = np.argsort(-gumbel, kind="stable")[:k]
        rewards = np.zeros(k)
        before = ev.evaluated
        found: Evaluation | None = None
        for i, j in enumerate(picked):
            e = ev(moves[j].state, POLICY)
            if e is None or not e.fits:
                rewards[i] = -1.0
            else:
                rewards[i] = (current.step_time - e.step_time) / current.step_time
                if e.step_time < current.step_time and (found is None or e.step_time < found.step_time):
                    found = e
        spent += ev.evaluated - before
        adv = rewards - rewards.mean()
        mean_f = p @ feats
        w += lr * (adv[:, None] * (feats[picked] - mean_f[None, :])).sum(axis=0) / k
        if found is not None:
            current = found
        elif ev.evaluated == before:
            break  # the policy only proposed states already seen
    return current


def _local_search(problem: PlacementProblem, ev: _Evaluator, current: Evaluation, devices: list[int],
                  batch_size: int | None, cost: np.ndarray) -> Evaluation:
    """Best improvement over every move of ``current`` until none improves; returns the optimum."""
    while ev.left > 0:
        nxt = current
        for mv in neighbours(current.state, devices, batch_size, cost):
            e = ev(mv.state, LOCAL)
            if e is not None and e.fits and e.step_time < nxt.step_time * (1 - 1e-9):
                nxt = e
            if ev.left <= 0:
                break
        if nxt is current:
            break
        current = nxt
    return current


def _kick(problem: PlacementProblem, ev: _Evaluator, devices: list[int], batch_size: int | None,
          cost: np.ndarray, rng: np.random.Generator, steps: int) -> Evaluation | None:
    """The best state moved by ``steps`` random moves, simulated (None: it does not fit)."""
    if ev.best is None:
        return None
    state = ev.best.state
    for _ in range(steps):
        moves = neighbours(state, devices, batch_size, cost)
        if not moves:
            break
        state = moves[int(rng.integers(len(moves)))].state
    e = ev(state, LOCAL)
    return e if e is not None and e.fits else None
