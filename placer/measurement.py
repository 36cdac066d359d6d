"""Measuring placements while ``optimize`` runs: the ``measured`` and ``hybrid`` reward modes.

The search places *groups* (``problem.node_names``), the devices run *ops*. A
:class:`PlacementMeasurer` sits between the two: it is the :class:`envs.runtime.measurer.Measurer`
the reward model calls (:mod:`envs.gym.measured_rewards`), expands each group placement to
the op placement the backend measurer runs — :class:`envs.runtime.measure.SingleProcessMeasurer`
(one worker process, real devices such as ``cpu,cuda:0``) or
:class:`envs.runtime.distributed.measure.DistributedMeasurer` (one worker per rank device,
``cpu:0,cpu:1``) — measures each distinct placement once, and keeps the log of every
measurement with the simulator's figure beside it (the report's, and what optimize looks
results up in). Every run is bounded by ``--measure-timeout`` and by the run's budget:
:meth:`PlacementMeasurer.set_deadline` cuts a run that would outlast the search.

* ``measured``: the reward model sends every placement the agent proposes here (new ones
  of a batch in one backend call); a failed run (out of memory, a worker that died or
  hung) comes back invalid with its reason and earns the invalid penalty.
* ``hybrid``: the simulator scores every placement; :class:`HybridRounds`, the search's
  progress callback, owns the :class:`~envs.gym.measured_rewards.HybridReward` the search
  runs on (``env_kwargs={"reward_mode": rounds.reward_model}``), measures its best simulated
  candidates at set points of the budget and lets it recalibrate the simulator from all
  measurements so far (:mod:`envs.sim.calibration`), so the rest of the search runs on the
  recalibrated simulator.

Either way optimize measures the best candidates once more at the end
(:func:`confirm_candidates`), and only measured times pick the winner. Pipelined
candidates (the pipeline partitioners' and the pipeline search's rows of the comparison
table) are measured as pipelines, through ``torch.distributed.pipelining``, where the
backend can (:meth:`envs.runtime.distributed.measure.DistributedMeasurer.measure_pipelines`,
worker processes ``cpu:0,cpu:1``): :func:`confirm_pipelines`. Their un-pipelined assignment
is another, slower program (one rank busy at a time), so it never stands in for them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from envs.gym.measured_rewards import HybridReward, measure_outcome
from envs.runtime.measurer import Measurer, MeasureResult
from envs.sim.calibration import Calibration, CalibrationError, agreement, calibrate_simulator
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate_batch
from graphs.errors import PlacerError
from placer.report.compare import Candidate, fastest_first
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
#: Measured mode: placements the agent proposes per batch (each batch is one measuring call).
MEASURED_BATCH = 8
#: Measured mode: behaviour-cloning steps on the best seed before the search. Search's
#: default (50) left a policy that proposed 6 distinct placements in 196 (rnnlm, 6 groups,
#: fake measurements), so a measured budget went on repeats; 20 steps gave 36.
MEASURED_IMITATION_STEPS = 20
#: Candidates measured at the end to confirm the winner.
CONFIRM_TOP = 4
#: Pipelined candidates measured at the end (the fastest simulated; each is one job of
#: its own, seconds of process start-up: ~10 s for two CPU ranks on this loaded machine).
CONFIRM_PIPELINES = 2


@dataclass(frozen=True)
class MeasuredPlacement:
    """One placement run for real.

    Attributes:
        row: [N] device index per group (``problem.node_names`` order).
        step_time: measured seconds (``inf`` when invalid).
        valid: the run succeeded.
        reason: why it is invalid ("" when valid).
        phase: ``"search"``, ``"round k"`` (hybrid) or ``"confirm"`` (after the search).
        simulated: the uncalibrated simulator's step time of the same placement.
        predicted: the calibrated simulator's prediction made before it was measured
            (hybrid, once a calibration exists), else None.
    """

    row: np.ndarray
    step_time: float
    valid: bool
    reason: str
    phase: str
    simulated: float
    predicted: float | None = None


@dataclass(frozen=True)
class MeasuredPipeline:
    """One pipelined candidate run for real as a pipeline.

    Attributes:
        method: the comparison-table method it is the pipeline of.
        pipeline: the pipeline as run (over the ops; :meth:`envs.sim.pipeline_layout.Pipeline.to_dict`).
        step_time: measured seconds (``inf`` when invalid).
        valid: the run succeeded.
        reason: why it is invalid ("" when valid).
        simulated: the simulator's step time of the pipeline (the table's).
    """

    method: str
    pipeline: dict[str, Any]
    step_time: float
    valid: bool
    reason: str
    simulated: float


class PlacementMeasurer:
    """The :class:`~envs.runtime.measurer.Measurer` of group placements a reward model (or optimize) calls.

    Args:
        backend: the measurer of op placements (:class:`~envs.runtime.measurer.Measurer`).
        problem: the group-level problem the placements refer to.
        expand: group placement → op placement (``grouping.expand``).
        description: how the times are measured, for the report.

    Attributes:
        hybrid: the hybrid reward model whose calibration predicts what is measured next
            (set by :class:`HybridRounds`, which owns it), or None.
    """

    def __init__(self, backend: Measurer, problem: PlacementProblem,
                 expand: Callable[[dict[str, str]], Mapping[str, str]], description: str = "") -> None:
        if not isinstance(backend, Measurer):
            raise PlacerError(
                "a measurer needs .measure(placements) -> [MeasureResult] and .close() "
                f"(envs.runtime.measurer.Measurer); got {type(backend).__name__}"
            )
        self.backend, self.problem, self.expand = backend, problem, expand
        self.description = description
        self.phase = "search"
        self.records: list[MeasuredPlacement] = []
        self.requests = 0
        self.hybrid: HybridReward | None = None
        self.deadline: float | None = None
        self._by_key: dict[bytes, MeasuredPlacement] = {}
        #: Pipelined candidates measured as pipelines (:func:`confirm_pipelines`); kept apart
        #: from :attr:`records`, whose rows the calibration fits to the un-pipelined simulator.
        self.pipeline_records: list[MeasuredPipeline] = []

    def set_deadline(self, deadline: float | None) -> None:
        """No run may pass ``deadline`` (``time.monotonic()``; None: only the time-out applies).

        It applies once one valid measurement exists: the first (the measured reward's
        reference, without which no placement can be scored) is bounded by the time-out
        only, so a budget shorter than the workers' start-up still measures something.
        A backend without a ``deadline`` attribute keeps its own time-outs only.
        """
        self.deadline = deadline

    def __enter__(self) -> PlacementMeasurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- the reward model's side
    def measure(self, placements: Sequence[Mapping[str, str]]) -> list[MeasureResult]:
        """Measure group placements; new ones in one backend call, repeats from the log."""
        rows = [self.problem.placement_to_array(dict(p)) for p in placements]
        records = self.measure_rows(np.stack(rows)) if rows else []
        return [MeasureResult(step_time=r.step_time, valid=r.valid, reason=r.reason) for r in records]

    # -------------------------------------------------------------- optimize's side
    def measure_rows(self, rows: np.ndarray) -> list[MeasuredPlacement]:
        """Measure placement rows [B, N]; each distinct row runs once, whatever the phase."""
        rows = self.problem.check_array(np.atleast_2d(rows))
        self.requests += rows.shape[0]
        keys = [r.tobytes() for r in rows]
        new: dict[bytes, np.ndarray] = {}
        for key, row in zip(keys, rows):
            if key not in self._by_key:
                new.setdefault(key, row)
        fresh = self._run(list(new.values())) if new else {}
        # A run cut by the deadline is answered but not kept: it may run another time.
        return [self._by_key.get(k) or fresh[k] for k in keys]

    def lookup(self, row: np.ndarray | None) -> MeasuredPlacement | None:
        """The measurement of ``row``, if it was measured."""
        if row is None:
            return None
        return self._by_key.get(np.ascontiguousarray(row, dtype=np.int64).tobytes())

    def best(self, rows: Sequence[np.ndarray] | None = None) -> MeasuredPlacement | None:
        """The fastest valid measurement (among ``rows`` when given)."""
        pool = self.records if rows is None else [m for m in (self.lookup(r) for r in rows) if m is not None]
        valid = [m for m in pool if m.valid]
        return min(valid, key=lambda m: m.step_time) if valid else None

    def calibration(self) -> Calibration | None:
        """The latest calibration the hybrid reward model fitted, or None."""
        return self.hybrid.calibration if self.hybrid is not None else None

    def close(self) -> None:
        """Stop the backend's worker processes, if it keeps any."""
        self.backend.close()

    def _run(self, rows: list[np.ndarray]) -> dict[bytes, MeasuredPlacement]:
        if hasattr(self.backend, "deadline"):
            self.backend.deadline = self.deadline if any(r.valid for r in self.records) else None
        batch = np.stack(rows)
        simulated = simulate_batch(self.problem, batch).step_time
        cal = self.calibration()
        predicted = cal.predict(self.problem, batch) if cal is not None else None
        ops = [dict(self.expand(self.problem.array_to_placement(r))) for r in rows]
        try:
            results = list(self.backend.measure(ops))
            if len(results) != len(ops):
                raise RuntimeError(f"the measurer returned {len(results)} results for {len(ops)} placements")
        except PlacerError:
            raise  # a bad request (a device the workers do not have): the caller's error
        except Exception as exc:  # noqa: BLE001 - a failed run is an invalid placement, not a crash
            failed = MeasureResult(step_time=math.inf, valid=False,
                                   reason=f"measurement failed: {type(exc).__name__}: {exc}")
            results = [failed] * len(ops)
        out: dict[bytes, MeasuredPlacement] = {}
        for i, (row, res) in enumerate(zip(rows, results)):
            t, valid, reason = measure_outcome(res)
            rec = MeasuredPlacement(row=row.copy(), step_time=t if valid else math.inf, valid=valid, reason=reason,
                                    phase=self.phase, simulated=float(simulated[i]),
                                    predicted=None if predicted is None else float(predicted[i]))
            out[row.tobytes()] = rec
            if res.budget_cut:
                continue  # never ran, or stopped by the deadline: nothing about the placement to log
            self.records.append(rec)
            self._by_key[row.tobytes()] = rec
        return out


