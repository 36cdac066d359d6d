"""Best-so-far keeping, budgets and stopping rules shared by every agent's search.

A :class:`BestTracker` sees every evaluated batch of placements (whatever produced it:
heuristic seeds, PPO rollouts, REINFORCE samples, sequential episodes).  It keeps the best
placement in memory, writes it to ``out_dir/best_placement.json`` the moment it improves
(atomically, so an interrupted or crashing search leaves its best on disk), records the
search curve, drives the progress bar and the user's callback, and says when to stop:
budget in seconds or in evaluated placements, or a plateau (no improvement in
``patience`` evaluations).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.budget import Budget, parse_budget

#: Relative improvement below which a new step time does not reset the plateau counter.
MIN_RELATIVE_IMPROVEMENT = 1e-6

#: Phase of the initial (heuristic) placements; the gain of a search is measured from its best.
SEEDS = "seeds"
#: The phases whose improvements are the learning policy's: whole placements it sampled or
#: built (``policy``) and the moves it proposed around the incumbent (``policy_moves``).
POLICY_PHASES = ("policy", "policy_moves")


@dataclass(frozen=True)
class Improvement:
    """One improvement of the best placement, and who made it.

    Attributes:
        evaluated: placements evaluated when it was found (its batch included).
        wall_s: seconds into the search.
        phase: the phase whose batch held it (``seeds``, ``policy``, ``policy_moves``,
            ``local_search``, ...): the tracker is told with every batch, so the credit is
            where the placement was produced, not where it was later polished.
        before: the best step time until then (``inf`` for the first fitting placement, or
            when the new best is the first that fits).
        after: the new best step time.
    """

    evaluated: int
    wall_s: float
    phase: str
    before: float
    after: float

    @property
    def gain(self) -> float:
        """Seconds it took off the best step time (0 for a first or first-fitting placement)."""
        return self.before - self.after if math.isfinite(self.before) else 0.0


def credit(improvements: list[Improvement]) -> dict[str, float]:
    """Share of the gain over the seeds found by each phase (the shares sum to 1).

    The gain over the seeds is what every improvement after the best seed took off the step
    time: with no change of reward scale in between it is exactly the best seed's time minus
    the final one. A search without seeds measures from its first fitting placement. Empty when
    nothing improved after the seeds.

    >>> credit([Improvement(3, 0.1, "seeds", math.inf, 10.0), Improvement(9, 0.2, "policy_moves", 10.0, 7.0),
    ...         Improvement(20, 0.3, "local_search", 7.0, 6.0)])
    {'policy_moves': 0.75, 'local_search': 0.25}
    """
    gains: dict[str, float] = {}
    for imp in improvements:
        if imp.phase != SEEDS and imp.gain > 0:
            gains[imp.phase] = gains.get(imp.phase, 0.0) + imp.gain
    total = sum(gains.values())
    return {phase: g / total for phase, g in gains.items()} if total > 0 else {}


@dataclass(frozen=True)
class SearchProgress:
    """What a search's callback is told after every evaluated batch."""

    evaluated: int
    wall_s: float
    best_step_time: float
    best_fits: bool
    best_row: np.ndarray | None


