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


def test_show_says_a_placement_was_not_checked_numerically_as_apply_does(tmp_path, capsys):
    # show printed a failed run's best_placement.json like any finished placement.json.
    from placer.placement_file import Placement, save_placement, unchecked_note

    for checked, noted in ((False, True), (True, False), (None, False)):
        meta = {"model": "tiny", "step_time": 0.001, "source": "simulated", "method": "heft"}
        if checked is not None:
            meta["checked"] = checked
        placement = Placement({"a": "gpu0", "b": "gpu1"}, "fp", ["gpu0", "gpu1"], meta)
        path = save_placement(placement, tmp_path / f"p_{checked}.json")
        capsys.readouterr()
        assert main(["show", str(path)]) == 0
        printed = capsys.readouterr().out
        assert (f"  note: {unchecked_note(placement)}" in printed) is noted, printed
        assert ("not checked numerically" in printed) is noted, printed


def test_show_without_the_model_prints_the_model_arguments_the_placement_was_made_with(tmp_path, capsys):
    from placer.placement_file import Placement, save_placement

    meta = {"model": "nmt", "step_time": 0.001, "source": "simulated", "method": "heft",
            "model_args": {"layers": 2, "size": "paper"}}
    path = save_placement(Placement({"a": "gpu0"}, "fp", ["gpu0"], meta), tmp_path / "p.json")
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    assert "model arguments (recorded by optimize): {'layers': 2, 'size': 'paper'}" in capsys.readouterr().out
