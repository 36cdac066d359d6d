"""Placement files carry pipelines (schema version 2); version 1 files still load."""

from __future__ import annotations

import json

import pytest

from envs.sim.pipeline_layout import Pipeline
from placer.placement_file import SCHEMA_VERSION, Placement, PlacementFileError, load_placement, save_placement

ASSIGN = {"x": "gpu0", "l0": "gpu0", "l1": "gpu1", "output": "gpu1"}


def _pipelined(m: int = 4, schedule: str = "1f1b") -> Placement:
    pipe = Pipeline((("x", "l0"), ("l1", "output")), ("gpu0", "gpu1"), m, schedule)
    return Placement(dict(ASSIGN), "fp", ["gpu0", "gpu1"], {"model": "m"}, pipeline=pipe)


def test_a_pipelined_placement_round_trips_through_its_file(tmp_path):
    path = save_placement(_pipelined(8, "gpipe"), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert SCHEMA_VERSION == 2 and doc["schema_version"] == 2
    assert doc["pipeline"] == {"stages": [["x", "l0"], ["l1", "output"]], "devices": ["gpu0", "gpu1"],
                               "microbatches": 8, "schedule": "gpipe"}
    back = load_placement(path)
    assert back.pipeline == _pipelined(8, "gpipe").pipeline and back.assignment == ASSIGN


def test_a_version_1_file_still_loads_without_a_pipeline(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 1, "fingerprint": "fp", "devices": ["gpu0", "gpu1"],
                                "assignment": ASSIGN, "metadata": {}}))
    p = load_placement(path)
    assert p.pipeline is None and p.assignment == ASSIGN and p.schema_version == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda d: {**d, "pipeline": {**d["pipeline"], "schedule": "zero_bubble"}}, "unknown pipeline schedule"),
    (lambda d: {**d, "pipeline": {**d["pipeline"], "microbatches": 0}}, "micro-batches must be an integer"),
    (lambda d: {**d, "pipeline": {**d["pipeline"], "devices": ["gpu1", "gpu0"]}}, "expected the same device"),
    (lambda d: {**d, "pipeline": {**d["pipeline"], "stages": [["x", "l0"], ["l1"]]}}, "other nodes than the assignment"),
    (lambda d: {**d, "pipeline": {k: v for k, v in d["pipeline"].items() if k != "stages"}}, "lacks the field"),
    (lambda d: {**d, "schema_version": 1}, "pipelines need version 2"),
    (lambda d: {**d, "pipeline": [1]}, "pipeline must be an object"),
])
def test_a_bad_pipeline_in_a_file_is_refused_in_one_line(tmp_path, mutate, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(mutate(_pipelined().to_dict())))
    with pytest.raises(PlacementFileError, match=message) as info:
        load_placement(path)
    assert "\n" not in str(info.value)
