"""The terminal summary and report.md say "measured" only of what was measured."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from placer.measuring.measurer import MeasuredPlacement
from placer.measuring.summary import MeasurementSummary
from placer.report.results import summary_lines

TABLE = pd.DataFrame([{"method": "heft", "step_time": 0.001, "speedup_vs_single": 1.0, "fits": True,
                       "source": "simulated"}])


def _result(valid: list[bool]) -> SimpleNamespace:
    records = [MeasuredPlacement(np.zeros(3, dtype=np.int64), 0.001 if ok else float("inf"), ok,
                                 "" if ok else "measurement failed: NotImplementedError: no train()", "search", 0.001)
               for ok in valid]
    return SimpleNamespace(table=TABLE, measurement=MeasurementSummary("hybrid", "2 worker processes", records,
                                                                       len(records)))


def test_when_no_placement_could_be_measured_the_summary_warns_that_every_time_is_simulated():
    lines = summary_lines(_result([False, False]))
    assert ("warning: no un-pipelined placement could be measured, so every step time above is simulated (first "
            "failure: measurement failed: NotImplementedError: no train())") in lines


def test_when_only_the_pipelines_and_ddp_ran_the_warning_says_their_rows_were_measured():
    """Pipelines and DDP run in jobs of their own: a model whose placements all failed (the
    workers captured it without the user's leaf modules) still had them measured."""
    result = _result([False, False])
    result.table = pd.concat([TABLE, pd.DataFrame([{"method": "ddp", "step_time": 0.002, "speedup_vs_single": 0.5,
                                                     "fits": True, "source": "measured"}])], ignore_index=True)
    assert ("warning: no un-pipelined placement could be measured, so their step times above are simulated; the rows "
            "marked measured ran in jobs of their own (pipelines, DDP, the one-process reference) (first failure: "
            "measurement failed: NotImplementedError: no train())") in summary_lines(result)


def test_when_some_were_measured_there_is_no_such_warning():
    assert not any(line.startswith("warning:") for line in summary_lines(_result([False, True])))


def test_pipelines_that_failed_to_run_as_pipelines_are_counted_with_the_first_reason():
    from placer.measuring.measurer import MeasuredPipeline

    result = _result([True])
    result.measurement.pipelines.extend([
        MeasuredPipeline("pipeline:even_layers", {}, float("inf"), False, "measurement failed: unhashable type", 1e-3),
        MeasuredPipeline("placer (pipeline search)", {}, 2e-3, True, "", 1e-3)])
    assert ("pipelines measured as pipelines: 2 (1 invalid; first failure: measurement failed: unhashable type)"
            in summary_lines(result))


def test_a_held_out_spearman_over_placements_closer_than_the_noise_says_so():
    result = _result([True, True])
    score = {"n": 4, "spearman": 0.17, "mape": 0.02}
    result.measurement.repeats = {"n": 4, "median": 0.019, "max": 0.049}
    result.measurement.holdout = {"n": 4, "uncalibrated": score, "calibrated": score, "predicted_spread": 0.024}
    [line] = [x for x in summary_lines(result) if x.startswith("held-out")]
    assert "the predictions span 2.4%, within twice the 1.9% that repeat runs differ by" in line
    result.measurement.holdout["predicted_spread"] = 0.30  # far apart: the Spearman means something
    [line] = [x for x in summary_lines(result) if x.startswith("held-out")]
    assert "span" not in line
    assert any(x.startswith("repeat runs: 4 placement(s) run twice differed by 1.9%") for x in summary_lines(result))


def test_repeat_runs_that_all_moved_one_way_are_said_to_be_the_machines_state_between_jobs():
    from placer.measuring.summary import repeat_spread

    # Every placement run again in a later job ran 12-32% slower (a rnnlm hybrid run, 2026-12-06 21:11 UTC).
    slower = repeat_spread([("a", 2.786), ("b", 2.945), ("c", 3.6), ("d", 3.673),
                            ("a", 3.674), ("b", 3.522), ("c", 4.068), ("d", 4.109)])
    assert slower is not None and slower["shift"] > slower["median"] / 2
    result = _result([True])
    result.measurement.repeats = slower
    [line] = [x for x in summary_lines(result) if x.startswith("repeat runs:")]
    assert ("every one ran slower the second time, 16.3% at the median: much of it is the machine's state between "
            "jobs") in line
    # Three of four moved one way (the same command at 21:13 UTC): no such words.
    both = repeat_spread([("a", 3.656), ("b", 3.857), ("c", 4.995), ("d", 4.642),
                          ("a", 3.703), ("b", 3.739), ("c", 4.538), ("d", 4.538)])
    assert both is not None and not both["one_way"]
    result.measurement.repeats = both
    [line] = [x for x in summary_lines(result) if x.startswith("repeat runs:")]
    assert "machine's state" not in line
