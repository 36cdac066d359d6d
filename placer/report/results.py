"""Results of an ``optimize`` run on disk: placement files, the comparison, pictures, report.md.

:func:`write_results` writes into one directory:

- ``placement.json`` — the op-level placement (schema-versioned, with the model fingerprint);
- ``device_map.json`` — accelerate-style module → device map, when the placement is module-aligned;
- ``comparison.csv`` — every method's step time, speed-up and memory, through one simulator;
- ``placed_graph.png``, ``schedule.png``, ``memory.png``, ``search_curve.png``, ``search_phases.png``
  (the search curve coloured by the phase that found each improvement);
- on real devices: ``measurements.json`` — every placement measured (phase, measured,
  simulated and calibrated times) — and ``calibration.json`` — the simulator's calibration
  fitted on them, with its agreement (Spearman, MAPE) before and after;
- ``report.md`` — all of the above in one readable page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from envs.hardware.cluster import Cluster
from envs.runtime.check import CheckReport
from envs.runtime.device_map import accelerate_device_map
from envs.sim.hybrid import simulate_pipelined
from envs.sim.pipeline_layout import group_pipeline
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate
from graphs.atomic_write import write_text_atomic
from graphs.pipeline import Prepared
from placer.measuring.summary import MeasurementSummary
from placer.memory_fit import memory_margins
from placer.placement_file import Placement, save_placement
from placer.report.compare import Candidate, markdown_table, table_for_files
from placer.report.plots import plot_memory, plot_placed_graph, plot_search_by_phase, plot_search_curves
from placer.report.terminal_table import comparison_lines

log = logging.getLogger(__name__)


class OptimizeResult(Protocol):
    """What the report reads of :class:`placer.result.OptimizeResult` (which saves through this module)."""

    placement: Placement
    step_time: float
    source: str
    cluster: Cluster
    problem: PlacementProblem
    group_row: np.ndarray
    prepared: Prepared
    table: pd.DataFrame
    check: CheckReport | None
    search: Any
    candidates: list[Candidate]
    winner: str
    seconds: dict[str, float]
    reward: str
    measurement: Any


def _write_device_map(result: "OptimizeResult", out_dir: Path) -> tuple[Path | None, str]:
    """Write ``device_map.json`` when accelerate can run the placement; else remove it and say why."""
    real = result.cluster.real_device_map()
    used = sorted(set(result.placement.assignment.values()))
    path = out_dir / "device_map.json"
    pipeline = result.placement.pipeline
    if pipeline is not None and (pipeline.microbatches > 1 or pipeline.replicas):
        # accelerate runs one process over its map: no micro-batches, no replicas. The map of
        # replica 0's stages would name one device ({"": "cpu:0"} for DDP) as if it were the placement.
        device_map, reason = None, (f"the placement is {pipeline.describe()}, which accelerate's one-process "
                                    "device_map cannot express; run it with `placer apply`")
    elif len({real.get(d, d) for d in used}) < len(used):
        device_map, reason = None, (
            f"the placement's devices {', '.join(used)} do not map onto distinct real devices here "
            f"({', '.join(f'{d}→{real.get(d, d)}' for d in used)}); give each a real_device in the cluster spec")
    else:
        device_map, reason = accelerate_device_map(
            result.prepared.captured.graph, {n: real.get(d, d) for n, d in result.placement.assignment.items()},
            model=result.prepared.spec.model)
    if device_map is None:
        if path.exists():
            path.unlink()  # a stale map from an earlier run would describe another placement
        return None, reason
    write_text_atomic(path, json.dumps(device_map, indent=2) + "\n")
    return path, ""


def winner_peak_memory(result: "OptimizeResult") -> tuple[list[float], str]:
    """The winner's simulated peak memory per device (in the problem's device order), and how it
    runs: a pipelined winner's is its pipeline's (micro-batch activations in flight, replicas),
    the same simulation that gave its step time, not the un-pipelined assignment's."""
    problem, pipe = result.problem, result.placement.pipeline
    if pipe is None:
        return [float(m) for m in simulate(problem, result.group_row).peak_memory], "un-pipelined"
    peak = simulate_pipelined(problem, group_pipeline(problem, pipe)).peak_memory
    return [float(peak.get(d, 0.0)) for d in problem.device_names], pipe.describe()


