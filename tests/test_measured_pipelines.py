"""``optimize --reward measured`` over worker processes: pipelined candidates are measured as
pipelines (DistributedMeasurer.measure_pipelines), not as their un-pipelined assignment."""

from __future__ import annotations

import json
import math

import pytest

import placer
from envs.runtime.measurer import MeasureCache, MeasureResult
from graphs.capture import capture
from graphs.pipeline import load_source
from placer.search.baselines.pipeline_rows import recommendation_line
from tests.helpers.measurers import ClosableFake
from tests.helpers.model_files import CHAIN_MLP

MODEL = CHAIN_MLP


@pytest.fixture
def model_file(tmp_path, fake_links):
    path = tmp_path / "chain.py"
    path.write_text(MODEL)
    return path


class PipelineFake(ClosableFake):
    """Measures every placement at 10 ms; the first pipeline it is asked for at 1 ms, the others
    refused (as a job that failed would be)."""

    def __init__(self):
        self.cache = MeasureCache()
        self.placements, self.pipelines = [], []
        self.ddp_runs = 0
        self.expected = []  # the expected step each training job was given

    def measure(self, placements):
        self.placements += [dict(p) for p in placements]
        return [MeasureResult(step_time=0.010) for _ in placements]

    def measure_data_parallel(self, expected_s=None):
        self.ddp_runs += 1
        self.expected.append(expected_s)
        return MeasureResult(step_time=0.004)

    def measure_pipelines(self, pipelines, expected_s=None):
        self.pipelines += list(pipelines)
        self.expected += list(expected_s or [None] * len(pipelines))
        return [MeasureResult(step_time=0.001) if i == 0 else
                MeasureResult(step_time=math.inf, valid=False, reason="the job failed: rank 1 exited with 1")
                for i in range(len(pipelines))]


def test_measured_optimize_measures_pipelined_candidates_as_pipelines_and_a_measured_pipeline_can_win(
        model_file, tmp_path):
    fake = PipelineFake()
    result = placer.optimize(str(model_file), devices="cpu:0,cpu:1", reward="measured", budget="40",
                             measurer=fake, baselines="single", out_dir=tmp_path / "out", seed=0)
    spec = load_source(str(model_file), {})
    ops = set(capture(spec.model, spec.example_inputs, name=spec.name).graph.nodes)
    keys = [json.dumps(p.to_dict(), sort_keys=True) for p in fake.pipelines]
    assert 1 <= len(keys) <= 2 and len(set(keys)) == len(keys)  # the top two distinct, each run once
    for pipe in fake.pipelines:  # what the workers run: stages over the ops, no replicas
        assert {n for s in pipe.stages for n in s} == ops and not pipe.replicas
        assert set(pipe.devices) <= {"cpu:0", "cpu:1"}
    table = result.table.set_index("method")
    first = fake.pipelines[0]
    measured = [m for m in result.measurement.pipelines if m.valid]
    assert measured and all(m.pipeline == first.to_dict() for m in measured)
    for m in measured:
        assert table.at[m.method, "source"] == "measured" and table.at[m.method, "step_time"] == pytest.approx(0.001)
        assert "measured as a pipeline" in table.at[m.method, "note"]
    assert result.winner in {m.method for m in measured} and result.source == "measured"
    assert result.placement.pipeline is not None and result.placement.pipeline.to_dict() == first.to_dict()
    for m in result.measurement.pipelines:  # a refused pipeline stays simulated, with the reason
        if not m.valid:
            assert table.at[m.method, "source"] == "simulated"
            assert "measurement invalid: the job failed: rank 1" in table.at[m.method, "note"]
    doc = result.measurement.to_dict(result.problem)
    assert [p["method"] for p in doc["pipelines"]] == [m.method for m in result.measurement.pipelines]
    assert "measured as pipelines" in (tmp_path / "out" / "report.md").read_text()
    # DDP is measured too (once), so the final line compares measured with measured.
    assert fake.ddp_runs == 1
    # Every training job was told its expected step (its timed steps fill MIN_TIMED_S at it).
    assert len(fake.expected) == len(fake.pipelines) + 1 and all(0 < e < math.inf for e in fake.expected)
    assert table.at["ddp", "source"] == "measured" and table.at["ddp", "step_time"] == pytest.approx(0.004)
    assert "measured as DDP" in table.at["ddp", "note"]
    line = recommendation_line(result.table, result.winner)
    assert "faster than DDP (4.000 ms, measured" in line