@dataclass
class SearchResult:
    """The outcome of a search.

    Attributes:
        best_row: [N] device indices of the best placement (``problem.node_names`` order).
        best_step_time: its step time in seconds (``inf`` if nothing was evaluated).
        history: ``(wall_s, evaluated, best_step_time)`` at every improvement and at the end.
        evaluated: placements evaluated in all.
        stop_reason: ``"budget_placements"``, ``"budget_seconds"``, ``"plateau"``,
            ``"exhausted"`` (the agent proposes nothing it has not evaluated),
            ``"callback"``, ``"interrupted"``, ``"finished"`` or ``"error"``.
        best_fits: the best placement fits in memory.
        wall_s: seconds the search ran.
        best_path: where the best placement was written, if an ``out_dir`` was given.
        source: ``"simulated"`` or ``"measured"``.
        agent: the agent that ran.
        best_phase: which phase found the best placement: ``"seeds"`` (the initial
            heuristic placements), ``"policy"`` (the agent's samples) or ``"local_search"``
            (the improvement phase, :mod:`placer.search.local_search`).
        phase_evaluated: placements evaluated by each phase.
        improvements: every improvement of the best placement with the phase that made it
            (:class:`Improvement`): the search curve by phase, each on the reward's scale at
            the time it was made.
        rescales: how many times the reward's scale changed during the search (hybrid: the
            simulator recalibrated, :meth:`BestTracker.watch_scale`); ``best_step_time`` is on
            the last scale.
    """

    best_row: np.ndarray | None
    best_step_time: float
    history: list[tuple[float, int, float]]
    evaluated: int
    stop_reason: str
    best_fits: bool = False
    wall_s: float = 0.0
    best_path: Path | None = None
    source: str = "simulated"
    agent: str = ""
    best_phase: str = ""
    phase_evaluated: dict[str, int] = field(default_factory=dict)
    improvements: list[Improvement] = field(default_factory=list)
    rescales: int = 0

    @property
    def seed_step_time(self) -> float:
        """The best seed's step time (``inf`` when the search had no fitting seed)."""
        seeds = [i.after for i in self.improvements if i.phase == SEEDS]
        return min(seeds) if seeds else math.inf

    @property
    def gain_over_seeds(self) -> float:
        """Seconds the phases after the seeds took off the step time (see :func:`credit`)."""
        return sum(i.gain for i in self.improvements if i.phase != SEEDS)

    def credit(self) -> dict[str, float]:
        """Share of the gain over the seeds each phase found (see :func:`credit`)."""
        return credit(self.improvements)

    def policy_share(self) -> float | None:
        """The share of the gain over the seeds found by the policy's phases (None: no gain)."""
        shares = self.credit()
        return sum(shares.get(p, 0.0) for p in POLICY_PHASES) if shares else None

    def time_to_within(self, fraction: float = 0.05) -> float | None:
        """Seconds until the best step time first came within ``fraction`` of the final one."""
        if not self.history or not math.isfinite(self.best_step_time):
            return None
        for wall, _, best in self.history:
            if best <= self.best_step_time * (1.0 + fraction):
                return wall
        return None


