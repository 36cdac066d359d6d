"""After the search: the best candidates measured for real, and the comparison table given measured times.

Either way (``measured`` or ``hybrid`` reward) optimize runs the best candidates once more at the end,
beside the single devices, in two jobs (:func:`confirm_candidates`), and only measured times pick the winner. Pipelined
candidates (the pipeline partitioners' and the pipeline search's rows of the comparison
table) are measured as pipelines, through ``torch.distributed.pipelining``, where the
backend can (:meth:`envs.runtime.distributed.measure.DistributedMeasurer.measure_pipelines`,
worker processes ``cpu:0,cpu:1``): :func:`confirm_pipelines`. Their un-pipelined assignment
is another, slower program (one rank busy at a time), so it never stands in for them.
The DDP row is measured as DDP where the backend runs it (:func:`confirm_data_parallel`), and
measured rows' speed-ups are over the measured single device (:func:`measured_speedups`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from envs.gym.measured_rewards import measure_outcome
from envs.runtime.measurer import MeasureResult
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate_batch
from graphs.errors import PlacerError
from placer.measuring.measurer import MeasuredPipeline, PlacementMeasurer
from placer.report.compare import ONE_PROCESS_KIND, Candidate, fastest_first

log = logging.getLogger(__name__)

#: Candidates measured at the end to confirm the winner.
CONFIRM_TOP = 4
#: Runs of the final comparison (:meth:`~placer.measuring.measurer.PlacementMeasurer.confirm_rows`):
#: two jobs, the second in reverse order, so a placement wins only if it is faster in each.
#: One job ranked a placement that differs from the single device by two counter updates on
#: the other rank 1.03x faster (7.969 against 8.198 ms, a 4-block tied-embedding LM on
#: cpu:0,cpu:1, 2026-12-06); the same two had been 1.01x apart in the search's job.
CONFIRM_RUNS = 2
#: Pipelined candidates measured at the end (the fastest simulated; each is one job of
#: its own, seconds of process start-up: ~10 s for two CPU ranks on this loaded machine).
CONFIRM_PIPELINES = 2


def confirm_candidates(measurer: PlacementMeasurer, candidates: Sequence[Candidate], top: int = CONFIRM_TOP,
                       extra_rows: Sequence[np.ndarray] = (), contenders: Sequence[np.ndarray] = (),
                       search: Candidate | None = None, single: Candidate | None = None) -> None:
    """Run the ``top`` fastest distinct programs among the candidates' rows and ``contenders``
    again, with ``extra_rows`` (the single devices, the speed-ups' denominator), side by side in
    one backend call, :data:`CONFIRM_RUNS` times (the second in reverse order); give every
    candidate its program's figure, the mean of those runs, with each run's (or the failure in
    its note), and ``search``, the search's candidate, the fastest of its own row and the
    contenders in that run. ``single``, the fastest single device by simulation, becomes the
    fastest single device of ``extra_rows`` in that run that fits: its name promises the
    fastest, and the table's speed-ups divide by that figure.

    ``contenders`` are the search's other measured placements: the search keeps the fastest
    of its noisy runs, so its runners-up compete again beside it. The fastest other method
    (a baseline) and the search's fastest are always among the ``top``. The fastest are by their
    measured time where they were measured (a failed run is not run again), else by the
    calibrated simulator (the plain one before any calibration). Rows that differ only where
    the backend ignores the device (the model inputs on ranks) are one program: one run, one
    time. See :meth:`~placer.measuring.measurer.PlacementMeasurer.remeasure_rows` for why
    the search's figures are not kept.
    """
    others = [c for c in candidates if c.row is not None and c is not search]
    mine = [search.row] if search is not None and search.row is not None else []
    pool = [measurer.problem.check_array(r) for r in [*(c.row for c in others), *mine, *contenders]]
    if pool:
        rows = np.stack(pool)
        sim = simulate_batch(measurer.problem, rows)
        cal = measurer.calibration()
        est = cal.predict(measurer.problem, rows) if cal is not None else sim.step_time
        measured = [measurer.lookup(r) for r in rows]
        # A run that failed (out of memory, a crash) is not run again: its inf keeps it last.
        est = np.array([e if m is None else m.step_time for m, e in zip(measured, est)])
        score = np.where(sim.fits, est, np.inf)
        order = [int(i) for i in np.argsort(score, kind="stable")]
        # The fastest other method first, then the search's fastest: the two that the
        # final line compares run side by side whatever ``top`` leaves out.
        ok = [i for i in order if np.isfinite(score[i])]
        firsts = [next((i for i in ok if i < len(others)), None), next((i for i in ok if i >= len(others)), None)]
        chosen: list[np.ndarray] = []
        programs: set[tuple[tuple[str, str], ...]] = set()
        for i in [i for i in firsts if i is not None] + order:
            key = measurer.program_of(rows[i])
            if key not in programs and len(programs) < top:
                programs.add(key)
                chosen.append(rows[i])
        chosen += [np.asarray(r) for r in extra_rows]
        measurer.phase = "confirm"
        this_run = {id(rec) for rec in measurer.confirm_rows(np.stack(chosen), CONFIRM_RUNS)}
        measurer.phase = "search"
    if search is not None and search.row is not None and pool:
        # Only this run's figures decide: a contender left out kept its search figure.
        fastest = _fastest_in_run(measurer, [search.row, *contenders], this_run)
        if fastest is not None:
            search.row = fastest
    if single is not None and single.row is not None and pool and extra_rows:
        alone = [measurer.problem.check_array(r) for r in extra_rows]
        fastest = _fastest_in_run(measurer, alone, this_run, simulate_batch(measurer.problem, np.stack(alone)).fits)
        if fastest is not None:
            single.row = fastest
    mark_measured(measurer, candidates)


def _fastest_in_run(measurer: PlacementMeasurer, rows: Sequence[np.ndarray], this_run: set[int],
                    fits: np.ndarray | None = None) -> np.ndarray | None:
    """A copy of the row of ``rows`` (those that fit, with ``fits``) whose program ran fastest,
    validly, in the run whose records' ids are ``this_run``; None when none of them did."""
    ran = [(m.step_time, i) for i, m in enumerate(measurer.lookup(r) for r in rows)
           if m is not None and m.valid and id(m) in this_run and (fits is None or bool(fits[i]))]
    return np.asarray(rows[min(ran)[1]]).copy() if ran else None


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
    # Each job's count of timed steps is chosen from its expected step (a job trains a fixed count).
    first_row = {key: i for i, key in reversed(chosen)}
    scale = measurer.measured_over_simulated()
    expected = [float(table.at[first_row[key], "simulated_step_time"]) * scale for key in op_pipes]
    results = _run_or_failed(lambda: run(list(op_pipes.values()), expected_s=expected), len(op_pipes), "pipelines")
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
    expected = float(table.at[i, "simulated_step_time"]) * measurer.measured_over_simulated()
    (result,) = _run_or_failed(lambda: [run(expected_s=expected)], 1, "DDP runs")
    t, valid, reason = measure_outcome(result)
    if not _record_measured(table, i, t, valid, reason,
                            "measured as DDP (torch DistributedDataParallel over the worker processes)"):
        return table
    return measured_first(measured_speedups(table, measurer))


def confirm_one_process(measurer: PlacementMeasurer, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a measured reference row, ``one process, N threads``: the unsplit model in
    one process using the threads of the worker processes together, one per core at most, where
    the backend runs it (local CPU workers,
    :meth:`~envs.runtime.distributed.measure.DistributedMeasurer.measure_one_process`).

    The single device of the table runs one worker's threads; a user of these cores would
    otherwise run the model in one process on all of them (torch's default), so that is what
    a split has to beat to pay. Measured here (2026-12-07 02:07 UTC,
    ``benchmarks/models/two_towers.py``, 2 cores): the best split over ``cpu:0,cpu:1`` 30.2 ms
    a step, one worker 51.3 ms, one process with 2 threads 26.9 ms. The row is not a placement
    and never wins (``kind`` :data:`~placer.report.compare.ONE_PROCESS_KIND`); the final line
    compares the winner with it. Nothing is added where the backend cannot run it or the run
    fails (the log says why)."""
    run = _backend_runner(measurer, "measure_one_process")
    threads_of = getattr(measurer.backend, "one_process_threads", None)
    threads = threads_of() if threads_of is not None else None
    if run is None or threads is None:
        return table
    (result,) = _run_or_failed(lambda: [run()], 1, "one-process runs")
    t, valid, reason = measure_outcome(result)
    if not valid:
        log.warning("one process with %d thread(s), the reference for the split, did not run: %s", threads, reason)
        return table
    threads_text = f"{threads} thread" + ("s" if threads != 1 else "")
    row = {"method": f"one process, {threads_text}", "kind": ONE_PROCESS_KIND, "step_time": t,
           "simulated_step_time": float("nan"), "speedup_vs_single": float("nan"), "fits": True,
           "source": "measured", "note": f"the unsplit model in one process with {threads_text}, the worker "
                                         "processes' together (one per core at most): a reference, not a placement",
           "peak_memory": "", "search_time": 0.0, "evaluated": 0}
    added = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    return measured_first(measured_speedups(added, measurer))


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
            c.measured_runs = rec.runs
        elif "measurement invalid" not in c.note:
            c.note = (c.note + "; " if c.note else "") + f"measurement invalid: {rec.reason}"