def test_a_pipeline_x_ddp_hybrid_is_measured_with_a_process_per_stage_of_every_replica_and_can_win(
        model_file, tmp_path):
    """Over four workers the search finds a 2-stage x 2-replica hybrid of the chain; it is
    measured as a pipeline (the fake's first pipeline, 1 ms) with its replicas' devices, not
    left simulated, and so it can win under a measured reward."""
    fake = PipelineFake()
    result = placer.optimize(str(model_file), devices="cpu:0,cpu:1,cpu:2,cpu:3", reward="measured", budget="40",
                             measurer=fake, baselines="single", out_dir=tmp_path / "out", seed=0)
    hybrids = [p for p in fake.pipelines if p.replicas]
    assert hybrids, [(len(p.stages), p.replicas) for p in fake.pipelines]
    for pipe in hybrids:  # every replica on its own workers, none shared
        devices = [d for devs in (pipe.devices, *pipe.replicas) for d in devs]
        assert len(devices) == len(set(devices)) and set(devices) <= {"cpu:0", "cpu:1", "cpu:2", "cpu:3"}
    table = result.table.set_index("method")
    row = table.loc["placer (pipeline x DDP)"]
    assert row["source"] == "measured" and "measured as a pipeline" in row["note"]
    assert result.winner == "placer (pipeline x DDP)" and result.placement.pipeline.replicas == hybrids[0].replicas


def test_a_measurer_without_pipelines_leaves_pipeline_rows_simulated_and_out_of_the_running(model_file):
    class RowsOnly(PipelineFake):
        measure_pipelines = None
        measure_data_parallel = None

    result = placer.optimize(str(model_file), devices="cpu:0,cpu:1", reward="measured", budget="40",
                             measurer=RowsOnly(), baselines="single", seed=0)
    pipes = result.table[result.table["kind"].isin(["pipeline", "ddp"])]
    assert not pipes.empty and (pipes["source"] != "measured").all()
    assert result.source == "measured" and result.placement.pipeline is None
    # The table lists the measured rows first: a simulated time leaves out the runtime's
    # overheads, and the rows it ranks may not run as fast (nor decide the winner).
    fitting = result.table[result.table["fits"]]
    measured = (fitting["source"] == "measured").tolist()
    assert measured[0] and measured == sorted(measured, reverse=True)
    assert fitting.iloc[0]["method"] == result.winner or fitting.iloc[0]["step_time"] == result.step_time


@pytest.mark.slow
def test_measured_optimize_over_two_worker_processes_runs_the_pipelines_through_the_pipelining_engine(
        model_file, tmp_path):
    result = placer.optimize(str(model_file), devices="cpu:0,cpu:1", reward="measured", budget="10",
                             baselines="single", out_dir=tmp_path / "out", seed=0)
    runs = result.measurement.pipelines
    assert runs and all(m.valid and 0 < m.step_time < 10 for m in runs), [m.reason for m in runs]
    table = result.table.set_index("method")
    for m in runs:
        assert table.at[m.method, "source"] == "measured" and table.at[m.method, "step_time"] == m.step_time
        assert m.simulated == table.at[m.method, "simulated_step_time"]
    assert "Pipelined candidates, measured as pipelines" in (tmp_path / "out" / "report.md").read_text()
    # DDP over the same two worker processes, measured by torch's DistributedDataParallel.
    assert table.at["ddp", "source"] == "measured", table.at["ddp", "note"]
    assert 0 < table.at["ddp", "step_time"] < 10 and "measured as DDP" in table.at["ddp", "note"]
