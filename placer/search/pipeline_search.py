"""Searching pipelines: stage boundaries, stage -> device, micro-batches, schedule and replicas.

The placement search (:mod:`placer.search.search`) moves groups between devices; a pipeline
is a different object, so it has its own search here, over :class:`PipelineState`:

* the stage **boundaries**, positions in the problem's fixed topological order of the groups
  (``problem.node_names``; group edges only run forward in it, so every cut is a valid
  pipeline: :class:`envs.sim.pipeline_layout.Pipeline` stages are contiguous);
* the **device** of every stage of every replica (the accelerators, else every device);
* ``M`` from the divisors of the (replica's) batch, and the **schedule** (``gpipe``, ``1f1b``,
  ``interleaved_1f1b`` with two stages per device);
* the number of data-parallel **replicas** ``R``: ``R`` copies of the pipeline, each on its own
  devices with ``1/R`` of the batch, gradients all-reduced per stage
  (:func:`envs.sim.hybrid.simulate_hybrid`). A state always has at least two stages:
  one stage on every device is DDP itself, which the comparison table shows as its own row,
  not as something the search found.

The states, their moves and the moves' features are :mod:`placer.search.pipeline_moves`.
Every simulated state counts one placement of the budget, the seeds included; a state seen
before is not simulated again.

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

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from envs.sim.hybrid import HybridResult, simulate_hybrid
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.rank_costs import RankCosts
from envs.sim.stage_costs import fast_stage_costs
from placer.search.baselines.common import NoFit, node_cost
from placer.search.baselines.pipeline_split import PARTITIONERS, pipeline_devices
from placer.search.pipeline_moves import (
    NUM_FEATURES,
    SCHEDULES,
    Evaluation,
    Move,
    PipelineState,
    balanced_bounds,
    layouts,
    microbatch_choices,
    move_features,
    nearest_microbatches,
    neighbours,
)
from placer.search.tracker import SEEDS, Improvement, credit

__all__ = ["PipelineSearchResult", "search_pipeline", "DEFAULT_PIPELINE_PLACEMENTS"]

#: Placements (simulated pipelines) a search evaluates when the caller gives no budget.
DEFAULT_PIPELINE_PLACEMENTS = 600
#: Partitioner pipelines simulated as seeds (the best by the bubble estimate, :func:`_seed_states`).
SEED_COUNT = 4
#: Kicks in a row that reach only simulated states before the search gives up its budget.
MAX_STUCK = 30
#: Phase names (those of :mod:`placer.search.tracker`).
POLICY = "policy_moves"
LOCAL = "local_search"


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
    if any(d not in names for r in pipe.replica_devices for d in r):
        return None
    return PipelineState(tuple(bounds), tuple(tuple(names.index(d) for d in r) for r in pipe.replica_devices),
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
                 count: int, min_samples: int = 1) -> list[tuple[str, PipelineState]]:
    """The partitioners' pipelines over all devices at every allowed ``M`` (1F1B where it may
    run, else GPipe), ranked by :func:`_estimate`: the ``count`` best are the seeds (only they
    are simulated, so they cost ``count`` of the budget)."""
    s_ = len(devices)
    ranked: list[tuple[float, str, PipelineState]] = []
    for m in microbatch_choices(batch_size, 1, min_samples):
        schedule = "1f1b" if m >= s_ else "gpipe"
        for name in ("pipedream_dp", "even_layers", "even_params"):
            try:
                pipe = PARTITIONERS[name](problem, m, schedule, devices, costs)
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
                    policy_share: float = 0.5, initial: Sequence[Pipeline] = (), seeded: bool = True,
                    local_search: bool = True, min_samples: int = 1) -> PipelineSearchResult:
    """Search pipelines (and pipeline x data-parallel hybrids) of ``problem`` (module doc).

    Args:
        problem: the compiled problem (its ``node_names`` a topological order of the groups).
        batch_size: the training batch; ``M`` and the replicas must divide it (None: ``M = 1``).
        budget: simulated states in all, seeds included (``optimize`` gives its placement budget,
            else :data:`DEFAULT_PIPELINE_PLACEMENTS`).
        seed: seeds the policy's sampling.
        costs: host constants of CPU processes (:class:`envs.sim.rank_costs.RankCosts`).
        batch: proposals the policy makes per round.
        learning_rate: the policy's REINFORCE step size.
        policy_share: the share of each round's budget the policy gets before local search.
        initial: pipelines over ``problem.node_names`` to start from (a resumed run's), simulated
            first as seeds; those the search cannot represent are skipped.
        seeded: start from the partitioners' pipelines (phase ``seeds``); False starts from one
            stage per device cut by group count, ``M = 1`` (the ablation's "from scratch"), and
            from the balanced layouts only if that does not fit.
        local_search: run local search and its kicks after each policy round; False leaves the
            whole budget to the policy (with ``policy_share=0``: local search alone). The
            ablation benchmark (``benchmarks/bench_pipeline.py --ablation``) switches these.
        min_samples: the fewest samples a micro-batch (of a replica) may have: the model does
            not run on fewer (e.g. batch norm on one sample, found by the micro-batch profile).

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
    # Memoized for this search: the moves depend on the state alone, and the rounds ask again for
    # the same few states (each round's start, the local optimum, the best state kicked): 596
    # distinct states among 4,977 calls, most of the search's time, on zoo:gpt2 at 5,000 pipelines.
    # The lists are shared: nobody changes them.
    moves_of = functools.lru_cache(maxsize=None)(
        functools.partial(neighbours, devices=devices, batch_size=batch_size, cost=cost, min_samples=min_samples))
    given = [("initial", st) for st in (_state_of(problem, p) for p in initial)
             if st is not None and st.valid(batch_size, min_samples)]
    partitioned = _seed_states(problem, batch_size, devices, costs, SEED_COUNT, min_samples) if seeded else []
    for name, st in given + partitioned:
        e = ev(st, SEEDS)
        if e is not None and e.fits:
            seeds[name] = min(seeds.get(name, math.inf), e.step_time)
    if not seeded and not given:
        # From scratch: one stage per device, cut by group count (no costs), one micro-batch.
        n, s_ = len(problem.node_names), len(devices)
        if n >= s_:
            ev(PipelineState(tuple(round(i * n / s_) for i in range(s_ + 1)), (tuple(devices),), 1, "gpipe"), SEEDS)
    if ev.best is None:  # nothing fits yet: start from the balanced layouts
        for r2, s2 in layouts(len(devices)):
            nb = balanced_bounds(cost, s2)
            picked = nearest_microbatches(microbatch_choices(batch_size, r2, min_samples), 4 * s2, s2, "1f1b")
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
        share = policy_share if local_search else 1.0
        current = _policy_round(problem, ev, current, moves_of, w, rng, int(round_budget * share), batch,
                                learning_rate)
        if local_search:
            current = _local_search(ev, current, moves_of)
        stuck = stuck + 1 if ev.evaluated == before else 0
        if stuck > MAX_STUCK:
            break  # the kicks (or the policy alone) only reach states already simulated
        if local_search:
            # A local optimum: kick the best state by a few random moves and climb again (iterated local search).
            current = _kick(ev, moves_of, rng, 1 + stuck % 3) or ev.best
        else:
            current = ev.best
    best = ev.best
    return PipelineSearchResult(
        best.state if best is not None else None, best.state.pipelines(problem) if best is not None else (),
        best.step_time if best is not None else math.inf, ev.evaluated, dict(ev.phase_evaluated),
        list(ev.improvements), list(ev.history), time.perf_counter() - ev.start, ev.best_phase, seeds,
        {r: (e.state, e.step_time) for r, e in sorted(ev.best_by_replicas.items())})


def _policy_round(problem: PlacementProblem, ev: _Evaluator, current: Evaluation,
                  moves_of: Callable[[PipelineState], list[Move]], w: np.ndarray, rng: np.random.Generator,
                  budget: int, batch: int, lr: float) -> Evaluation:
    """REINFORCE over move features from ``current``, ``budget`` simulations at most; returns
    where the walk ended (the best proposal that improved on its point, round after round)."""
    spent = 0
    while spent < budget and ev.left > 0:
        moves = moves_of(current.state)
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


def _local_search(ev: _Evaluator, current: Evaluation, moves_of: Callable[[PipelineState], list[Move]]) -> Evaluation:
    """Best improvement over every move of ``current`` until none improves; returns the optimum."""
    while ev.left > 0:
        nxt = current
        for mv in moves_of(current.state):
            e = ev(mv.state, LOCAL)
            if e is not None and e.fits and e.step_time < nxt.step_time * (1 - 1e-9):
                nxt = e
            if ev.left <= 0:
                break
        if nxt is current:
            break
        current = nxt
    return current


def _kick(ev: _Evaluator, moves_of: Callable[[PipelineState], list[Move]], rng: np.random.Generator,
          steps: int) -> Evaluation | None:
    """The best state moved by ``steps`` random moves, simulated (None: it does not fit)."""
    if ev.best is None:
        return None
    state = ev.best.state
    for _ in range(steps):
        moves = moves_of(state)
        if not moves:
            break
        state = moves[int(rng.integers(len(moves)))].state
    e = ev(state, LOCAL)
    return e if e is not None and e.fits else None