class StopSearch(Exception):
    """Raised inside an agent's loop to end the search; ``reason`` goes to the result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


ProgressCallback = Callable[[SearchProgress], "bool | None"]


@dataclass
class BestTracker:
    """Keeps the best placement of a search and decides when the search stops.

    Args:
        problem: the problem being searched.
        budget: a :class:`~placer.search.budget.Budget` or anything :func:`parse_budget` takes.
        patience: stop after this many evaluations without improvement (``None``: never).
        out_dir: directory for ``best_placement.json`` (``None``: keep in memory only).
        callback: called with a :class:`SearchProgress` after each batch; returning
            ``False`` stops the search; exceptions it raises propagate (the best stays on disk).
        fingerprint: model fingerprint written into the placement file.
        expand: maps the problem's ``{node: device}`` to the file's (e.g. groups → ops).
        progress: show a tqdm bar with the best step time.
        agent: the agent's name, for the file's metadata.
        metadata: more of the file's metadata, under the tracker's own (the run's model
            arguments and real devices, which ``placer apply`` reads back).
        on_improve: called as ``on_improve(row, step_time, evaluated)`` on every improvement.

    Rewards whose scale changes during the search (hybrid: the simulator is recalibrated from
    measurements) register with :meth:`watch_scale`.
    """

    problem: PlacementProblem
    budget: Budget | str | int | float
    patience: int | None = None
    out_dir: str | Path | None = None
    callback: ProgressCallback | None = None
    fingerprint: str = ""
    expand: Callable[[dict[str, str]], dict[str, str]] | None = None
    progress: bool = False
    agent: str = ""
    on_improve: Callable[[np.ndarray, float, int], None] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    best_row: np.ndarray | None = field(default=None, init=False)
    best_step_time: float = field(default=math.inf, init=False)
    best_fits: bool = field(default=False, init=False)
    evaluated: int = field(default=0, init=False)
    history: list[tuple[float, int, float]] = field(default_factory=list, init=False)
    best_path: Path | None = field(default=None, init=False)
    best_phase: str = field(default="", init=False)
    phase_evaluated: dict[str, int] = field(default_factory=dict, init=False)
    improvements: list[Improvement] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        # The parsed budget, typed (``budget`` keeps whatever the caller gave, parsed too).
        self.limits: Budget = parse_budget(self.budget)
        self.budget = self.limits
        self._start = time.perf_counter()
        self._last_improvement = 0
        self._bar = None
        self._rescale: tuple[Callable[[], int], Callable[[np.ndarray], tuple[float, bool]]] | None = None
        self._scale_version = 0
        self._rescales = 0
        if self.progress:
            from tqdm.auto import tqdm

            total = self.limits.placements if self.limits.placements is not None else None
            # On a terminal, redraw on every batch (tens of ms at least). Into a file or a
            # pipe (a batch job's log) each redraw is a line of its own: every 30 s at most.
            interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            # A terminal's bar is cleared at the end; a log keeps the last state (its count, not
            # the 0% of its first line).
            self._bar = tqdm(total=total, unit="pl", desc=f"search {self.agent}".strip(), leave=not interactive,
                             mininterval=0 if interactive else 30.0, file=sys.stderr)

    # ------------------------------------------------------------------ queries
    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._start

    def remaining_placements(self) -> int | None:
        """Evaluations left in the budget (``None`` when the budget is time only)."""
        if self.limits.placements is None:
            return None
        return max(self.limits.placements - self.evaluated, 0)

    def stop_reason(self, next_batch: int = 1) -> str | None:
        """Why the search must stop before evaluating ``next_batch`` more placements, or None."""
        if self.limits.placements is not None and self.evaluated + next_batch > self.limits.placements:
            return "budget_placements"
        if self.limits.seconds is not None and self.wall_s >= self.limits.seconds:
            return "budget_seconds"
        if self.patience is not None and self.evaluated - self._last_improvement >= self.patience:
            return "plateau"
        return None

    def check(self) -> None:
        """Raise :class:`StopSearch` when the search must stop (:meth:`stop_reason`), for an
        agent's step that evaluated nothing: :meth:`record` is where the budget is otherwise
        checked, and a step that only repeats placements already evaluated never calls it."""
        reason = self.stop_reason(1)
        if reason is not None:
            raise StopSearch(reason)

    # ------------------------------------------------------------------ updates
    def record(self, rows: np.ndarray, step_time: np.ndarray, fits: np.ndarray, next_batch: int = 1,
               phase: str = "policy") -> None:
        """Account for a batch of evaluated placements [B, N]; raise :class:`StopSearch` when done.

        ``next_batch`` is the size of the batch the caller would evaluate next, so an
        evaluation budget is never overrun; ``phase`` names who produced the batch (kept
        with the best placement and counted per phase).
        """
        rows = np.asarray(rows)
        step_time = np.asarray(step_time, dtype=np.float64).reshape(-1)
        fits = np.asarray(fits, dtype=bool).reshape(-1)
        if len(step_time):
            # A fitting placement beats any that does not fit; then the faster wins.
            key = np.where(fits, step_time, np.inf)
            i = int(np.argmin(key)) if fits.any() else int(np.argmin(step_time))
            self._consider(rows[i], float(step_time[i]), bool(fits[i]), len(step_time), phase)
        self.evaluated += len(step_time)
        self.phase_evaluated[phase] = self.phase_evaluated.get(phase, 0) + len(step_time)
        if self._bar is not None:
            self._bar.set_postfix(best=f"{self.best_step_time * 1e3:.3f} ms", refresh=False)
            self._bar.update(len(step_time))  # draws the bar with the postfix just set
        if self.callback is not None:
            answer = self.callback(SearchProgress(self.evaluated, self.wall_s, self.best_step_time,
                                                  self.best_fits, self.best_row))
            if answer is False:
                raise StopSearch("callback")
        self._follow_rescale()
        reason = self.stop_reason(next_batch)
        if reason is not None:
            raise StopSearch(reason)

    def watch_scale(self, version: Callable[[], int], rescore: Callable[[np.ndarray], tuple[float, bool]]) -> None:
        """Follow a reward whose scale changes: ``version()`` counts the changes so far and
        ``rescore(row)`` gives ``(step_time, fits)`` of a placement on the current scale.

        After every batch whose callback changed the version, the incumbent is re-scored (and
        rewritten to disk), so later placements are compared with it on one scale.
        """
        self._rescale = (version, rescore)
        self._scale_version = version()

    def _follow_rescale(self) -> None:
        """Re-score the incumbent when the reward's scale changed (see :meth:`watch_scale`)."""
        if self._rescale is None:
            return
        version, rescore = self._rescale
        now = version()
        if now == self._scale_version:
            return
        self._scale_version = now
        self._rescales += 1
        if self.best_row is None:
            return
        step_time, fits = rescore(self.best_row)
        self.best_step_time, self.best_fits = float(step_time), bool(fits)
        # The curve shows the jump: the same placement, priced on the new scale.
        self.history.append((self.wall_s, self.evaluated, self.best_step_time))
        if self.out_dir is not None:
            self.best_path = self._write(self.evaluated)

    def _consider(self, row: np.ndarray, step_time: float, fits: bool, batch: int, phase: str) -> None:
        better = (fits and not self.best_fits) or (
            fits == self.best_fits and step_time < self.best_step_time * (1.0 - MIN_RELATIVE_IMPROVEMENT)
        )
        if not better:
            return
        # A first fitting placement replaces a non-fitting one: no time was gained, it now fits.
        before = self.best_step_time if self.best_fits == fits else math.inf
        self.improvements.append(Improvement(self.evaluated + batch, self.wall_s, phase, before, step_time))
        self.best_row = np.array(row, dtype=np.int64, copy=True)
        self.best_step_time = step_time
        self.best_fits = fits
        self.best_phase = phase
        self._last_improvement = self.evaluated + batch
        self.history.append((self.wall_s, self.evaluated + batch, step_time))
        if self.out_dir is not None:
            self.best_path = self._write(self.evaluated + batch)
        if self.on_improve is not None:
            self.on_improve(self.best_row.copy(), step_time, self.evaluated + batch)

    def _write(self, evaluated: int) -> Path:
        from placer.placement_file import Placement
        from placer.write_failure import save_best_so_far

        assert self.best_row is not None and self.out_dir is not None  # written on an improvement, with out_dir
        assignment = self.problem.array_to_placement(self.best_row)
        if self.expand is not None:
            assignment = dict(self.expand(assignment))
        meta = {
            **self.metadata,
            "model": self.problem.name,
            "cluster": self.problem.cluster_name,
            "step_time": self.best_step_time,
            "fits": self.best_fits,
            "source": "simulated" if self.problem.simulated else "measured",
            "evaluated": evaluated,
            "wall_s": round(self.wall_s, 3),
            "agent": self.agent,
            "method": f"placer ({self.agent})" if self.agent else "placer",
            "phase": self.best_phase,
        }
        placement = Placement(assignment=assignment, fingerprint=self.fingerprint,
                              devices=list(self.problem.device_names), metadata=meta)
        # An unwritable out_dir (full disk, made read-only) stops the search with one error,
        # the best placement saved to a fallback file: searching on could not keep its results.
        return save_best_so_far(placement, self.out_dir)

    def close_progress(self) -> None:
        """Close the progress bar (if any): what is printed next starts on a line of its own."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def result(self, stop_reason: str) -> SearchResult:
        """Close the bar and return the :class:`SearchResult`."""
        self.close_progress()
        wall = self.wall_s
        if math.isfinite(self.best_step_time):
            self.history.append((wall, self.evaluated, self.best_step_time))
        return SearchResult(
            best_row=self.best_row,
            best_step_time=self.best_step_time,
            history=list(self.history),
            evaluated=self.evaluated,
            stop_reason=stop_reason,
            best_fits=self.best_fits,
            wall_s=wall,
            best_path=self.best_path,
            source="simulated" if self.problem.simulated else "measured",
            agent=self.agent,
            best_phase=self.best_phase,
            rescales=self._rescales,
            phase_evaluated=dict(self.phase_evaluated),
            improvements=list(self.improvements),
        )
