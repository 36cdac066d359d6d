"""The measurer of group placements that the reward model and ``optimize`` call, and its log.

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

Measured mode's settings are here too (:data:`MEASURED_BATCH`, :data:`MEASURED_IMITATION_STEPS`):
in that mode the reward model sends every placement the agent proposes to this measurer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.gym.measured_rewards import HybridReward, measure_outcome
from envs.runtime.measurer import Measurer, MeasureResult
from envs.sim.calibration import Calibration
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate_batch
from graphs.errors import PlacerError

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
        self._by_key: dict[bytes, MeasuredPlacement] = {}
        #: Pipelined candidates measured as pipelines (:func:`~placer.measuring.confirm.confirm_pipelines`); kept apart
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
