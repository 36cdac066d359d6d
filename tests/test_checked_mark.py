"""Which placement files were checked numerically: placement.json says whether its check ran
and passed; best_placement.json (the best so far, kept while a run goes on and after it fails)
says it was not checked, and `placer apply` says so before running it."""

from __future__ import annotations

import json

from placer.cli.main import main
from tests.helpers.model_files import TINY_MLP


def test_placement_json_is_marked_checked_best_placement_json_is_not_and_apply_says_so(tmp_path, capsys):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MLP)
    out = tmp_path / "out"
    assert main(["optimize", str(model), "--cluster", "4xK40", "--budget", "60", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "placement.json").read_text())["metadata"]["checked"] is True
    assert json.loads((out / "best_placement.json").read_text())["metadata"]["checked"] is False
    capsys.readouterr()
    for name, noted in (("best_placement.json", True), ("placement.json", False)):
        assert main(["apply", str(model), str(out / name), "--steps", "2", "--cluster", "4xK40"]) == 0
        printed = capsys.readouterr().out
        assert ("note: this placement was not checked numerically" in printed) is noted, printed
