"""A Gantt chart (PNG) of one simulated training step, op by op.

Rows, as the simulator runs the step (:mod:`envs.sim.reference_simulator`): the **host
thread** (every op's dispatch in program order, the whole op for a CPU device, and the
backward of CPU ops), then per GPU its **stream** (forward and backward kernels) and its
autograd **engine thread** (backward launches), then one row per device pair that carried
forward copies. Shared time axis in milliseconds; the timeline comes from
:func:`envs.sim.simulator.schedule`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from envs.sim.problem import PlacementProblem
from envs.sim.simulator import Schedule, schedule
from graphs.atomic_write import atomic_path

COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "copy": "#55A868"}
HOST_ROW = "host thread"


def _bars(start: np.ndarray, end: np.ndarray) -> list[tuple[float, float]]:
    keep = ~np.isnan(start) & ~np.isnan(end) & (end > start)
    return [(float(s) * 1e3, float(e - s) * 1e3) for s, e in zip(start[keep], end[keep])]


def gantt_rows(problem: PlacementProblem, sched: Schedule) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """The chart's content without drawing it: ``[(row label, {category: [(start_ms, width_ms)]})]``."""
    cpu_kind = np.array([k == "cpu" for k in problem.device_kinds])
    on_cpu = cpu_kind[sched.op_device]
    rows = [(HOST_ROW, {
        "forward": _bars(sched.fwd_host_start, sched.fwd_host_end),
        "backward": _bars(sched.bwd_thread_start[on_cpu], sched.bwd_thread_end[on_cpu]),
    })]
    for d, name in enumerate(problem.device_names):
        on = sched.op_device == d
        if cpu_kind[d] or not on.any():
            continue
        rows.append((name, {
            "forward": _bars(sched.fwd_start[on], sched.fwd_end[on]),
            "backward": _bars(sched.bwd_start[on], sched.bwd_end[on]),
        }))
        rows.append((f"{name} engine thread", {"backward": _bars(sched.bwd_thread_start[on], sched.bwd_thread_end[on])}))
    for a, name_a in enumerate(problem.device_names):
        for b, name_b in enumerate(problem.device_names):
            from_a = sched.op_device == a
            if a == b or not from_a.any():
                continue
            bars = _bars(sched.copy_start[from_a, b], sched.copy_end[from_a, b])
            if bars:
                rows.append((f"{name_a}→{name_b}", {"copy": bars}))
    return rows


def plot_gantt(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
               path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the simulated step of ``placement`` to a PNG at ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sched = schedule(problem, placement, ops=_is_op_placement(problem, placement))
    rows = gantt_rows(problem, sched)
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    for y, (_, bars) in enumerate(rows):
        for category, spans in bars.items():
            if spans:
                ax.broken_barh(spans, (y - 0.38, 0.76), facecolors=COLOURS[category], edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, max(sched.result.step_time * 1e3, 1e-6) * 1.01)
    res = sched.result
    source = "simulated" if problem.simulated else "simulated with measured device figures"
    ax.set_title(title or (
        f"{problem.name} on {problem.cluster_name or 'cluster'}: step {res.step_time * 1e3:.3f} ms ({source})"
        + ("" if res.fits else " — does not fit in memory")
    ))
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="upper right", fontsize=8, ncol=4)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    try:
        with atomic_path(out) as tmp:  # a crash or second Ctrl-C never leaves half a PNG
            fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


def _is_op_placement(problem: PlacementProblem, placement: object) -> bool:
    """A dict naming ops (not groups) of a grouped problem is an op placement."""
    if isinstance(placement, Mapping):
        return problem.ops.num_ops != problem.num_nodes and not set(placement) <= set(problem.node_names)
    return False