def make_measurer(cluster: Any, source: Any, model_args: Mapping[str, Any] | None, problem: PlacementProblem,
                  expand: Callable, fingerprint: str, backend: Measurer | None = None,
                  timeout_s: float | None = None) -> PlacementMeasurer:
    """The measurer for ``cluster``'s real devices.

    Rank devices (``cpu:0,cpu:1``) are measured by worker processes of the distributed
    runtime, other real devices (``cpu,cuda:0``) in one worker process that places ops on
    them; ``backend`` replaces either (any :class:`~envs.runtime.measurer.Measurer` of op
    placements). ``timeout_s`` bounds one placement's run (default: the measurers' 300 s).

    Raises:
        PlacerError: the model cannot be re-loaded in a worker (an in-memory module), or a
            time-out that is not a positive number.
    """
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                                      and timeout_s > 0):
        raise PlacerError(f"the measurement time-out must be a positive number of seconds, got {timeout_s!r}")
    timeouts = {} if timeout_s is None else {"timeout_s": float(timeout_s)}
    if backend is not None:
        return PlacementMeasurer(backend, problem, expand, f"given measurer ({type(backend).__name__})")
    if not isinstance(source, (str, os.PathLike)):
        raise PlacerError(
            "measuring loads the model again in worker processes, so it needs a model file or 'zoo:<name>', "
            f"not an in-memory {type(source).__name__}; use reward 'simulated' or pass measurer="
        )
    from envs.hardware.rank_devices import is_distributed_cluster

    if is_distributed_cluster(cluster):
        from envs.runtime.distributed.measure import DistributedMeasurer

        names = list(cluster.device_names)
        return PlacementMeasurer(
            DistributedMeasurer(str(source), dict(model_args or {}), names, fingerprint=fingerprint, **timeouts),
            problem, expand, f"{len(names)} worker processes ({', '.join(names)}), torch.distributed",
        )
    from envs.runtime.measure import SingleProcessMeasurer

    return PlacementMeasurer(
        SingleProcessMeasurer(source, model_args=dict(model_args or {}), devices=cluster, **timeouts),
        problem, expand, f"one worker process on {', '.join(cluster.device_names)}")


