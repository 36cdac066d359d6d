"""Pictures of a placement: the placed graph, memory per device, search curves.

Each function writes one PNG with matplotlib's Agg backend (no display needed) and
returns its path. The simulated schedule (Gantt chart) lives with the simulator in
:mod:`placer.report.gantt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402

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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(
    devices: Sequence[str], peak_memory: Sequence[float], capacity: Sequence[float], path: str | Path, title: str = ""
) -> Path:
    """Bar chart of peak memory per device against its capacity (GiB)."""
    path = Path(path)
    peak = np.asarray(peak_memory, dtype=float) / GIB
    cap = np.asarray(capacity, dtype=float) / GIB
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(devices)), 3.5))
    x = np.arange(len(devices))
    colours = ["tab:red" if p > c else "tab:blue" for p, c in zip(peak, cap)]
    ax.bar(x, peak, color=colours, label="peak memory")
    ax.scatter(x, cap, marker="_", s=600, color="black", label="capacity")
    ax.set_xticks(x, devices, rotation=30, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title(title or "peak memory per device")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
