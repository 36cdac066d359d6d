"""The result files are written as one set: an interrupt while they are written takes effect after."""

from __future__ import annotations

import os
import signal

import pytest

import placer
import placer.report.results as results
from tests.helpers.model_files import TINY_MLP


def _tiny_model_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(TINY_MLP)
    return path


def test_an_interrupt_while_results_are_written_waits_until_every_file_is_there(tmp_path, monkeypatch):
    result = placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", progress=False, baselines=("round_robin",),
                             verbose=0, check=False)
    pictures = results.write_pictures

    def interrupted_pictures(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, half way through the files
        return pictures(*args, **kwargs)

    monkeypatch.setattr(results, "write_pictures", interrupted_pictures)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        result.save(out)
    assert {"placement.json", "comparison.csv", "report.md"} <= {p.name for p in out.iterdir()}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_earlier_runs_results_are_moved_to_previous_so_no_folder_mixes_two_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "placement.json").write_text("earlier run")
    (out / "report.md").write_text("earlier report")
    (out / "notes.txt").write_text("the user's own file")
    result = placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out,
                             progress=False, baselines=("round_robin",), verbose=0, check=False)
    assert (out / "previous" / "placement.json").read_text() == "earlier run"
    assert (out / "previous" / "report.md").read_text() == "earlier report"
    assert (out / "notes.txt").read_text() == "the user's own file"  # only placer's own files move
    assert (out / "report.md").read_text() != "earlier report"  # this run's own
    assert (out / "placement.json").read_text() != "earlier run" and result.placement is not None


def test_resume_continues_from_the_earlier_results_and_moves_nothing(tmp_path):
    out = tmp_path / "out"
    path = _tiny_model_file(tmp_path)
    first = placer.optimize(str(path), cluster="4xK40", budget="50", out_dir=out, progress=False,
                            baselines=("round_robin",), verbose=0, check=False)
    first.save(out)
    placer.optimize(str(path), cluster="4xK40", budget="50", out_dir=out, progress=False,
                    baselines=("round_robin",), verbose=0, check=False, resume=True)
    assert not (out / "previous").exists() and (out / "report.md").exists()
