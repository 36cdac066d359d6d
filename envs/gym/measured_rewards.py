"""The reward modes that run placements for real: ``measured`` and ``hybrid``.

See :mod:`envs.gym.rewards` for the reward itself and the ``simulated`` mode.

* :class:`MeasuredReward`: every placement goes through a *measurer*, any object with
  ``measure(placement: dict[node, device]) -> result`` where the result has ``step_time``,
  ``valid`` and ``reason`` (:class:`envs.runtime.measure.Measurer` is one). Results are cached by
  placement row; a run that fails or raises earns the invalid penalty (a bad request —
  a :class:`~graphs.errors.PlacerError` — is re-raised). The reference time is measured.
* :class:`HybridReward`: simulated rewards; every ``measure_every`` evaluated placements
  (or only when :meth:`HybridReward.measure_best` is called, with ``measure_every=None``)
  the ``measure_top_k`` best not-yet-measured candidates are measured, and from three valid
  measurements on the simulator is recalibrated with
  :func:`envs.sim.calibration.calibrate_simulator` (per-device compute scales, link scales, a step
  overhead). The reference, the candidate pool and later rewards use the calibrated simulator.

**Optional measurer methods.** A measurer that also has ``measure_many(placements) ->
[result]`` is given every not-yet-measured placement of a batch in one call (a measurer
whose start-up is expensive — worker processes — runs them in one job). A measurer with
``attach(reward_model)`` is handed the reward model that uses it, once, when the model is
built: whoever made the measurer (``placer.optimize``) can then read the measurements and
calibration, and schedule :meth:`HybridReward.measure_best` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.gym.config import EnvConfigError, positive_int
from envs.gym.rewards import Evaluation, RewardModel, simulate_rows
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError


class MeasuredReward(RewardModel):
    """Rewards from real step times, measured one placement at a time through ``measurer``."""

    mode = "measured"

    def __init__(self, problem: PlacementProblem, measurer: Any, reference: Any = "single",
                 invalid_penalty: float | None = None) -> None:
        if measurer is None or not callable(getattr(measurer, "measure", None)):
            raise EnvConfigError(
                "reward modes 'measured' and 'hybrid' need measurer= an object with "
                ".measure(placement dict) -> result(step_time, valid, reason), e.g. envs.runtime.measure.Measurer"
            )
        self.measurer = measurer
        self._cache: dict[bytes, tuple[float, bool, str]] = {}
        super().__init__(problem, reference, invalid_penalty)
        attach = getattr(measurer, "attach", None)
        if callable(attach):
            attach(self)

    def measure_row(self, row: np.ndarray) -> tuple[float, bool, str]:
        """(step time, valid, reason) of one placement row, measured once and cached."""
        return self.measure_rows(np.asarray(row)[None])[0]

    def measure_rows(self, rows: np.ndarray) -> list[tuple[float, bool, str]]:
        """(step time, valid, reason) per row; each distinct row is measured once, ever.

        Rows not measured before go to the measurer's ``measure_many`` in one call when it
        has one, else to ``measure`` one by one.
        """
        keys = [np.ascontiguousarray(r, dtype=np.int64).tobytes() for r in rows]
        todo: dict[bytes, np.ndarray] = {}
        for key, row in zip(keys, rows):
            if key not in self._cache and key not in todo:
                todo[key] = row
        if todo:
            many = getattr(self.measurer, "measure_many", None)
            if callable(many):
                self._measure_together(many, todo)
            else:
                for key, row in todo.items():
                    self._measure_together(lambda ps: [self.measurer.measure(ps[0])], {key: row})
        return [self._cache[k] for k in keys]

    def _measure_together(self, many: Any, todo: dict[bytes, np.ndarray]) -> None:
        placements = [self.problem.array_to_placement(r) for r in todo.values()]
        try:
            results = list(many(placements))
            if len(results) != len(placements):
                raise RuntimeError(f"the measurer returned {len(results)} results for {len(placements)} placements")
        except PlacerError:
            raise  # a bad request (unknown node or device) is the caller's error
        except Exception as exc:  # noqa: BLE001 - a failing run must never crash the search
            failed = (math.inf, False, f"measurement failed: {type(exc).__name__}: {exc}")
            for key in todo:
                self._cache[key] = failed
            return
        for key, result in zip(todo, results):
            self._cache[key] = measure_outcome(result)

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


def measure_outcome(result: Any) -> tuple[float, bool, str]:
    """(step time, valid, reason) of a measurer's result; invalid unless a positive finite time."""
    t = float(getattr(result, "step_time", math.inf))
    valid = bool(getattr(result, "valid", math.isfinite(t))) and math.isfinite(t) and t > 0
    reason = str(getattr(result, "reason", "") or "")
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
        calibrations: how many times the simulator was recalibrated.
    """

    mode = "hybrid"
    #: Valid measurements needed before calibrating (calibrate_simulator's minimum).
    MIN_MEASUREMENTS = 3

    def __init__(self, problem: PlacementProblem, measurer: Any, reference: Any = "single",
                 invalid_penalty: float | None = None, measure_every: int | None = 256, measure_top_k: int = 2,
                 pool_size: int = 16) -> None:
        # None: no automatic rounds; the owner calls measure_best() on its own schedule.
        self.measure_every = None if measure_every is None else positive_int("measure_every", measure_every)
        self.measure_top_k = positive_int("measure_top_k", measure_top_k)
        self.pool_size = max(positive_int("pool_size", pool_size), self.measure_top_k)
        self.calibration: Any = None
        self.calibrations = 0
        self.measurements: list[tuple[np.ndarray, float, bool, str]] = []
        self._pool: dict[bytes, _Candidate] = {}
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
        """Measure the best unmeasured candidates now, recalibrate if possible; returns how many were measured."""
        todo = sorted((c for c in self._pool.values() if not c.measured), key=lambda c: c.sim_time)
        todo = todo[: self.measure_top_k]
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
        from envs.sim.calibration import CalibrationError, calibrate_simulator

        try:
            cal = calibrate_simulator(self.problem, np.stack([r for r, _ in good]), [t for _, t in good])
        except CalibrationError:
            return  # e.g. degenerate data; keep the current simulator
        self.calibration = cal
        self._calibrated_problem = cal.apply(self.problem)
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
