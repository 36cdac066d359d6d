"""Outputs of the benchmark harness: the Markdown table, bar charts, search curves, files.

Pure presentation of the table :func:`placer.benchmark.run_benchmark` returns (columns in
:data:`placer.benchmark.COLUMNS`); nothing here simulates or measures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from graphs.atomic_write import atomic_path, write_text_atomic


def markdown(table: pd.DataFrame) -> str:
    """The benchmark table as Markdown (times in ms, ratios to 2 decimals)."""
    shown = table.copy()
    shown["step_time"] = shown["step_time"].map(lambda s: "" if pd.isna(s) else f"{s * 1e3:.3f}")
    shown = shown.rename(columns={"step_time": "step_time_ms"})
    for col in ("speedup_vs_single", "ratio_to_lower_bound"):
        shown[col] = shown[col].map(lambda s: "" if pd.isna(s) else f"{s:.2f}")
    shown["search_time"] = shown["search_time"].map(lambda s: f"{s:.2f}")
    shown["note"] = shown["note"].map(lambda s: (s[:90] + "…") if isinstance(s, str) and len(s) > 91 else s)
    return shown.to_markdown(index=False)


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def plot_bars(table: pd.DataFrame, model: str, path: Path) -> Path | None:
    """Bar chart of step time per method (one bar per cluster) for one model; ``single:*`` rows
    left out. None (no chart) when no method found a fitting placement: there is nothing to draw,
    and the table's notes say why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = table[table["model"] == model]
    # Per-device single placements stay in the table; the chart keeps the best one ("single")
    # so a slow host CPU does not flatten every other bar.
    sub = sub[~sub["method"].str.startswith("single:")] if (sub["method"] == "single").any() else sub
    pivot = sub.pivot_table(index="method", columns="cluster", values="step_time", aggfunc="first", sort=False) * 1e3
    if pivot.empty or not pivot.notna().to_numpy().any():
        return None
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.3 * len(pivot) * max(1, len(pivot.columns)))), 4.5))
    pivot.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("step time (ms, lower is better)")
    ax.set_title(f"{model}: step time by method (missing bar = no fitting placement)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a crash or second Ctrl-C never leaves half a PNG
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def write_outputs(table: pd.DataFrame, histories: Mapping[tuple[str, str], Mapping[str, list]], out: Path) -> list[Path]:
    """Write CSV, Markdown, a bar chart per model and search curves; return the paths."""
    from placer.report.plots import plot_search_curves

    paths = [out / "results.csv", out / "results.md"]
    # Atomically, like every other output: an interrupted run never leaves half a table.
    write_text_atomic(paths[0], table.to_csv(index=False))
    write_text_atomic(paths[1], markdown(table) + "\n")
    for model in table["model"].unique():
        bars = plot_bars(table, model, out / f"bars_{_safe(str(model))}.png")
        if bars is not None:
            paths.append(bars)
    for (model, cluster), hist in histories.items():
        paths.append(plot_search_curves(hist, out / f"search_{_safe(model)}_{_safe(cluster)}.png",
                                        title=f"{model} on {cluster}: best step time found"))
    return paths