# --------------------------------------------------------------------------- hybrid rounds


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


# --------------------------------------------------------------------------- after the search


def confirm_candidates(measurer: PlacementMeasurer, candidates: Sequence[Candidate], top: int = CONFIRM_TOP,
                       extra_rows: Sequence[np.ndarray] = ()) -> None:
    """Measure the ``top`` fastest candidates (by the calibrated simulator when there is a
    calibration) plus ``extra_rows``, and mark every candidate whose row was measured."""
    found = [c for c in candidates if c.row is not None]
    if found:
        rows = np.stack([measurer.problem.check_array(c.row) for c in found])
        sim = simulate_batch(measurer.problem, rows)
        cal = measurer.calibration()
        est = cal.predict(measurer.problem, rows) if cal is not None else sim.step_time
        order = np.argsort(np.where(sim.fits, est, np.inf), kind="stable")[:top]
        chosen = [rows[int(i)] for i in order] + [np.asarray(r) for r in extra_rows]
        measurer.phase = "confirm"
        measurer.measure_rows(np.stack(chosen))
        measurer.phase = "search"
    mark_measured(measurer, candidates)


def _add_note(table: pd.DataFrame, i: Any, text: str) -> None:
    """Append ``text`` to row ``i``'s note (``; ``-separated)."""
    old = str(table.at[i, "note"] or "")
    table.at[i, "note"] = (old + "; " if old else "") + text


