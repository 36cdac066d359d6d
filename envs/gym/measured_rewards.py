"""The reward modes that run placements for real: ``measured`` and ``hybrid``.

See :mod:`envs.gym.rewards` for the reward itself and the ``simulated`` mode.

* :class:`MeasuredReward`: every placement goes through a *measurer*, an
  :class:`envs.runtime.measurer.Measurer`: ``measure(placements) -> [MeasureResult]``, called
  once per evaluated batch with the batch's distinct placements (the measurer's cache
  answers those it ran before). A run that fails or raises earns the invalid penalty (a
  bad request — a :class:`~graphs.errors.PlacerError` — is re-raised). The reference time
  is measured.
* :class:`HybridReward`: simulated rewards; every ``measure_every`` evaluated placements
  (or only when :meth:`HybridReward.measure_best` is called, with ``measure_every=None``)
  the ``measure_top_k`` best not-yet-measured candidates are measured, and from three valid
  measurements on the simulator is recalibrated with
  :func:`envs.sim.calibration.calibrate_simulator` (per-device compute scales, link scales, a step
  overhead). The reference, the candidate pool and later rewards use the calibrated simulator
  — once a fit predicts measurements left out of it better than the profile does
  (:func:`envs.sim.calibration.cross_validated`); a fit that does not is set aside, and the
  rewards stay on (or go back to) the uncalibrated simulator.

Whoever needs the hybrid reward's measurements or calibration, or schedules its
:meth:`HybridReward.measure_best` (``placer``'s hybrid rounds), holds the reward model
itself; the measurer knows nothing of the reward models that call it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.gym.config import EnvConfigError, positive_int
from envs.gym.rewards import Evaluation, RewardModel, simulate_rows
from envs.runtime.measurer import Measurer, MeasureResult, program_key
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError

log = logging.getLogger(__name__)


class MeasuredReward(RewardModel):
    """Rewards from real step times, measured one placement at a time through ``measurer``."""

    mode = "measured"

    def __init__(self, problem: PlacementProblem, measurer: Measurer | None, reference: Any = "single",
                 invalid_penalty: float | None = None) -> None:
        if not isinstance(measurer, Measurer):
            raise EnvConfigError(
                "reward modes 'measured' and 'hybrid' need measurer= an envs.runtime.measurer.Measurer "
                "(.measure(placements) -> [MeasureResult], .close()), e.g. envs.runtime.measure.SingleProcessMeasurer; "
                f"got {type(measurer).__name__}"
            )
        self.measurer = measurer
        super().__init__(problem, reference, invalid_penalty)

    def measure_row(self, row: np.ndarray) -> tuple[float, bool, str]:
        """(step time, valid, reason) of one placement row."""
        return self.measure_rows(np.asarray(row)[None])[0]

    def measure_rows(self, rows: np.ndarray) -> list[tuple[float, bool, str]]:
        """(step time, valid, reason) per row, from one measurer call with the distinct rows.

        A failed call (the measurer raised) makes every row of the call invalid with the
        reason; a bad request (a :class:`~graphs.errors.PlacerError`) is re-raised.
        """
        distinct: dict[bytes, np.ndarray] = {}
        keys = [np.ascontiguousarray(r, dtype=np.int64).tobytes() for r in rows]
        for key, row in zip(keys, rows):
            distinct.setdefault(key, row)
        placements = [self.problem.array_to_placement(r) for r in distinct.values()]
        try:
            results = list(self.measurer.measure(placements))
            if len(results) != len(placements):
                raise RuntimeError(f"the measurer returned {len(results)} results for {len(placements)} placements")
            outcomes = dict(zip(distinct, (measure_outcome(r) for r in results)))
        except PlacerError:
            raise  # a bad request (unknown node or device) is the caller's error
        except Exception as exc:  # noqa: BLE001 - a failing run must never crash the search
            failed = (math.inf, False, f"measurement failed: {type(exc).__name__}: {exc}")
            outcomes = dict.fromkeys(distinct, failed)
        return [outcomes[k] for k in keys]

    def _measure_reference(self, row: np.ndarray) -> tuple[float, bool, str]:
        try:
            return self.measure_row(row)
        except EnvConfigError:
            raise
        except PlacerError as exc:  # e.g. a cluster device with no real torch device to run on
            raise EnvConfigError(f"cannot measure the reference placement: {exc}") from exc

    def _reference_time_of(self, row: np.ndarray) -> float:
        t, valid, reason = self._measure_reference(row)
        if not valid:
            raise EnvConfigError(f"the reference placement failed when measured ({reason}); pass another reference")
        return t

    def _single_reference(self) -> tuple[float, np.ndarray]:
        # Measure single-device placements in simulated order until one runs.
        reasons = []
        for dev in self.single_device_order():
            row = np.full(self.problem.num_nodes, dev, dtype=np.int64)
            t, valid, reason = self._measure_reference(row)
            if valid:
                return t, row
            reasons.append(f"{self.problem.device_names[dev]}: {reason}")
        raise EnvConfigError("no single-device placement ran when measured (" + "; ".join(reasons)
                             + "); pass reference= a step time in seconds")

    def _evaluate(self, rows: np.ndarray) -> Evaluation:
        sim = simulate_rows(self.problem, rows)  # memory figures for info
        measured = self.measure_rows(rows)  # new rows in one measurer call
        step = np.array([m[0] for m in measured], dtype=np.float64)
        valid = np.array([m[1] for m in measured], dtype=bool)
        return Evaluation(rows, step, sim.peak_memory, sim.over_memory, valid.copy(), valid,
                          self.rewards(step, valid), ("measured",) * rows.shape[0],
                          tuple(m[2] for m in measured))


def measure_outcome(result: MeasureResult) -> tuple[float, bool, str]:
    """(step time, valid, reason) of a measurer's result; invalid unless a positive finite time."""
    t = float(result.step_time)
    valid = bool(result.valid) and math.isfinite(t) and t > 0
    reason = str(result.reason or "")
    if not valid and not reason:
        reason = f"measurement invalid (step time {t})"
    return t, valid, "" if valid else reason


