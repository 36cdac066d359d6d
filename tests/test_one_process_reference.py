"""Over CPU worker processes, the split is compared with the unsplit model in one process on the
same cores: a measured reference row that never wins, and a final line that says which is faster."""

from __future__ import annotations

import pandas as pd
import pytest

import placer
from envs.runtime.measurer import MeasureCache, MeasureError, MeasureResult
from placer.report.compare import ONE_PROCESS_KIND
from placer.report.terminal_table import comparison_lines
from placer.search.baselines.pipeline_rows import recommendation_line
from tests.helpers.measurers import ClosableFake
from tests.helpers.model_files import CHAIN_MLP


@pytest.fixture
def model_file(tmp_path, fake_links):
    path = tmp_path / "chain.py"
    path.write_text(CHAIN_MLP)
    return path


class OneProcessFake(ClosableFake):
    """Every placement at 10 ms; one process with the workers' 2 threads at ``one_process_s``."""

    def __init__(self, one_process_s: float):
        self.cache = MeasureCache()
        self.one_process_s = one_process_s
        self.one_process_runs = 0

    def measure(self, placements):
        return [MeasureResult(step_time=0.010) for _ in placements]

    def one_process_threads(self):
        return 2

    def measure_one_process(self):
        self.one_process_runs += 1
        return MeasureResult(step_time=self.one_process_s, note="1 worker process (2 threads)")


def test_the_one_process_reference_is_measured_shown_and_never_the_placement_written(model_file, capsys):
    fake = OneProcessFake(0.005)
    result = placer.optimize(str(model_file), devices="cpu:0,cpu:1", reward="measured", budget="40",
                             measurer=fake, baselines="single", seed=0)
    assert fake.one_process_runs == 1
    ref = result.table[result.table["kind"] == ONE_PROCESS_KIND]
    assert list(ref["method"]) == ["one process, 2 threads"]
    assert ref.iloc[0]["source"] == "measured" and ref.iloc[0]["step_time"] == pytest.approx(0.005)
    assert ref.iloc[0]["speedup_vs_single"] == pytest.approx(2.0)  # over the measured single worker, 10 ms
    assert result.winner != "one process, 2 threads" and result.step_time == pytest.approx(0.010)
    line = recommendation_line(result.table, result.winner)
    assert ("one process, 2 threads runs the unsplit model in 5.000 ms, 2.00x faster than" in line
            and "keep the model in one process" in line)
    assert any(text.startswith("one process, 2 threads") for text in comparison_lines(result.table))


def _table(one_process_s: float) -> pd.DataFrame:
    return pd.DataFrame({
        "method": ["split", "single", "one process, 2 threads"],
        "kind": ["placement", "placement", ONE_PROCESS_KIND],
        "step_time": [0.006, 0.010, one_process_s], "fits": [True] * 3, "source": ["measured"] * 3,
        "note": ["", "", ""]})


@pytest.mark.parametrize("one_process_s, says", [
    (0.009, "split is 1.50x faster than one process, 2 threads (9.000 ms, the unsplit model)"),
    (0.0061, "one process, 2 threads runs the unsplit model in 6.100 ms, within the 3.0% two runs of one placement "
             "differed by: running it over the worker processes does not pay on these cores"),
    (0.004, "one process, 2 threads runs the unsplit model in 4.000 ms, 1.50x faster than split: on these cores, "
            "keep the model in one process"),
])
def test_the_final_line_says_whether_the_split_beats_one_process_on_the_same_cores(one_process_s, says):
    line = recommendation_line(_table(one_process_s), "split", noise=0.03)
    assert line.startswith("recommendation: split (6.000 ms per step, placement, measured)")  # never the reference
    assert says in line


def test_one_process_runs_the_unsplit_model_with_the_threads_of_every_worker(model_file):
    from envs.runtime.distributed.measure import DistributedMeasurer

    measurer = DistributedMeasurer(str(model_file), {}, "cpu:0,cpu:1", warmup=1, repeats=2, min_timed_s=0)
    assert measurer.one_process_threads() == 2
    result = measurer.measure_one_process()
    assert result.valid, result.reason
    assert len(result.times) == 2 and result.note.startswith("1 worker process (2 threads)")
    assert measurer.measure_one_process().cached
    alone = DistributedMeasurer(str(model_file), {}, "cpu:0")
    assert alone.one_process_threads() is None
    with pytest.raises(MeasureError, match="needs two local CPU workers or more"):
        alone.measure_one_process()


def test_one_process_takes_one_thread_per_core_at_most(model_file, monkeypatch):
    """Four workers on two cores share two cores: one process runs two threads there, not four."""
    from envs.runtime.distributed import measure

    monkeypatch.setattr(measure.os, "sched_getaffinity", lambda pid: {0, 1})
    four = measure.DistributedMeasurer(str(model_file), {}, "cpu:0,cpu:1,cpu:2,cpu:3")
    assert four.one_process_threads() == 2
    monkeypatch.setattr(measure.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert four.one_process_threads() == 4
