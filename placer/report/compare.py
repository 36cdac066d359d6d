"""The comparison table: every candidate placement through the same simulator, side by side.

Used by ``optimize`` (its report) and by the benchmark harness, so that every method's
figures come from one place and one set of rules.

Example::

    table = comparison_table(problem, [Candidate("single", row0), Candidate("agent", row1, 12.0, 5000)])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from envs.hardware.units import byte_display_unit
from envs.sim.lower_bound import lower_bound
from envs.sim.problem import PlacementProblem
from envs.sim.simulator import simulate_batch


@dataclass
class Candidate:
    """One method's placement (None when the method found no fitting one)."""

    method: str
    row: np.ndarray | None
    search_time: float = 0.0
    evaluated: int = 0
    note: str = ""
    measured_step_time: float | None = None
    history: list[tuple[float, int, float]] = field(default_factory=list)
    #: The step times of the runs ``measured_step_time`` is the mean of (the final comparison's).
    measured_runs: tuple[float, ...] = ()


def format_memory(peak: Sequence[float]) -> str:
    """Peak memory per device in one unit that suits the largest, e.g. ``"1.2/0.4/0/0 GiB"``."""
    unit, scale = byte_display_unit(max((float(b) for b in peak), default=0.0))
    return "/".join(f"{b / scale:.3g}" for b in peak) + f" {unit}"


def comparison_table(problem: PlacementProblem, candidates: Sequence[Candidate]) -> pd.DataFrame:
    """Simulate every candidate in one batch and tabulate step time, speed-up and memory.

    Columns: method, step_time (s; measured where a measurement exists, else simulated),
    simulated_step_time, speedup_vs_single (over the fastest fitting single-device
    placement), ratio_to_lower_bound (the *simulated* step over the simulator's lower bound:
    the bound is the simulator's, and a measured time over it would mix two clocks),
    peak_memory (text, per device), fits, search_time, evaluated, source, note, measured_runs
    (seconds of each run a measured step time is the mean of; :func:`runs_text` writes them).
    Rows are sorted fastest first, methods without a placement last.
    """
    found = [c for c in candidates if c.row is not None]
    single_rows = np.repeat(np.arange(problem.num_devices)[:, None], problem.num_nodes, axis=1)
    rows = np.stack([problem.check_array(c.row) for c in found if c.row is not None] + list(single_rows))
    sim = simulate_batch(problem, rows)
    single_times = [t for t, ok in zip(sim.step_time[len(found):], sim.fits[len(found):]) if ok]
    best_single = min(single_times) if single_times else float("nan")
    bound = lower_bound(problem)

    records = []
    for i, c in enumerate(found):
        simulated = float(sim.step_time[i])
        step = c.measured_step_time if c.measured_step_time is not None else simulated
        records.append({
            "method": c.method,
            "step_time": step,
            "simulated_step_time": simulated,
            "speedup_vs_single": best_single / step if step > 0 else float("nan"),
            "ratio_to_lower_bound": simulated / bound if bound > 0 else float("nan"),
            "peak_memory": format_memory(sim.peak_memory[i]),
            "fits": bool(sim.fits[i]),
            "search_time": c.search_time,
            "evaluated": c.evaluated,
            "source": "measured" if c.measured_step_time is not None else "simulated",
            "note": c.note,
            "measured_runs": tuple(c.measured_runs) if c.measured_step_time is not None else (),
        })
    for c in candidates:
        if c.row is None:
            records.append({
                "method": c.method, "step_time": float("nan"), "simulated_step_time": float("nan"),
                "speedup_vs_single": float("nan"), "ratio_to_lower_bound": float("nan"),
                "peak_memory": "", "fits": False, "search_time": c.search_time,
                "evaluated": c.evaluated, "source": "", "note": c.note or "no fitting placement",
                "measured_runs": (),
            })
    return fastest_first(pd.DataFrame.from_records(records))


#: ``kind`` of the comparison table's measured reference row: the unsplit model in one process
#: with the threads of all the worker processes (:func:`placer.measuring.confirm.confirm_one_process`).
#: Not a placement: it never wins, the final line compares the winner with it.
ONE_PROCESS_KIND = "one_process"


def is_placer_method(method: object) -> bool:
    """Whether a comparison row is placer's own (its searches name their rows ``placer (...)``),
    not a baseline's, DDP's or a partitioner's.

    >>> is_placer_method("placer (moves)"), is_placer_method("pipeline:pipedream_dp")
    (True, False)
    """
    return str(method).startswith("placer")


def fastest_first(table: pd.DataFrame) -> pd.DataFrame:
    """``table``'s rows in the comparison's order: the fitting ones by step time, then the
    rest (no placement, does not fit). Rows that tie, most often one placement found by
    several methods, put ``single`` first (nothing split is the simplest account of that
    time), placer's own rows last (a search that only found what a method already had earns
    no credit for it), the others by name; the first row is the winner (``pick_winner``).

    >>> t = pd.DataFrame({"method": ["placer (moves)", "heft", "single"], "step_time": [1.0, 1.0, 1.0],
    ...                   "fits": [True, True, True]})
    >>> list(fastest_first(t)["method"])
    ['single', 'heft', 'placer (moves)']
    """
    order = np.where(table["fits"], table["step_time"], np.inf)
    method = table["method"].astype(str)
    tie = np.where(method == "single", 0, np.where(method.map(is_placer_method), 2, 1))
    return (table.assign(_order=order, _tie=tie).sort_values(["_order", "_tie", "method"], kind="stable")
            .drop(columns=["_order", "_tie"]).reset_index(drop=True))


def runs_text(runs: object) -> str:
    """The runs of a measured step time in milliseconds, as the report and comparison.csv write them.

    >>> runs_text((0.007969, 0.008045)), runs_text(())
    ('7.969 / 8.045', '')
    """
    if not isinstance(runs, (tuple, list)):
        return ""
    return " / ".join(f"{float(t) * 1e3:.3f}" for t in runs)


def table_for_files(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its runs written out (:func:`runs_text`, column ``measured_runs_ms``) for
    report.md and comparison.csv."""
    if "measured_runs" not in table.columns:
        return table.copy()  # a copy either way: markdown_table rewrites its columns in place
    return table.assign(measured_runs=table["measured_runs"].map(runs_text)).rename(
        columns={"measured_runs": "measured_runs_ms"})


def markdown_table(table: pd.DataFrame) -> str:
    """The comparison table as Markdown, with times in milliseconds."""
    shown = table_for_files(table)
    for col in ("step_time", "simulated_step_time"):
        shown[col] = shown[col].map(lambda s: "" if pd.isna(s) else f"{s * 1e3:.3f}")
    shown = shown.rename(columns={"step_time": "step_time_ms", "simulated_step_time": "simulated_ms"})
    for col in ("speedup_vs_single", "ratio_to_lower_bound"):
        shown[col] = shown[col].map(lambda s: "" if pd.isna(s) else f"{s:.2f}")
    shown["search_time"] = shown["search_time"].map(lambda s: f"{s:.1f}")
    return shown.to_markdown(index=False)
