"""What an optimize run measured, for the report and ``calibration.json``.

:func:`summarize` fits a final calibration on every valid measurement of a
:class:`~placer.measuring.measurer.PlacementMeasurer` and collects the figures into a
:class:`MeasurementSummary`, which optimize's result carries (``result.measurement``) and
the report writes; kept apart from the measurer, which only measures and logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.sim.calibration import Calibration, CalibrationError, agreement, calibrate_simulator
from envs.sim.problem import PlacementProblem
from placer.measuring.measurer import MeasuredPipeline, MeasuredPlacement, PlacementMeasurer


@dataclass
class MeasurementSummary:
    """What was measured in an optimize run, for the report and ``calibration.json``.

    Attributes:
        reward: the reward mode.
        description: how the times were measured.
        records: every run, in order (the final confirmation runs the leading placements again).
        requests: measurements asked for, repeats (answered from the log) included.
        rounds: the hybrid rounds (see :class:`~placer.measuring.hybrid_rounds.HybridRounds`).
        search_calibrations: recalibrations of the simulator during the search.
        calibrations_set_aside: fits of the search that predicted left-out measurements no
            better than the uncalibrated simulator, so were not used.
        calibration: a calibration fitted on all valid measurements at the end (None
            with fewer than three).
        holdout: agreement on placements measured after a calibration predicted them:
            ``{"n", "uncalibrated": {...}, "calibrated": {...}, "predicted_spread"}`` (the
            fastest and slowest prediction's ratio, less 1), or None.
    """

    reward: str
    description: str
    records: list[MeasuredPlacement]
    requests: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    search_calibrations: int = 0
    calibrations_set_aside: int = 0
    calibration: Calibration | None = None
    holdout: dict[str, Any] | None = None
    pipelines: list[MeasuredPipeline] = field(default_factory=list)
    #: Distinct placements among the runs (placements that run one program count once);
    #: None: as many as runs.
    distinct: int | None = None
    #: How far two runs of one placement differ (:func:`repeat_spread`), or None.
    repeats: dict[str, float] | None = None

    @property
    def count(self) -> int:
        """Runs measured."""
        return len(self.records)

    @property
    def placements(self) -> int:
        """Distinct placements measured."""
        return self.count if self.distinct is None else self.distinct

    @property
    def invalid(self) -> int:
        """Measurements that failed (out of memory, crash, time-out)."""
        return sum(not r.valid for r in self.records)

    def to_dict(self, problem: PlacementProblem) -> dict[str, Any]:
        """JSON-friendly form; placements as ``{group: device}``."""
        return {
            "reward": self.reward, "measured_by": self.description, "measurements": self.count,
            "distinct_placements": self.placements, "repeats": self.repeats,
            "invalid": self.invalid, "requests": self.requests, "rounds": self.rounds,
            "search_calibrations": self.search_calibrations,
            "calibrations_set_aside": self.calibrations_set_aside,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "holdout": self.holdout,
            "placements": [
                {"phase": r.phase, "step_time": r.step_time if r.valid else None, "valid": r.valid,
                 "reason": r.reason, "simulated": r.simulated, "predicted": r.predicted,
                 "placement": problem.array_to_placement(r.row)}
                for r in self.records
            ],
            "pipelines": [
                {"method": p.method, "step_time": p.step_time if p.valid else None, "valid": p.valid,
                 "reason": p.reason, "simulated": p.simulated, "pipeline": p.pipeline}
                for p in self.pipelines
            ],
        }


def repeat_spread(runs: Sequence[tuple[object, float]]) -> dict[str, float] | None:
    """How far the last two valid runs of each placement run more than once differ, relative
    to the faster: ``{"n": placements, "median": ..., "max": ..., "shift": ..., "one_way": ...}``,
    or None when none ran twice. ``shift`` is the median signed change from the earlier run to
    the later, relative to the earlier, and ``one_way`` whether every placement moved in that
    direction: then the difference is the machine's state between the jobs (placements run side
    by side in one job share it) more than noise between placements.

    The yardstick for every measured comparison of the run: a gain, or a Spearman over
    placements, smaller than this is the machine's noise.

    >>> repeat_spread([("a", 1.00), ("b", 2.0), ("a", 1.02), ("b", 2.1), ("c", 3.0)])
    {'n': 2, 'median': 0.035, 'max': 0.05, 'shift': 0.035, 'one_way': True}
    """
    by_key: dict[object, list[float]] = {}
    for key, t in runs:
        by_key.setdefault(key, []).append(float(t))
    pairs = [(ts[-2], ts[-1]) for ts in by_key.values() if len(ts) >= 2]
    if not pairs:
        return None
    diffs = [abs(b - a) / min(a, b) for a, b in pairs]
    return {"n": len(diffs), "median": round(float(np.median(diffs)), 6), "max": round(float(max(diffs)), 6),
            "shift": round(float(np.median([b / a - 1 for a, b in pairs])), 6),
            "one_way": all(b > a for a, b in pairs) or all(b < a for a, b in pairs)}


def summarize(measurer: PlacementMeasurer, reward: str, rounds: Sequence[dict[str, Any]] = ()) -> MeasurementSummary:
    """Fit a final calibration on every valid measurement and collect the figures."""
    valid = [r for r in measurer.records if r.valid]
    cal = None
    if len(valid) >= 3:
        try:
            cal = calibrate_simulator(measurer.problem, np.stack([r.row for r in valid]), [r.step_time for r in valid])
        except CalibrationError:
            cal = None  # degenerate data: report the measurements without a calibration
    programs = [measurer.program_of(r.row) for r in measurer.records]
    held = [r for r in valid if r.predicted is not None]
    holdout = None
    if len(held) >= 2:
        meas = [r.step_time for r in held]
        predicted = [float(r.predicted) for r in held if r.predicted is not None]
        holdout = {
            "n": len(held),
            "uncalibrated": agreement([r.simulated for r in held], meas),
            "calibrated": agreement(predicted, meas),
            # How far apart the predictions are: a rank correlation over placements closer
            # than two runs of one placement differ ranks the machine's noise.
            "predicted_spread": max(predicted) / min(predicted) - 1.0,
        }
    return MeasurementSummary(
        reward=reward, description=measurer.description, records=list(measurer.records),
        requests=measurer.requests, rounds=list(rounds),
        search_calibrations=measurer.hybrid.calibrations if measurer.hybrid is not None else 0,
        calibrations_set_aside=measurer.hybrid.calibrations_set_aside if measurer.hybrid is not None else 0,
        calibration=cal, holdout=holdout, pipelines=list(measurer.pipeline_records),
        distinct=len(set(programs)),
        repeats=repeat_spread([(key, r.step_time) for key, r in zip(programs, measurer.records) if r.valid]),
    )