def write_pictures(result: "OptimizeResult", out_dir: Path) -> dict[str, Path]:
    """The pictures of a result; returns name → path of those written."""
    problem, row = result.problem, result.group_row
    group_graph = result.prepared.grouping.graph
    pictures: dict[str, Path] = {}
    placement = problem.array_to_placement(row)
    pictures["placed graph"] = plot_placed_graph(
        group_graph, placement, list(problem.device_names), out_dir / "placed_graph.png",
        title=f"{result.prepared.spec.name}: {problem.num_nodes} groups coloured by device",
    )
    peak, how = winner_peak_memory(result)
    pictures["memory"] = plot_memory(list(problem.device_names), peak, problem.memory_capacity,
                                     out_dir / "memory.png", title=f"simulated peak memory per device, {how}")
    try:
        from placer.report.gantt import NoSchedule, plot_gantt
    except ImportError:  # the Gantt chart module is optional in a partial install
        plot_gantt = None  # type: ignore[assignment]  # the name is only tested below
    if plot_gantt is not None:
        title = None
        pipelined = result.placement.pipeline is not None
        if pipelined:
            # Its stage assignment drawn un-pipelined: that run's step is not the winner's, so the
            # title gives the winner's, the one number of this placement.
            title = (f"{result.prepared.spec.name}: the pipeline's stage assignment, simulated without its "
                     f"micro-batches and schedule (the pipeline steps in {result.step_time * 1e3:.3f} ms, "
                     f"{result.source})")
        try:
            pictures["schedule"] = Path(plot_gantt(problem, row, out_dir / "schedule.png", title=title))
        except NoSchedule as exc:
            # The chart draws the winner's assignment un-pipelined: a pipelined winner may be one
            # that only runs as its pipeline (a stage hands over a value after updating it in
            # place); a measured winner stands on its measurement. The report goes without it.
            piped = " run un-pipelined (the winner is a pipeline)" if pipelined else ""
            log.warning("no schedule.png: %s%s", exc, piped)
    histories = {c.method: c.history for c in result.candidates if c.history}
    if histories:
        pictures["search curve"] = plot_search_curves(histories, out_dir / "search_curve.png",
                                                      title=f"search on {result.cluster.name}")
    improvements = getattr(result.search, "improvements", None)
    if improvements:
        pictures["search curve by phase"] = plot_search_by_phase(
            improvements, out_dir / "search_phases.png",
            title=f"search on {result.cluster.name}: who found each improvement of the best")
    return pictures


def render_report(result: "OptimizeResult", pictures: dict[str, Path], device_map: Path | None,
                  device_map_note: str = "") -> str:
    """The Markdown text of report.md (``device_map_note``: why there is no device_map.json)."""
    spec, cluster, problem = result.prepared.spec, result.cluster, result.problem
    peak, how = winner_peak_memory(result)
    lines = [
        f"# placer report: {spec.name}",
        "",
        f"- devices: **{cluster.name}** ({', '.join(cluster.device_names)}) — "
        + ("step times **simulated** on a cluster spec" if cluster.simulated
           else f"real devices, winner **{'measured' if result.source == 'measured' else 'not measured'}**"),
        f"- reward: **{result.reward}** — {_REWARD_WORDS.get(result.reward, result.reward)}",
        f"- graph: {result.prepared.captured.graph.number_of_nodes()} ops "
        f"({result.prepared.captured.method} capture), {problem.num_nodes} groups, "
        f"fingerprint `{result.placement.fingerprint}`",
        f"- winner: **{result.winner}**, step time **{result.step_time * 1e3:.3f} ms** ({result.source})",
        f"- search: {result.search.evaluated:,} placements evaluated in "
        f"{result.seconds.get('search', 0.0):.1f} s, stopped: {result.search.stop_reason}",
        f"- machine: {platform.node() or 'unknown'} ({platform.machine()}, Python {platform.python_version()})",
    ]
    if result.check is not None:
        lines.append(f"- check of the applied placement: {result.check.describe()}")
    pipe = result.placement.pipeline
    held = set(result.placement.assignment.values())
    if pipe is not None:  # every replica's devices, not only replica 0's assignment
        held |= set(pipe.rank_devices)
    used = sorted(held, key=list(cluster.device_names).index)
    lines.append(f"- devices used: {', '.join(used)}; peak memory ({how}, simulated) "
                 + memory_margins(problem.device_names, peak, problem.memory_capacity))
    if cluster.simulated and len(set(cluster.real_device_map().values())) < len(used):
        lines.append("- applied here, the virtual devices share one real device: a measured time would "
                     "show no parallelism; the step times above are the simulator's.")
    lines += ["", "## Comparison", "", markdown_table(result.table), ""]
    lines += ["Speed-up is over the fastest single device that holds the model (measured rows: over the "
              "fastest measured single device); the ratio to the lower bound compares with max(critical "
              "path, total work / aggregate speed), a simulated figure.", ""]
    lines += credit_section(result.search)
    if result.measurement is not None:
        lines += measurement_section(result)
    lines += ["## Files", "", "- `placement.json` — load with `placer.load(path)`"]
    if device_map is not None:
        lines.append("- `device_map.json` — module → device map for `accelerate.dispatch_model(model, device_map)`")
    else:
        lines.append(f"- no `device_map.json`: {device_map_note or 'accelerate cannot express this placement'}")
    lines.append("- `comparison.csv` — the table above")
    if result.measurement is not None:
        lines.append("- `measurements.json` — every measured placement; `calibration.json` — the simulator's "
                     "calibration (when at least three measurements succeeded)")
    lines.append("")
    for name, path in pictures.items():
        lines += [f"## {name.capitalize()}", "", f"![{name}]({path.name})", ""]
    return "\n".join(lines)


