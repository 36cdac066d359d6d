"""The terminal's comparison table: shared lines for equal figures, the compared rows always shown."""

from __future__ import annotations

import math

import pandas as pd

from placer.report.terminal_table import comparison_lines


def _table(rows: list[tuple[str, float, str]], source: str = "measured") -> pd.DataFrame:
    """A comparison table in its order: (method, step seconds or nan, kind)."""
    return pd.DataFrame({
        "method": [m for m, _, _ in rows],
        "step_time": [t for _, t, _ in rows],
        "speedup_vs_single": [0.01 / t if math.isfinite(t) else math.nan for _, t, _ in rows],
        "fits": [math.isfinite(t) for _, t, _ in rows],
        "source": [source if math.isfinite(t) else math.nan for _, t, _ in rows],
        "kind": [k for _, _, k in rows],
    })


def _method_cells(lines: list[str]) -> list[str]:
    return [line.split("  ")[0].strip() for line in lines[1:] if not line.startswith("(")]


def test_rows_with_the_same_figures_share_one_line_led_by_the_winner() -> None:
    table = _table([("critical_path", 0.01, "placement"), ("heft", 0.01, "placement"),
                    ("placer (moves)", 0.01, "placement"), ("single", 0.01, "placement"),
                    ("ddp", 0.012, "ddp")])
    assert _method_cells(comparison_lines(table)) == ["critical_path, placer (moves), single +1", "ddp"]


def test_equal_times_of_different_kinds_or_sources_keep_their_own_lines() -> None:
    table = pd.concat([_table([("heft", 0.01, "placement"), ("pipeline:even_layers", 0.01, "pipeline")]),
                       _table([("m_topo", 0.01, "placement")], source="simulated")], ignore_index=True)
    assert _method_cells(comparison_lines(table)) == ["heft", "pipeline:even_layers", "m_topo"]


def test_single_ddp_placer_and_the_fastest_pipeline_are_shown_past_the_top_lines() -> None:
    rows = [(f"h{i}", 0.010 + 0.001 * i, "placement") for i in range(10)]
    rows += [("single", 0.030, "placement"), ("placer (pipeline search)", 0.031, "pipeline"),
             ("pipeline:even_layers", 0.032, "pipeline"), ("pipeline:even_params", 0.033, "pipeline"),
             ("ddp", 0.034, "ddp")]
    lines = comparison_lines(_table(rows), top=3)
    assert _method_cells(lines) == ["h0", "h1", "h2", "single", "placer (pipeline search)", "ddp"]
    assert lines[-1] == "(9 more row(s) in report.md)"


def test_the_fastest_pipeline_is_shown_when_no_placer_row_is_a_pipeline() -> None:
    rows = [(f"h{i}", 0.010 + 0.001 * i, "placement") for i in range(5)]
    rows += [("pipeline:pipedream_dp", 0.020, "pipeline"), ("pipeline:even_layers", 0.021, "pipeline")]
    assert "pipeline:pipedream_dp" in _method_cells(comparison_lines(_table(rows), top=2))
    assert "pipeline:even_layers" not in _method_cells(comparison_lines(_table(rows), top=2))


def test_rows_without_a_placement_never_share_a_line_and_say_so() -> None:
    table = _table([("heft", 0.01, "placement"), ("placer (pipeline x DDP)", math.nan, "pipeline"),
                    ("pipeline:x", math.nan, "pipeline")])
    lines = comparison_lines(table)
    assert _method_cells(lines) == ["heft", "placer (pipeline x DDP)", "pipeline:x"]
    assert lines[2].split() == ["placer", "(pipeline", "x", "DDP)", "-", "-", "-", "none:", "no", "fitting", "placement"]


def test_a_long_shared_line_counts_the_names_it_does_not_write() -> None:
    names = ["critical_path", "balanced", "sequential", "m_sct", "m_etf", "heft"]
    [cell] = _method_cells(comparison_lines(_table([(n, 0.01, "placement") for n in names])))
    written = cell.split(" +")[0].split(", ")
    assert written[0] == "critical_path"
    assert len(written) + int(cell.rsplit("+", 1)[1]) == len(names)


def test_a_row_without_a_placement_says_why_instead_of_not_fitting() -> None:
    table = _table([("single", 0.01, "placement"), ("placer (pipeline x DDP)", math.nan, "pipeline")])
    table["note"] = [None, "no pipeline x DDP hybrid on 2 devices: one needs 4 devices at least; 600 pipelines simulated"]
    line = comparison_lines(table)[2]
    assert line.split()[4:7] == ["-", "-", "-"]
    assert line.endswith("none: no pipeline x DDP hybrid on 2 devices: one needs 4 devices at least")


def test_the_markdown_table_leaves_the_comparison_table_as_it_was():
    """report.md writes times in ms as text: on the table itself they would reach comparison.csv and the final line."""
    from placer.report.compare import markdown_table

    table = _table([("single", 0.01, "placement")]).assign(simulated_step_time=0.01, ratio_to_lower_bound=1.0,
                                                           search_time=0.0)
    for t in (table, table.assign(measured_runs=[(0.01, 0.011)])):
        before = t.copy()
        markdown_table(t)
        pd.testing.assert_frame_equal(t, before)
