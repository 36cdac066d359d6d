"""Hybrid mode's measurement rounds: the search callback that measures the best simulated candidates.

In ``hybrid`` mode the simulator scores every placement; :class:`HybridRounds`, the search's
progress callback, owns the :class:`~envs.gym.measured_rewards.HybridReward` the search runs
on (``env_kwargs={"reward_mode": rounds.reward_model}``), measures its best simulated
candidates at set points of the budget through the
:class:`~placer.measuring.measurer.PlacementMeasurer` and lets it recalibrate the simulator
from all measurements so far (:mod:`envs.sim.calibration`), so the rest of the search runs on
the recalibrated simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from envs.gym.measured_rewards import HybridReward
from placer.measuring.measurer import MeasuredPlacement, PlacementMeasurer
from placer.search.budget import Budget

#: Hybrid: measurement rounds during the search (the first right after the seeds are scored).
#: Starting measuring workers costs seconds (~8 s for two CPU ranks here), timing a
#: candidate milliseconds: few rounds, several candidates each.
HYBRID_ROUNDS = 3
#: Hybrid: candidates measured per round (three valid ones allow the first calibration).
HYBRID_TOP_K = 4
#: Hybrid: after round 0, a round waits while measuring has taken more than this share of
#: the search's wall time. On this loaded 2-core VM one round took 10-30 s, and back-to-back
#: rounds left a 1-minute search 268 simulated placements.
HYBRID_MAX_MEASURING_SHARE = 0.5


@dataclass
class HybridRounds:
    """The search callback of hybrid mode: measurement rounds at fractions of the budget.

    Round k (k = 0 .. rounds-1) is due once ``k / rounds`` of the budget (time or
    placements, whichever is further along) is spent — round 0 right after the seed
    placements are scored — and measures the reward model's ``measure_top_k`` best
    not-yet-measured candidates; the reward model then recalibrates its simulator from all
    valid measurements so far. A later round waits while measuring has taken more than
    ``max_measuring_share`` of the wall time of a time budget, so slow measurements cannot
    starve the search; under a budget counted in placements every round runs. ``on_best(record)`` is called when a round finds a new measured best
    (optimize writes it to disk, so Ctrl-C keeps it).

    The rounds own the hybrid reward model the search runs on, :attr:`reward_model`
    (built here unless one is given; the search gets it as ``env_kwargs={"reward_mode":
    rounds.reward_model}``), and tell the measurer about it (its calibration predicts
    what is measured next).
    """

    measurer: PlacementMeasurer
    budget: Budget
    rounds: int = HYBRID_ROUNDS
    on_best: Callable[[MeasuredPlacement], None] | None = None
    max_measuring_share: float = HYBRID_MAX_MEASURING_SHARE
    log: list[dict[str, Any]] = field(default_factory=list)
    measuring_s: float = 0.0
    reward_model: HybridReward | None = None

    def __post_init__(self) -> None:
        if self.reward_model is None:
            self.reward_model = HybridReward(self.measurer.problem, self.measurer, measure_every=None,
                                             measure_top_k=HYBRID_TOP_K)
        self.measurer.hybrid = self.reward_model

    def __call__(self, progress: Any) -> None:
        done = len(self.log)
        if done >= self.rounds:
            return
        fraction = self._fraction(progress)
        if fraction >= 1.0 or fraction < done / self.rounds:
            return
        if self.log and progress.evaluated <= self.log[-1]["evaluated"]:
            return  # a slow round: let the search run at least one batch on its result
        if self.log and self.budget.seconds is not None and self.measuring_s > self.max_measuring_share * progress.wall_s:
            # measuring already took its share of a time budget: search on. A budget counted in
            # placements holds every round, so the machine's load cannot change how many run.
            return
        self.run_round(f"round {done}", progress.evaluated, progress.wall_s)

    def run_round(self, phase: str, evaluated: int, wall_s: float) -> dict[str, Any]:
        """Measure the best unmeasured candidates of every hybrid reward model now."""
        before = self.measurer.best()
        start = time.perf_counter()
        self.measurer.phase = phase
        assert self.reward_model is not None
        try:
            measured = int(self.reward_model.measure_best())
        finally:
            self.measurer.phase = "search"
        self.measuring_s += time.perf_counter() - start
        cal = self.measurer.calibration()
        best = self.measurer.best()
        entry = {
            "phase": phase, "at_s": round(wall_s, 2), "evaluated": evaluated, "measured": measured,
            "seconds": round(time.perf_counter() - start, 2), "total": len(self.measurer.records),
            "calibrations": self.reward_model.calibrations,
            "before": dict(cal.before) if cal is not None else None,
            "after": dict(cal.after) if cal is not None else None,
            "best_ms": best.step_time * 1e3 if best is not None else None,
        }
        self.log.append(entry)
        if best is not None and best is not before and self.on_best is not None:
            self.on_best(best)
        return entry

    def _fraction(self, progress: Any) -> float:
        parts = []
        if self.budget.seconds is not None:
            parts.append(progress.wall_s / self.budget.seconds)
        if self.budget.placements is not None:
            parts.append(progress.evaluated / self.budget.placements)
        return max(parts) if parts else 0.0
