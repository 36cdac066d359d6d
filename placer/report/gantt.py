"""A Gantt chart (PNG) of one simulated training step.

One row per device (forward ops and backward ops in two colours) and one row per link
direction that carried data (forward copies and gradient copies in two colours), on a
shared time axis in milliseconds. The timeline comes from :func:`envs.sim.simulator.schedule`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from envs.sim.problem import PlacementProblem
from envs.sim.simulator import Schedule, schedule

COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "copy": "#55A868", "gradient copy": "#C44E52"}


def _bars(start: np.ndarray, end: np.ndarray) -> list[tuple[float, float]]:
    keep = ~np.isnan(start) & (end > start)
    return [(float(s) * 1e3, float(e - s) * 1e3) for s, e in zip(start[keep], end[keep])]


def gantt_rows(problem: PlacementProblem, sched: Schedule) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """The chart's content without drawing it: ``[(row label, {category: [(start_ms, width_ms)]})]``."""
    rows = []
    for d, name in enumerate(problem.device_names):
        on = sched.placement == d
        rows.append((name, {
            "forward": _bars(sched.fwd_start[on], sched.fwd_end[on]),
            "backward": _bars(sched.bwd_start[on], sched.bwd_end[on]),
        }))
    src_dev = sched.placement[problem.edge_src]
    dst_dev = sched.placement[problem.edge_dst]
    for a, name_a in enumerate(problem.device_names):
        for b, name_b in enumerate(problem.device_names):
            if a == b:
                continue
            fwd = (src_dev == a) & (dst_dev == b)  # copies a -> b
            grad = (dst_dev == a) & (src_dev == b)  # gradients flow consumer -> producer
            bars = {
                "copy": _bars(sched.fwd_xfer_start[fwd], sched.fwd_xfer_end[fwd]),
                "gradient copy": _bars(sched.bwd_xfer_start[grad], sched.bwd_xfer_end[grad]),
            }
            if bars["copy"] or bars["gradient copy"]:
                rows.append((f"{name_a}→{name_b}", bars))
    return rows


def plot_gantt(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
               path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the simulated step of ``placement`` to a PNG at ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sched = schedule(problem, placement)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