def credit_section(search: Any) -> list[str]:
    """Markdown lines: which phase of the search found each improvement of the best placement and
    its share of the gain over the heuristic seeds (empty when the search records no improvements)."""
    improvements = getattr(search, "improvements", None)
    if not improvements:
        return []
    lines = ["## Search credit", "",
             "Every improvement of the best placement, credited to the phase whose batch produced it "
             "(seeds: the heuristics; policy / policy_moves: the learned agent; local_search: the "
             "improvement phase).", "", "| phase | improvements | share of the gain over the seeds |",
             "|---|---:|---:|"]
    shares = search.credit()
    counts: dict[str, int] = {}
    for imp in improvements:
        counts[imp.phase] = counts.get(imp.phase, 0) + 1
    for phase, count in counts.items():
        share = "—" if phase == "seeds" else f"{shares.get(phase, 0.0):.0%}"
        lines.append(f"| {phase} | {count} | {share} |")
    seed = search.seed_step_time
    rescales = int(getattr(search, "rescales", 0) or 0)
    if not any(imp.phase != "seeds" for imp in improvements):
        lines += ["", "No phase after the seeds improved on the best seed (a heuristic's placement)."
                  + (f" Its step time on the simulator as recalibrated at the end: "
                     f"{search.best_step_time * 1e3:.3f} ms." if rescales and math.isfinite(search.best_step_time)
                     else "")]
    elif math.isfinite(seed) and math.isfinite(search.best_step_time):
        lines += ["", f"Best seed {seed * 1e3:.3f} ms → {search.best_step_time * 1e3:.3f} ms after the search"
                  + (f" (the simulator was recalibrated {rescales} time(s) in between: the seed's figure is on "
                     "the scale before, the final one on the last)." if rescales else ".")]
    return lines + [""]


_REWARD_WORDS = {
    "simulated": "the simulator scored every placement the agent proposed",
    "measured": "every placement the agent proposed was measured on the devices",
    "hybrid": "the simulator scored the search, recalibrated in rounds from measurements of its best candidates",
}


def _ms(t: float | None) -> str:
    return "" if t is None or not math.isfinite(t) else f"{t * 1e3:.3f}"


def _agreement_text(a: dict | None) -> str:
    if not a:
        return "n/a"
    return f"Spearman {a['spearman']:.2f}, MAPE {a['mape'] * 100:.1f}% (n={a['n']})"


def _row_text(row: np.ndarray) -> str:
    """A placement row in short: the device index of each group in order, e.g. ``0 0 1 1 0 1``."""
    return " ".join(str(int(d)) for d in row) if len(row) <= 24 else f"{len(row)} groups"


