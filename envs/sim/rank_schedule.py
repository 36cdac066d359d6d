"""What the rank simulator (:mod:`envs.sim.ranks`) returns for one placement: the step time,
each rank's end and busy time, its plan and, when traced, every host-thread interval and message.

The result types stand apart from the engine that fills them so that their readers (the
op-level simulator's rank path, the calibration's counts, the Gantt chart) import them
without the event loop, the program builder or the batch simulator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from envs.sim.rank_plan import RankPlan

__all__ = ["RankEvent", "RankMessage", "RankSchedule", "runnable_times"]


@dataclass
class RankEvent:
    """One interval on a rank's host thread: an op's forward/backward/update, or an overhead."""

    rank: int
    kind: str  # "fwd", "bwd", "opt", "stage", "send", "recv", "wait", "loss", "step"
    name: str
    start: float
    end: float


@dataclass
class RankMessage:
    """One message (a tensor leaf of a value, or of its gradient) between two ranks."""

    value: str
    src: int
    dst: int
    grad: bool
    nbytes: float
    posted: float = math.nan
    issued: float = math.nan
    start: float = math.nan
    arrival: float = math.nan


@dataclass
class RankSchedule:
    """Result of :func:`simulate_ranks`."""

    step_time: float
    rank_end: list[float]
    busy: list[float]  # seconds each rank's thread computes or pays overheads (not waiting)
    plan: RankPlan
    events: list[RankEvent] = field(default_factory=list)
    messages: list[RankMessage] = field(default_factory=list)

    def event(self, name: str, kind: str = "fwd") -> RankEvent:
        """The first event of ``kind`` named ``name`` (an op's forward by default)."""
        for e in self.events:
            if e.name == name and e.kind == kind:
                return e
        raise KeyError(f"no {kind} event named {name!r}")


def runnable_times(schedules: Sequence[RankSchedule]) -> np.ndarray:
    """Step times, infinite for a cut the runtime refuses: it never completes a step."""
    return np.array([s.step_time if s.plan.refusal is None else math.inf for s in schedules])