@dataclass
class _Candidate:
    row: np.ndarray
    sim_time: float
    measured: bool = False


class HybridReward(MeasuredReward):
    """Simulated rewards; the best candidates are measured now and then and the simulator
    recalibrated from all valid measurements so far.

    Attributes:
        measurements: list of ``(row, step_time, valid, reason)`` in measuring order.
        calibration: the latest :class:`envs.sim.calibration.Calibration`, or None.
        calibrations: how many times the simulator's scale changed (a fit taken, or a fit
            set aside after an earlier one was taken).
        calibrations_set_aside: fits that predicted left-out measurements no better than the
            uncalibrated simulator (:func:`envs.sim.calibration.cross_validated`).
    """

    mode = "hybrid"
    #: Valid measurements needed before calibrating (calibrate_simulator's minimum).
    MIN_MEASUREMENTS = 3

    def __init__(self, problem: PlacementProblem, measurer: Measurer | None, reference: Any = "single",
                 invalid_penalty: float | None = None, measure_every: int | None = 256, measure_top_k: int = 2,
                 pool_size: int = 16) -> None:
        # None: no automatic rounds; the owner calls measure_best() on its own schedule.
        self.measure_every = None if measure_every is None else positive_int("measure_every", measure_every)
        self.measure_top_k = positive_int("measure_top_k", measure_top_k)
        self.pool_size = max(positive_int("pool_size", pool_size), self.measure_top_k)
        self.calibration: Any = None
        self.calibrations = 0
        self.calibrations_set_aside = 0
        self.measurements: list[tuple[np.ndarray, float, bool, str]] = []
        self._pool: dict[bytes, _Candidate] = {}
        self._programs: set[tuple[tuple[str, str], ...]] = set()  # programs measured (program_key)
        self._since_measure = 0
        self._calibrated_problem: PlacementProblem | None = None
        super().__init__(problem, measurer, reference, invalid_penalty)

    # Hybrid rewards are simulated, so is the reference: not measured as in MeasuredReward.
    _reference_time_of = RewardModel._reference_time_of
    _single_reference = RewardModel._single_reference

    @property
    def sim_problem(self) -> PlacementProblem:
        return self._calibrated_problem if self._calibrated_problem is not None else self.problem

    @property
    def sim_overhead(self) -> float:
        return float(self.calibration.overhead_s) if self.calibration is not None else 0.0

    def _evaluate(self, rows: np.ndarray) -> Evaluation:
        ev = self.simulate(rows)
        self._remember(rows, ev)
        self._since_measure += rows.shape[0]
        if self.measure_every is not None and self._since_measure >= self.measure_every:
            self._since_measure = 0
            self.measure_best()
        return ev

    def _remember(self, rows: np.ndarray, ev: Evaluation) -> None:
        """Keep the ``pool_size`` fastest valid candidates seen (measured ones stay, to avoid re-measuring)."""
        valid = np.flatnonzero(ev.valid)
        # Only this batch's pool_size fastest *distinct* placements can enter the pool (a
        # converging policy repeats its favourite, which must not crowd out the runners-up).
        entered = 0
        for b in valid[np.argsort(ev.step_time[valid], kind="stable")]:
            key = rows[b].tobytes()
            if key in self._pool:
                continue
            self._pool[key] = _Candidate(rows[b].copy(), float(ev.step_time[b]))
            entered += 1
            if entered == self.pool_size:
                break
        unmeasured = sorted((c for c in self._pool.values() if not c.measured), key=lambda c: c.sim_time)
        for c in unmeasured[self.pool_size:]:
            del self._pool[c.row.tobytes()]

    def measure_best(self) -> int:
        """Measure the best unmeasured candidates now, recalibrate if possible; returns how many were measured.

        Candidates are distinct programs (:func:`envs.runtime.measurer.program_key`): one
        that runs the program of a measured or a chosen candidate is passed over, so a
        round does not spend a run on a twin.
        """
        todo: list[_Candidate] = []
        for cand in sorted((c for c in self._pool.values() if not c.measured), key=lambda c: c.sim_time):
            if len(todo) == self.measure_top_k:
                break
            key = program_key(self.measurer, self.problem.array_to_placement(cand.row))
            cand.measured = key in self._programs  # its twin's figure is the program's
            if not cand.measured:
                self._programs.add(key)
                todo.append(cand)
        if todo:
            outcomes = self.measure_rows(np.stack([c.row for c in todo]))  # one measurer call
            for cand, (t, valid, reason) in zip(todo, outcomes):
                cand.measured = True
                self.measurements.append((cand.row, t, valid, reason))
        if todo:
            self._recalibrate()
        return len(todo)

    def _recalibrate(self) -> None:
        good = [(r, t) for r, t, v, _ in self.measurements if v]
        if len(good) < self.MIN_MEASUREMENTS:
            return
        from envs.sim.calibration import CalibrationError, calibrate_simulator, cross_validated

        rows, times = np.stack([r for r, _ in good]), [t for _, t in good]
        cal: Any
        try:
            cv = cross_validated(self.problem, rows, times)
            if cv is None:
                # Too few distinct placements to leave some out: a fit of five knobs to three runs
                # predicted the next placements 132% off where the profile was 33% (an SN-GAN
                # discriminator over cpu:0,cpu:1): keep the current simulator until it can be checked.
                return
            cal = calibrate_simulator(self.problem, rows, times)
        except CalibrationError:
            return  # e.g. degenerate data; keep the current simulator
        if cv["calibrated"] >= cv["uncalibrated"]:
            self.calibrations_set_aside += 1
            log.info("calibration from %d measurements set aside: it predicts measurements left out of it "
                     "%.1f%% off, the uncalibrated simulator %.1f%%", len(good), 100 * cv["calibrated"],
                     100 * cv["uncalibrated"])
            if self.calibration is None:
                return
            cal = None
        self.calibration = cal
        self._calibrated_problem = cal.apply(self.problem) if cal is not None else None
        self.calibrations += 1
        # The reference is re-simulated on the calibrated simulator (a time in seconds stays).
        self.reference_time, self.reference_placement = self._resolve_reference(self._reference_spec)
        self.sim_reference_time = self._sim_reference_time()
        if self._user_penalty is None:
            # Keep the penalty below every valid reward on the recalibrated scale.
            self.invalid_penalty = min(self.invalid_penalty, self._resolve_penalty(None))
        if self._pool:
            cands = list(self._pool.values())
            times = simulate_rows(self.sim_problem, np.stack([c.row for c in cands])).step_time + self.sim_overhead
            for c, t in zip(cands, times):
                c.sim_time = float(t)
