"""benchmarks/agreement_ranks.py's compact records: they keep placements by op, so a record can
be analysed again on a machine whose profile groups the ops differently."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "agreement_ranks.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agreement_ranks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agreement = _load()
OPS = ["linear", "relu", "linear_1", "loss"]


def _results(placements: list[dict[str, str]]) -> dict:
    return {"devices": "cpu:0,cpu:1", "models": [{"model": "mlp", "size": "small", "placements": placements}]}


def _prep(op_to_group: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(grouping=SimpleNamespace(op_to_group=op_to_group))


def test_a_compact_record_gives_back_the_same_op_placements_under_any_grouping_of_the_ops() -> None:
    placements = [{op: "cpu:0" for op in OPS}, {"linear": "cpu:0", "relu": "cpu:1", "linear_1": "cpu:1", "loss": "cpu:0"}]
    record = agreement.compact(_results(placements))["models"][0]
    # One rank digit per op, the ops in name order: linear, linear_1, loss, relu.
    assert "placements" not in record and record["rows"] == ["0000", "0101"]
    # Two groupings of the same ops (what two profiles make): both expand the record alike.
    for op_to_group in ({op: op for op in OPS}, {"linear": "g0", "relu": "g0", "linear_1": "g1", "loss": "g1"}):
        assert agreement._expand_rows(_prep(op_to_group), record, ["cpu:0", "cpu:1"]) == placements


def test_a_compact_record_of_other_ops_than_todays_capture_is_refused_with_the_ops_named() -> None:
    record = agreement.compact(_results([{op: "cpu:1" for op in OPS}]))["models"][0]
    with pytest.raises(ValueError, match="other ops than the record.*loss"):
        agreement._expand_rows(_prep({op: op for op in OPS[:-1]}), record, ["cpu:0", "cpu:1"])


def test_placements_that_place_different_ops_are_not_compacted() -> None:
    with pytest.raises(ValueError, match="do not place the same ops"):
        agreement.compact(_results([{op: "cpu:0" for op in OPS}, {op: "cpu:0" for op in OPS[:2]}]))


def test_a_record_is_analysed_with_the_seed_it_was_measured_with_unless_told_otherwise() -> None:
    assert agreement.record_seed({"seed": 3, "command": "x --seed 1"}) == 3
    assert agreement.record_seed({"command": "python benchmarks/agreement_ranks.py --seed 1 --out r.json"}) == 1
    assert agreement.record_seed({"command": "python benchmarks/agreement_ranks.py --out r.json"}) == 0