def measurement_section(result: "OptimizeResult") -> list[str]:
    """The report's "Measurements" section: what was measured, how often, and the calibration."""
    m, problem = result.measurement, result.problem
    methods: dict[bytes, list[str]] = {}
    for c in result.candidates:
        if c.row is not None:
            methods.setdefault(np.asarray(c.row, dtype=np.int64).tobytes(), []).append(c.method)
    phases: dict[str, int] = {}
    for r in m.records:
        phases[r.phase.split()[0]] = phases.get(r.phase.split()[0], 0) + 1
    lines = [
        "## Measurements", "",
        f"- reward **{m.reward}**: {_REWARD_WORDS.get(m.reward, m.reward)}.",
        f"- measured by {m.description}; **{m.count} runs of {m.placements} distinct placements** "
        f"({', '.join(f'{k}: {v}' for k, v in phases.items())}), {m.invalid} invalid; the search evaluated "
        f"{result.search.evaluated:,} placements. During the search a placement seen before is not measured "
        "again; the final confirmation runs the leading ones again beside the single devices, twice (two "
        "jobs, the second in reverse order), and their figures are the means of those two runs.",
    ]
    if m.reward == "hybrid":
        lines.append(f"- the simulator was recalibrated {m.search_calibrations} time(s) during the search, "
                     f"in {len(m.rounds)} measurement round(s){_set_aside_text(m)}.")
    if m.calibration is not None:
        cal = m.calibration
        scales = ", ".join(f"{d} ×{k:.2f}" for d, k in zip(cal.device_names, cal.compute_scale))
        lines.append(f"- calibration on all {cal.after.get('n', 0)} valid measurements: before "
                     f"{_agreement_text(cal.before)}; after {_agreement_text(cal.after)} "
                     f"(compute {scales}; links latency ×{cal.latency_scale:.2f}, bandwidth "
                     f"×{cal.bandwidth_scale:.2f}; overhead {cal.overhead_s * 1e3:.3f} ms per step).")
    if m.holdout is not None:
        lines.append(f"- placements measured after a calibration predicted them ({m.holdout['n']}): "
                     f"uncalibrated simulator {_agreement_text(m.holdout['uncalibrated'])}; calibrated "
                     f"{_agreement_text(m.holdout['calibrated'])}{_spread_caveat(m)}.")
    if m.repeats:
        lines.append(f"- repeat runs (the last two of each placement run more than once; the final comparison runs "
                     f"its placements in two jobs): {_repeats_text(m.repeats)}.")
    if m.rounds:
        lines += ["", "| round | at (s) | evaluated | measured | recalibrations | fit before calibration | after "
                      "| best measured (ms) |", "|:--|--:|--:|--:|--:|:--|:--|--:|"]
        for r in m.rounds:
            lines.append(f"| {r['phase']} | {r['at_s']:.1f} | {r['evaluated']:,} | {r['measured']} | "
                         f"{r['calibrations']} | {_agreement_text(r['before'])} | {_agreement_text(r['after'])} | "
                         f"{'' if r['best_ms'] is None else format(r['best_ms'], '.3f')} |")
    lines += ["", f"Measured placements (device index per group; devices {', '.join(problem.device_names)}):", "",
              "| # | phase | placement | measured (ms) | simulated (ms) | predicted (ms) | methods | note |",
              "|--:|:--|:--|--:|--:|--:|:--|:--|"]
    for i, r in enumerate(m.records):
        who = ", ".join(methods.get(r.row.tobytes(), []))
        lines.append(f"| {i} | {r.phase} | `{_row_text(r.row)}` | {_ms(r.step_time)} | {_ms(r.simulated)} | "
                     f"{_ms(r.predicted)} | {who} | {r.reason} |")
    if getattr(m, "pipelines", None):
        lines += ["", "Pipelined candidates, measured as pipelines (torch.distributed.pipelining, one process per "
                      "stage device):", "",
                  "| method | stages × M, schedule | measured (ms) | simulated (ms) | note |", "|:--|:--|--:|--:|:--|"]
        for pm in m.pipelines:
            shape = f"{len(pm.pipeline['stages'])} × {pm.pipeline['microbatches']}, {pm.pipeline['schedule']}"
            lines.append(f"| {pm.method} | {shape} | {_ms(pm.step_time)} | {_ms(pm.simulated)} | {pm.reason} |")
    lines += ["", "Predicted: the calibrated simulator's figure before the placement was measured (hybrid, "
              "once a calibration existed). Measured times are medians of timed steps on these devices; on a "
              "shared machine they vary from run to run.", ""]
    return lines


def write_measurements(result: "OptimizeResult", out_dir: Path) -> None:
    """``measurements.json`` and ``calibration.json`` of a run on real devices."""
    path = out_dir / "calibration.json"
    if result.measurement is None:
        return
    doc = result.measurement.to_dict(result.problem)
    write_text_atomic(out_dir / "measurements.json", json.dumps(doc, indent=2, default=float) + "\n")
    if doc["calibration"] is not None:
        cal = {**doc["calibration"], "rounds": doc["rounds"], "holdout": doc["holdout"]}
        write_text_atomic(path, json.dumps(cal, indent=2, default=float) + "\n")
    elif path.exists():
        path.unlink()  # a stale calibration from an earlier run would describe other measurements


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then interrupt as the handler
    that was in place would have: the result files are written as one set. Without it a
    second Ctrl-C while they were written left placement.json without its report.md, and a
    second SIGTERM still did (walkthroughs: two signals 1.5 s apart). Only the main thread can
    hold signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        handler = previous[signal.Signals(caught[0])]
        if callable(handler):
            handler(caught[0], None)  # the CLI's: records the signal for the exit status, then raises
        raise KeyboardInterrupt


