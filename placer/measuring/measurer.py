"""The measurer of group placements that the reward model and ``optimize`` call, and its log.

The search places *groups* (``problem.node_names``), the devices run *ops*. A
:class:`PlacementMeasurer` sits between the two: it is the :class:`envs.runtime.measurer.Measurer`
the reward model calls (:mod:`envs.gym.measured_rewards`), expands each group placement to
the op placement the backend measurer runs — :class:`envs.runtime.measure.SingleProcessMeasurer`
(one worker process, real devices such as ``cpu,cuda:0``) or
:class:`envs.runtime.distributed.measure.DistributedMeasurer` (one worker per rank device,
``cpu:0,cpu:1``) — measures each distinct program once (placements that differ only where
the backend ignores the device, such as the model inputs on ranks, are one program), and keeps the log of every
measurement with the simulator's figure beside it (the report's, and what optimize looks
results up in). Every run is bounded by ``--measure-timeout`` and by the run's budget:
:meth:`PlacementMeasurer.set_deadline` cuts a run that would outlast the search.

Measured mode's settings are here too (:data:`MEASURED_BATCH`, :data:`MEASURED_IMITATION_STEPS`):
in that mode the reward model sends every placement the agent proposes to this measurer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from envs.gym.measured_rewards import HybridReward, measure_outcome
from envs.runtime.measurer import Measurer, MeasureResult, program_key
from envs.sim.calibration import Calibration
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate_batch
from graphs.errors import PlacerError

if TYPE_CHECKING:
    from graphs.capture import CapturedModel

#: Measured mode: placements the agent proposes per batch (each batch is one measuring call).
MEASURED_BATCH = 8
#: Measured mode: behaviour-cloning steps on the best seed before the search. Search's
#: default (50) left a policy that proposed 6 distinct placements in 196 (rnnlm, 6 groups,
#: fake measurements), so a measured budget went on repeats; 20 steps gave 36.
MEASURED_IMITATION_STEPS = 20


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
            (hybrid, once a calibration exists, on a program measured for the first time), else None.
        runs: the step times of the runs this figure is the mean of, in run order (the final
            comparison's, :meth:`PlacementMeasurer.confirm_rows`); empty for one run or a failed one.
    """

    row: np.ndarray
    step_time: float
    valid: bool
    reason: str
    phase: str
    simulated: float
    predicted: float | None = None
    runs: tuple[float, ...] = ()


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
            (set by :class:`~placer.measuring.hybrid_rounds.HybridRounds`, which owns it), or None.
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
        #: By program (:meth:`program_of`): rows that run the same program share one record.
        self._by_key: dict[tuple[tuple[str, str], ...], MeasuredPlacement] = {}
        self._ignored: frozenset[str] | None = None
        #: Pipelined candidates measured as pipelines (:func:`~placer.measuring.confirm.confirm_pipelines`); kept apart
        #: from :attr:`records`, whose rows the calibration fits to the un-pipelined simulator.
        self.pipeline_records: list[MeasuredPipeline] = []

    @property
    def ignored_nodes(self) -> frozenset[str]:
        """The groups whose every op the backend ignores (its ``ignored_nodes``, e.g. the
        distributed runtime's model inputs): where a placement puts them changes nothing."""
        if self._ignored is None:
            ops = frozenset(getattr(self.backend, "ignored_nodes", frozenset()))
            groups: dict[str, bool] = {}
            if ops:
                for op, group in self.expand({g: g for g in self.problem.node_names}).items():
                    groups[group] = groups.get(group, True) and op in ops
            self._ignored = frozenset(g for g, all_ignored in groups.items() if all_ignored)
        return self._ignored

    def program_of(self, row: np.ndarray) -> tuple[tuple[str, str], ...]:
        """The program ``row`` runs (:func:`envs.runtime.measurer.program_key`): equal for rows
        that differ only in groups the backend ignores."""
        return program_key(self, self.problem.array_to_placement(np.asarray(row)))

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
        """Measure placement rows [B, N]; each distinct program runs once, whatever the phase
        (a row that runs an earlier row's program gets that row's record)."""
        return self._measure(rows, again=False)

    def remeasure_rows(self, rows: np.ndarray) -> list[MeasuredPlacement]:
        """Run rows [B, N] again, each distinct program once, all in one backend call, however
        they were measured before; each program's record becomes the new run's (the log,
        :attr:`records`, keeps every run).

        The final confirmation's figures: a search keeps the fastest of many noisy runs of
        near-equal programs, so its best figure is the luckiest, not the program's (ResNet-50 on
        ``cpu:0,cpu:1``: a winner measured at 744.0 ms ran 765.5 ms by itself, 2026-12-06).
        Run again beside the single-device reference in one job, the figures and their
        ratios come from one state of the machine, and none is chosen by its own noise. A
        backend without ``clear_cache()`` answers from its own cache.
        """
        return self._measure(rows, again=True)

    def confirm_rows(self, rows: np.ndarray, runs: int) -> list[MeasuredPlacement]:
        """Run rows [B, N] ``runs`` times, each distinct program once per run, each run one
        backend call (:meth:`remeasure_rows`), every other run in reverse order; a program's
        figure becomes the mean of its runs, with each run's in ``runs`` (the log,
        :attr:`records`, keeps every run). A program that failed in any run is invalid.

        Why twice, and why reversed: a job's figures move together (the machine's state, which
        core each worker landed on), and within a job the later placements share its drift.
        Placements compared run by run share both, so a placement is faster only if it is in
        every run; the reverse order puts each placement early once and late once.
        """
        if runs < 1:
            raise PlacerError(f"a confirmation needs at least one run, got {runs}")
        rows = self.problem.check_array(np.atleast_2d(rows))
        before = len(self.records)
        per_run = []
        for k in range(runs):
            idx = np.arange(rows.shape[0]) if k % 2 == 0 else np.arange(rows.shape[0])[::-1]
            per_run.append(dict(zip(idx.tolist(), self.remeasure_rows(rows[idx]))))
        # Runs cut by the deadline were not logged: they say nothing about the placement.
        kept = {id(r) for r in self.records[before:]}
        combined: dict[tuple[tuple[str, str], ...], MeasuredPlacement] = {}
        out = []
        for i in range(rows.shape[0]):
            key = self.program_of(rows[i])
            recs = [run[i] for run in per_run if id(run[i]) in kept]
            if len(recs) < 2:
                out.append(recs[0] if recs else per_run[-1][i])
                continue
            if key not in combined:
                bad = next((r for r in recs if not r.valid), None)
                times = tuple(r.step_time for r in recs)
                combined[key] = self._by_key[key] = MeasuredPlacement(
                    row=recs[0].row, step_time=math.inf if bad else float(np.mean(times)), valid=bad is None,
                    reason=bad.reason if bad else "", phase=recs[-1].phase, simulated=recs[0].simulated,
                    runs=() if bad else times)
            out.append(combined[key])
        return out

    def _measure(self, rows: np.ndarray, again: bool) -> list[MeasuredPlacement]:
        rows = self.problem.check_array(np.atleast_2d(rows))
        self.requests += rows.shape[0]
        keys = [self.program_of(r) for r in rows]
        todo: dict[tuple[tuple[str, str], ...], np.ndarray] = {}
        for key, row in zip(keys, rows):
            if again or key not in self._by_key:
                todo.setdefault(key, row)
        clear = getattr(self.backend, "clear_cache", None)
        if again and clear is not None:
            clear()
        fresh = self._run(list(todo.values())) if todo else {}
        # A run cut by the deadline is answered but not kept: it may run another time.
        return [fresh[k] if k in fresh else self._by_key[k] for k in keys]

    def lookup(self, row: np.ndarray | None) -> MeasuredPlacement | None:
        """The measurement of ``row``'s program, if it was measured."""
        if row is None:
            return None
        return self._by_key.get(self.program_of(np.ascontiguousarray(row, dtype=np.int64)))

    def best(self, rows: Sequence[np.ndarray] | None = None) -> MeasuredPlacement | None:
        """The fastest valid measurement (among ``rows`` when given)."""
        pool = self.records if rows is None else [m for m in (self.lookup(r) for r in rows) if m is not None]
        valid = [m for m in pool if m.valid]
        return min(valid, key=lambda m: m.step_time) if valid else None

    def measured_over_simulated(self) -> float:
        """The median ratio of measured to simulated step over the valid runs (1 with none):
        what turns another simulated time into an expected measured one."""
        ratios = [r.step_time / r.simulated for r in self.records if r.valid and r.simulated > 0]
        return float(np.median(ratios)) if ratios else 1.0

    def calibration(self) -> Calibration | None:
        """The latest calibration the hybrid reward model fitted, or None."""
        return self.hybrid.calibration if self.hybrid is not None else None

    def close(self) -> None:
        """Stop the backend's worker processes, if it keeps any."""
        self.backend.close()

    def _run(self, rows: list[np.ndarray]) -> dict[tuple[tuple[str, str], ...], MeasuredPlacement]:
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
        out: dict[tuple[tuple[str, str], ...], MeasuredPlacement] = {}
        for i, (row, res) in enumerate(zip(rows, results)):
            t, valid, reason = measure_outcome(res)
            key = self.program_of(row)
            # A program run again was in the calibration's data: its prediction is no test of it.
            held_out = predicted is not None and key not in self._by_key
            rec = MeasuredPlacement(row=row.copy(), step_time=t if valid else math.inf, valid=valid, reason=reason,
                                    phase=self.phase, simulated=float(simulated[i]),
                                    predicted=float(predicted[i]) if held_out else None)
            out[key] = rec
            if res.budget_cut:
                continue  # never ran, or stopped by the deadline: nothing about the placement to log
            self.records.append(rec)
            self._by_key[key] = rec
        return out


def make_measurer(cluster: Any, source: Any, model_args: Mapping[str, Any] | None, problem: PlacementProblem,
                  expand: Callable, fingerprint: str, backend: Measurer | None = None,
                  timeout_s: float | None = None, spec: Any = None,
                  captured: CapturedModel | None = None) -> PlacementMeasurer:
    """The measurer for ``cluster``'s real devices.

    ``spec`` and ``captured``, the caller's loaded and captured model, are what worker
    processes of ranks get their weights and inputs from; without them the model is loaded
    and captured once more here (a model file run twice, with weights of its own if it
    initialises them at random). Every worker captures with ``captured``'s leaf modules.

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
            DistributedMeasurer(str(source), dict(model_args or {}), names, fingerprint=fingerprint, spec=spec,
                                captured=captured, **timeouts),
            problem, expand, f"{len(names)} worker processes ({', '.join(names)}), torch.distributed",
        )
    from envs.runtime.measure import SingleProcessMeasurer

    return PlacementMeasurer(
        SingleProcessMeasurer(source, model_args=dict(model_args or {}), devices=cluster,
                              leaf_modules=captured.leaf_paths if captured is not None else (), **timeouts),
        problem, expand, f"one worker process on {', '.join(cluster.device_names)}")