def measured_first(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` in the comparison's order (:func:`~placer.report.compare.fastest_first`), its
    measured fitting rows before all others, as only they decide (``pick_winner``): a
    simulated time leaves out the runtime's overheads and would top the table unmeasured."""
    first = table["fits"].astype(bool) & (table["source"] == "measured")
    return pd.concat([fastest_first(table[first]), fastest_first(table[~first])], ignore_index=True)


def _backend_runner(measurer: PlacementMeasurer, name: str) -> Callable[..., Any] | None:
    """The backend's ``name`` method (None: this backend has none), its deadline set to the run's."""
    run = getattr(measurer.backend, name, None)
    if run is not None and hasattr(measurer.backend, "deadline"):
        measurer.backend.deadline = measurer.deadline
    return run


def _run_or_failed(call: Callable[[], Sequence[MeasureResult]], expected: int, what: str) -> list[MeasureResult]:
    """``call()``'s ``expected`` results, or as many invalid ones saying why it failed: a run
    that cannot happen (a stage on another host, a refused job) leaves its rows simulated."""
    try:
        results = list(call())
        if len(results) != expected:
            raise PlacerError(f"the measurer returned {len(results)} results for {expected} {what}")
        return results
    except Exception as exc:  # noqa: BLE001 - the rows stay simulated, with the reason in their notes
        return [MeasureResult(step_time=math.inf, valid=False, reason=f"measurement failed: {exc}")] * expected


def _record_measured(table: pd.DataFrame, i: Any, t: float, valid: bool, reason: str, how: str) -> bool:
    """Row ``i`` takes the measured time (``source`` "measured", ``how`` in its note), or keeps
    its simulated one with the reason it was not measured; returns whether it was."""
    if not valid:
        _add_note(table, i, f"measurement invalid: {reason}")
        return False
    table.at[i, "step_time"] = t
    table.at[i, "source"] = "measured"
    _add_note(table, i, how)
    return True


def confirm_pipelines(measurer: PlacementMeasurer, table: pd.DataFrame, pipelines: Mapping[str, Pipeline],
                      to_ops: Callable[[Pipeline], Pipeline], top: int = CONFIRM_PIPELINES) -> pd.DataFrame:
    """Measure the ``top`` fastest fitting pipeline rows of ``table`` as pipelines and return
    the table with their measured times (``source`` "measured", speed-ups over the measured
    single device, :func:`measured_speedups`), fastest first.

    ``pipelines`` maps a row's method to its pipeline over the problem's groups, ``to_ops``
    turns one into the pipeline over the ops that the workers run. The backend must have
    ``measure_pipelines`` (:class:`~envs.runtime.distributed.measure.DistributedMeasurer`);
    without it the rows stay simulated, and a note says why. A pipeline x DDP hybrid
    (replicas) is measured like a pipeline, one process per stage of every replica, when all
    its devices are local workers. A run that fails or is refused leaves its row simulated
    with the reason in its note.
    """
    table = table.copy()
    rows = table[table["fits"] & (table.get("kind", "") == "pipeline") & table["method"].isin(list(pipelines))]
    if rows.empty:
        return table
    run = _backend_runner(measurer, "measure_pipelines")
    if run is None:
        for i in rows.index:
            _add_note(table, i, f"not measured: {measurer.description} runs no pipelines (worker processes such as "
                    "cpu:0,cpu:1 do)")
        return table
    chosen: list[tuple[Any, str]] = []
    distinct: dict[str, Pipeline] = {}
    for i in rows.sort_values("step_time", kind="stable").index:
        pipe = pipelines[str(table.at[i, "method"])]
        # Two methods often find the same pipeline (the search starts from the partitioners'):
        # it is run once and counts once towards ``top``.
        key = json.dumps(pipe.to_dict(), sort_keys=True)
        if key in distinct or len(distinct) < top:
            distinct.setdefault(key, pipe)
            chosen.append((i, key))
    if not chosen:
        return table
    op_pipes = {key: to_ops(pipe) for key, pipe in distinct.items()}
    results = _run_or_failed(lambda: run(list(op_pipes.values())), len(op_pipes), "pipelines")
    by_key = dict(zip(op_pipes, results))
    for i, key in chosen:
        pipe, res = op_pipes[key], by_key[key]
        t, valid, reason = measure_outcome(res)
        simulated = float(table.at[i, "simulated_step_time"])
        measurer.pipeline_records.append(MeasuredPipeline(str(table.at[i, "method"]), pipe.to_dict(),
                                                          t if valid else math.inf, valid, reason, simulated))
        _record_measured(table, i, t, valid, reason, "measured as a pipeline (torch.distributed.pipelining)")
    return measured_first(measured_speedups(table, measurer))


def confirm_data_parallel(measurer: PlacementMeasurer, table: pd.DataFrame) -> pd.DataFrame:
    """Measure the DDP row of ``table`` when it fits and the backend runs DDP (worker
    processes: ``measure_data_parallel``), so the final line compares measured with measured;
    returns the table with its time (``source`` "measured") or, when it was not measured, a
    note saying why."""
    rows = table[(table.get("kind", "") == "ddp") & table["fits"]]
    if rows.empty:
        return table
    table = table.copy()
    i = rows.index[0]
    run = _backend_runner(measurer, "measure_data_parallel")
    if run is None:
        _add_note(table, i, f"not measured: {measurer.description} runs no DDP (worker processes such as cpu:0,cpu:1 do)")
        return table
    (result,) = _run_or_failed(lambda: [run()], 1, "DDP runs")
    t, valid, reason = measure_outcome(result)
    if not _record_measured(table, i, t, valid, reason,
                            "measured as DDP (torch DistributedDataParallel over the worker processes)"):
        return table
    return measured_first(measured_speedups(table, measurer))


def single_device_rows(problem: PlacementProblem) -> list[np.ndarray]:
    """Every group on one device, for each device (the speed-up's denominator)."""
    return [np.full(problem.num_nodes, d, dtype=np.int64) for d in range(problem.num_devices)]


def measured_speedups(table: Any, measurer: PlacementMeasurer) -> Any:
    """``table`` with the speed-up of measured rows over the fastest *measured* single device.

    The comparison table divides by the simulated single-device time; a measured step
    time must be compared with a measured single-device time instead.
    """
    looked_up = (measurer.lookup(r) for r in single_device_rows(measurer.problem))
    singles = [m for m in looked_up if m is not None and m.valid]
    table = table.copy()
    measured = table["source"] == "measured"
    if singles:
        table.loc[measured, "speedup_vs_single"] = min(m.step_time for m in singles) / table.loc[measured, "step_time"]
    else:  # no single device was measured (e.g. Ctrl-C): no like-for-like speed-up
        table.loc[measured, "speedup_vs_single"] = float("nan")
    return table


def mark_measured(measurer: PlacementMeasurer, candidates: Sequence[Candidate]) -> None:
    """Give every candidate whose row was measured its measured time (or the failure in its note)."""
    for c in candidates:
        rec = measurer.lookup(c.row)
        if rec is None:
            continue
        if rec.valid:
            c.measured_step_time = rec.step_time
        elif "measurement invalid" not in c.note:
            c.note = (c.note + "; " if c.note else "") + f"measurement invalid: {rec.reason}"


@dataclass
class MeasurementSummary:
    """What was measured in an optimize run, for the report and ``calibration.json``.

    Attributes:
        reward: the reward mode.
        description: how the times were measured.
        records: every distinct placement measured, in order.
        requests: measurements asked for, repeats (answered from the log) included.
        rounds: the hybrid rounds (see :class:`HybridRounds`).
        search_calibrations: recalibrations of the simulator during the search.
        calibration: a calibration fitted on all valid measurements at the end (None
            with fewer than three).
        holdout: agreement on placements measured after a calibration predicted them:
            ``{"n", "uncalibrated": {...}, "calibrated": {...}}``, or None.
    """

    reward: str
    description: str
    records: list[MeasuredPlacement]
    requests: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    search_calibrations: int = 0
    calibration: Calibration | None = None
    holdout: dict[str, Any] | None = None
    pipelines: list[MeasuredPipeline] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Distinct placements measured."""
        return len(self.records)

    @property
    def invalid(self) -> int:
        """Measurements that failed (out of memory, crash, time-out)."""
        return sum(not r.valid for r in self.records)

    def to_dict(self, problem: PlacementProblem) -> dict[str, Any]:
        """JSON-friendly form; placements as ``{group: device}``."""
        return {
            "reward": self.reward, "measured_by": self.description, "measurements": self.count,
            "invalid": self.invalid, "requests": self.requests, "rounds": self.rounds,
            "search_calibrations": self.search_calibrations,
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


def summarize(measurer: PlacementMeasurer, reward: str, rounds: Sequence[dict[str, Any]] = ()) -> MeasurementSummary:
    """Fit a final calibration on every valid measurement and collect the figures."""
    valid = [r for r in measurer.records if r.valid]
    cal = None
    if len(valid) >= 3:
        try:
            cal = calibrate_simulator(measurer.problem, np.stack([r.row for r in valid]), [r.step_time for r in valid])
        except CalibrationError:
            cal = None  # degenerate data: report the measurements without a calibration
    held = [r for r in valid if r.predicted is not None]
    holdout = None
    if len(held) >= 2:
        meas = [r.step_time for r in held]
        holdout = {
            "n": len(held),
            "uncalibrated": agreement([r.simulated for r in held], meas),
            "calibrated": agreement([r.predicted for r in held], meas),
        }
    return MeasurementSummary(
        reward=reward, description=measurer.description, records=list(measurer.records),
        requests=measurer.requests, rounds=list(rounds),
        search_calibrations=measurer.hybrid.calibrations if measurer.hybrid is not None else 0,
        calibration=cal, holdout=holdout, pipelines=list(measurer.pipeline_records),
    )
