"""Pictures of a placement: the placed graph, memory per device, search curves (also by phase).

Each function writes one PNG with matplotlib's Agg backend (no display needed) and
returns its path. The simulated schedule (Gantt chart) lives with the simulator in
:mod:`placer.report.gantt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402

from envs.hardware.units import format_bytes  # noqa: E402
from graphs.atomic_write import atomic_path  # noqa: E402
from placer.search.tracker import SEEDS, Improvement, credit  # noqa: E402

GIB = 2**30


def _device_colours(devices: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(devices) <= 10 else "tab20")
    return {d: cmap(i % cmap.N) for i, d in enumerate(devices)}


def topological_layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Positions with x = longest-path depth and y spread within each depth (readable for DAGs)."""
    depth: dict[str, int] = {}
    for n in nx.topological_sort(graph):
        depth[n] = max((depth[p] + 1 for p in graph.predecessors(n)), default=0)
    by_depth: dict[int, list[str]] = {}
    for n, d in depth.items():
        by_depth.setdefault(d, []).append(n)
    pos = {}
    for d, nodes in by_depth.items():
        for i, n in enumerate(nodes):
            pos[n] = (float(d), (i - (len(nodes) - 1) / 2.0))
    return pos


def plot_placed_graph(
    graph: nx.DiGraph, placement: Mapping[str, str], devices: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Draw ``graph`` with each node coloured by its device (node size ~ its compute time)."""
    path = Path(path)
    colours = _device_colours(devices)
    pos = topological_layout(graph)
    times = np.array([sum(graph.nodes[n].get("time", {}).values()) or 0.0 for n in graph.nodes])
    sizes = 20 + 300 * (times / times.max() if times.max() > 0 else np.zeros_like(times))
    width = min(40.0, 6 + 0.15 * (max(x for x, _ in pos.values()) if pos else 0))
    fig, ax = plt.subplots(figsize=(width, 6))
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.25, arrows=False, width=0.5)
    nx.draw_networkx_nodes(
        graph, pos, ax=ax, node_size=sizes, node_color=[colours[placement[n]] for n in graph.nodes]
    )
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=d) for d, c in colours.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title or f"placement of {graph.number_of_nodes()} nodes (colour = device)")
    ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_memory(
    devices: Sequence[str], peak_memory: Sequence[float] | np.ndarray, capacity: Sequence[float] | np.ndarray,
    path: str | Path, title: str = ""
) -> Path:
    """Peak memory per device as a share of its capacity, each bar labelled with the absolute figures.

    Bars are per cent of each device's own capacity, so 129 MiB on a 130 GiB device
    reads as 0.1 % next to its label rather than as an invisible bar on a 130 GiB axis,
    and devices of different sizes compare at a glance. A bar over 100 % (red) does not fit.
    """
    path = Path(path)
    peak = np.asarray(peak_memory, dtype=float)
    cap = np.asarray(capacity, dtype=float)
    share = np.where(cap > 0, 100.0 * peak / np.where(cap > 0, cap, 1.0), np.inf)
    top = float(np.nanmax(np.where(np.isfinite(share), share, 0.0), initial=0.0))
    limit = max(100.0, top) * 1.45  # room to the right of the bars for their labels
    fig, ax = plt.subplots(figsize=(8, max(2.2, 0.55 * len(devices) + 1.2)))
    y = np.arange(len(devices))
    colours = ["tab:red" if s > 100 else "tab:blue" for s in share]
    ax.barh(y, np.minimum(np.nan_to_num(share, posinf=limit), limit), color=colours, height=0.6)
    ax.axvline(100.0, color="black", lw=1, ls="--")
    ax.text(100.0, -0.6, " capacity", fontsize=8, va="bottom")
    for i, (p, c, s) in enumerate(zip(peak, cap, share)):
        label = f"{format_bytes(p)} of {format_bytes(c)}"
        if not np.isfinite(s):  # no capacity at all: the bar fills the axis, the label sits inside
            ax.text(limit * 0.01, i, f"{label} (no capacity)", va="center", fontsize=8, color="white")
            continue
        pct = f"{s:.1f} %" if s >= 0.1 else ("unused" if p <= 0 else "< 0.1 %")
        ax.text(min(s, limit) + limit * 0.01, i, f"{label} ({pct})", va="center", fontsize=8)
    ax.set_yticks(y, devices)
    ax.set_xlim(0, limit)
    ax.set_xlabel("peak memory, % of the device's capacity")
    ax.set_title(title or "peak memory per device")
    ax.set_ylim(len(devices) - 0.5, -0.9)  # first device on top, room for the capacity label
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    """Write the figure atomically (a unique temporary file renamed over ``path``) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def plot_search_curves(
    histories: Mapping[str, Sequence[tuple[float, int, float]]], path: str | Path, title: str = ""
) -> Path:
    """Best step time so far against wall time and against evaluated placements, one line per method.

    ``histories`` maps a method name to ``(wall seconds, placements evaluated, best step time)`` points.
    """
    path = Path(path)
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in histories.items():
        if not points:
            continue
        wall, evaluated, best = (np.asarray(v, dtype=float) for v in zip(*points))
        ax_t.step(wall, best * 1e3, where="post", label=name)
        ax_n.step(np.maximum(evaluated, 1), best * 1e3, where="post", label=name)
    ax_t.set_xlabel("wall time (s)")
    ax_n.set_xlabel("placements evaluated")
    ax_n.set_xscale("log")
    for ax in (ax_t, ax_n):
        ax.set_ylabel("best step time (ms)")
        ax.grid(alpha=0.3)
    ax_n.legend(fontsize=8)
    fig.suptitle(title or "search progress")
    fig.tight_layout()
    _save(fig, path)
    return path


#: Colours of the search phases (:mod:`placer.search.tracker`): fixed, so pictures compare.
PHASE_COLOURS: dict[str, str] = {
    "seeds": "tab:grey",
    "policy": "tab:purple",
    "policy_moves": "tab:blue",
    "local_search": "tab:orange",
}


def plot_search_by_phase(improvements: Sequence[Improvement], path: str | Path, title: str = "") -> Path:
    """The search curve coloured by phase: best step time against placements evaluated.

    Each improvement of the best placement is a point in the colour of the phase that found it
    (seeds, policy, policy-guided moves, local search), and the curve from it to the next
    improvement keeps that colour, so the picture shows who held the best and for how long.
    The legend gives each phase's count and share of the gain over the seeds (the same
    :func:`placer.search.tracker.credit` the report's table uses).
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4))
    points = [i for i in improvements if np.isfinite(i.after)]
    shares = credit(list(improvements))
    if points:
        xs = np.maximum([float(i.evaluated) for i in points], 1.0)
        ys = np.array([i.after for i in points]) * 1e3
        end = max(xs[-1] * 1.5, xs[-1] + 1)
        for k, imp in enumerate(points):
            colour = PHASE_COLOURS.get(imp.phase, "tab:green")
            nxt = xs[k + 1] if k + 1 < len(points) else end
            ax.hlines(ys[k], xs[k], nxt, color=colour, lw=2)
            if k + 1 < len(points):
                ax.vlines(nxt, ys[k + 1], ys[k], color="black", lw=0.5, alpha=0.4)
            ax.plot(xs[k], ys[k], "o", color=colour, ms=5)
        ax.set_xscale("log")
    handles = []
    for phase in dict.fromkeys(i.phase for i in points):
        count = sum(i.phase == phase for i in points)
        share = "" if phase == SEEDS else f", {shares.get(phase, 0.0):.0%} of the gain"
        handles.append(plt.Line2D([], [], marker="o", color=PHASE_COLOURS.get(phase, "tab:green"),
                                  label=f"{phase} ({count}{share})"))
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_xlabel("placements evaluated")
    ax.set_ylabel("best step time (ms)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "search progress by phase (colour = the phase that found the best)")
    fig.tight_layout()
    _save(fig, path)
    return path