def write_results(result: "OptimizeResult", out_dir: Path) -> Path:
    """Write every result file into ``out_dir``; returns the path of report.md. An interrupt
    while they are written takes effect once all are (:func:`interrupts_deferred`)."""
    with interrupts_deferred():
        return _write_results(result, out_dir)


def _write_results(result: "OptimizeResult", out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written after the check: "checked" says whether it ran and passed (--no-check: false).
    checked = result.check is not None and result.check.ok
    save_placement(dataclasses.replace(result.placement, metadata={**result.placement.metadata, "checked": checked}),
                   out_dir / "placement.json")
    device_map, device_map_note = _write_device_map(result, out_dir)
    write_measurements(result, out_dir)
    write_text_atomic(out_dir / "comparison.csv", table_for_files(result.table).to_csv(index=False))
    pictures = write_pictures(result, out_dir)
    report = out_dir / "report.md"
    write_text_atomic(report, render_report(result, pictures, device_map, device_map_note) + "\n")
    return report


def summary_lines(result: "OptimizeResult") -> list[str]:
    """A short summary for the terminal: the comparison (:func:`~placer.report.terminal_table.comparison_lines`)
    and what the measurements say."""
    out = comparison_lines(result.table)
    m = result.measurement
    if m is not None:
        out.append(f"reward {m.reward}: {m.count} runs of {m.placements} placements measured ({m.invalid} invalid) "
                   f"by {m.description}")
        if m.pipelines:
            bad = [p for p in m.pipelines if not p.valid]
            out.append(f"pipelines measured as pipelines: {len(m.pipelines)} ({len(bad)} invalid"
                       + (f"; first failure: {bad[0].reason.splitlines()[0][:200]}" if bad else "") + ")")
        if m.count and m.invalid == m.count:
            first = next((r.reason for r in m.records if not r.valid and r.reason), "no reason given")
            # Pipelines and DDP run in jobs of their own: they may have been measured all the same.
            others = (result.table["source"] == "measured").any()
            out.append("warning: no un-pipelined placement could be measured, so "
                       + ("their step times above are simulated; the rows marked measured ran in jobs of their own "
                          "(pipelines, DDP, the one-process reference)" if others else "every step time above is simulated")
                       + f" (first failure: {first.splitlines()[0][:200]})")
        if m.reward == "hybrid":
            out.append(f"simulator recalibrated {m.search_calibrations} time(s) in {len(m.rounds)} round(s)"
                       + _set_aside_text(m))
        if m.calibration is not None:
            out.append(f"calibration: before {_agreement_text(m.calibration.before)}; "
                       f"after {_agreement_text(m.calibration.after)}")
        if m.holdout is not None:
            out.append(f"held-out ({m.holdout['n']}): uncalibrated {_agreement_text(m.holdout['uncalibrated'])}; "
                       f"calibrated {_agreement_text(m.holdout['calibrated'])}{_spread_caveat(m)}")
        if m.repeats:
            out.append(f"repeat runs: {_repeats_text(m.repeats)}")
    return out


def _spread_caveat(m: MeasurementSummary) -> str:
    """Why a held-out Spearman says little: its placements are predicted closer together
    than two runs of one placement differ (the rounds measure the search's near-equal best)."""
    spread = (m.holdout or {}).get("predicted_spread")
    if spread is None or not m.repeats or spread >= 2 * m.repeats["median"]:
        return ""
    return (f" (the predictions span {spread:.1%}, within twice the {m.repeats['median']:.1%} that repeat runs "
            "differ by: the Spearman ranks noise)")


def _repeats_text(repeats: Mapping[str, float]) -> str:
    """How far two runs of one placement differed: the noise that measured comparisons sit in."""
    text = (f"{int(repeats['n'])} placement(s) run twice differed by {repeats['median']:.1%} (median), "
            f"{repeats['max']:.1%} at most; measured differences smaller than that are noise")
    shift = float(repeats.get("shift", 0.0))
    if repeats["n"] >= 3 and repeats.get("one_way") and abs(shift) >= repeats["median"] / 2:
        text += (f" (every one ran {'slower' if shift > 0 else 'faster'} the second time, {abs(shift):.1%} at the "
                 "median: much of it is the machine's state between jobs, which placements run side by side share)")
    return text


def _set_aside_text(m: MeasurementSummary) -> str:
    """The fits the search did not use, in words ("" when it used every one)."""
    if not m.calibrations_set_aside:
        return ""
    return (f"; {m.calibrations_set_aside} fit(s) set aside, since they predicted measurements left out of "
            "them no better than the uncalibrated simulator")
