"""The result files are written as one set: an interrupt while they are written takes effect after."""

from __future__ import annotations

import json
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


def test_a_sigterm_while_results_are_written_waits_until_every_file_is_there_too(tmp_path, monkeypatch):
    """What SLURM, docker and systemd send: a second one left placement.json without report.md."""
    result = placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", progress=False,
                             baselines=("round_robin",), verbose=0, check=False)
    pictures = results.write_pictures
    seen: list[int] = []

    def cli_handler(signum, frame):  # as placer.cli.main installs it: record, then interrupt
        seen.append(signum)
        raise KeyboardInterrupt

    def terminated_pictures(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return pictures(*args, **kwargs)

    monkeypatch.setattr(results, "write_pictures", terminated_pictures)
    before = signal.signal(signal.SIGTERM, cli_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            result.save(tmp_path / "out")
        assert signal.getsignal(signal.SIGTERM) is cli_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert {"placement.json", "comparison.csv", "report.md"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert seen == [signal.SIGTERM]  # handed to the CLI's handler, so the exit status is 143


def test_a_run_stopped_before_its_results_names_where_its_best_placement_is(tmp_path):
    import argparse

    from placer.cli.main import _interrupted_before_results

    out = tmp_path / "out"
    args = argparse.Namespace(out=str(out))
    assert _interrupted_before_results(args) == "interrupted"
    out.mkdir()
    (out / "best_placement.json").write_text("{}")
    assert _interrupted_before_results(args).startswith(
        f"interrupted before the results were written; the best placement found so far is in {out / 'best_placement.json'}")
    (out / "previous").mkdir()
    (out / "previous" / "placement.json").write_text("{}")
    assert _interrupted_before_results(args).endswith(f"; the earlier run's checked result is in {out / 'previous'}/")
    (out / "placement.json").write_text("{}")
    os.utime(out / "placement.json", (os.stat(out / "best_placement.json").st_mtime + 1,) * 2)
    assert _interrupted_before_results(args).startswith("interrupted after the results were written")


def test_an_interrupt_before_the_run_found_a_placement_does_not_call_the_earlier_results_its_own(tmp_path):
    """Ctrl-C while the model was profiled, in a folder with a complete earlier run: the line
    said "interrupted after the results were written: .../placement.json ... complete"."""
    import argparse
    import time

    from placer.cli.main import _interrupted_before_results

    out = tmp_path / "out"
    out.mkdir()
    for name in ("best_placement.json", "placement.json"):
        (out / name).write_text("{}")
    args = argparse.Namespace(out=str(out), command="optimize")
    line = _interrupted_before_results(args, started=time.time() + 1)
    assert line == f"interrupted before this run found a placement; the earlier results in {out} are as they were"
    empty = tmp_path / "empty"
    line = _interrupted_before_results(argparse.Namespace(out=str(empty), command="optimize"))
    assert line == f"interrupted before this run found a placement; nothing was written to {empty}"


def test_a_faster_best_placement_on_disk_is_not_replaced_by_a_slower_one(tmp_path):
    """--resume starts the search from scratch: its first bests replaced the earlier run's
    faster one, lost when the resumed run was stopped (walkthrough)."""
    import json

    from placer.placement_file import Placement
    from placer.write_failure import save_best_so_far

    def placement(step: float, fingerprint: str = "fp") -> Placement:
        return Placement(assignment={"a": "gpu0"}, fingerprint=fingerprint, devices=["gpu0", "gpu1"],
                         metadata={"step_time": step, "source": "simulated", "cluster": "c"})

    import placer.write_failure as write_failure

    path = save_best_so_far(placement(1.0), tmp_path)
    write_failure._WRITTEN_HERE.clear()  # the resumed run is another process
    save_best_so_far(placement(2.0), tmp_path)
    assert json.loads(path.read_text())["metadata"]["step_time"] == 1.0
    save_best_so_far(placement(0.5), tmp_path)
    assert json.loads(path.read_text())["metadata"]["step_time"] == 0.5
    write_failure._WRITTEN_HERE.clear()
    save_best_so_far(placement(3.0, fingerprint="another model"), tmp_path)  # not comparable: replaced
    assert json.loads(path.read_text())["metadata"]["step_time"] == 3.0


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


def test_a_run_that_fails_after_moving_the_earlier_results_aside_puts_them_back(tmp_path, monkeypatch):
    """A failed run left the good result in previous/, and the run after it replaced that
    with the failed run's leftovers (walkthrough)."""
    import placer.optimizing.stages as stages
    from graphs.errors import PlacerError

    out = tmp_path / "out"
    out.mkdir()
    (out / "placement.json").write_text("earlier run")
    (out / "report.md").write_text("earlier report")

    def failing_confirm(*_args, **_kwargs):
        (out / "best_placement.json").write_text("failed run's best")  # as the search leaves it
        raise PlacerError("the winner does not fit")

    monkeypatch.setattr(stages, "confirm", failing_confirm)
    with pytest.raises(PlacerError):
        placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out, progress=False,
                        baselines=("round_robin",), verbose=0, check=False)
    assert (out / "placement.json").read_text() == "earlier run"
    assert (out / "report.md").read_text() == "earlier report"
    assert (out / "failed" / "best_placement.json").read_text() == "failed run's best"
    assert not (out / "previous").exists()


def test_a_stopped_runs_leftovers_do_not_replace_a_complete_result_in_previous(tmp_path):
    out = tmp_path / "out"
    (out / "previous").mkdir(parents=True)
    (out / "previous" / "placement.json").write_text("complete earlier run")
    (out / "best_placement.json").write_text("stopped run's best")
    placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out, progress=False,
                    baselines=("round_robin",), verbose=0, check=False)
    assert (out / "previous" / "placement.json").read_text() == "complete earlier run"
    assert (out / "unfinished" / "best_placement.json").read_text() == "stopped run's best"


def test_a_users_own_folder_named_previous_is_never_deleted_to_set_results_aside(tmp_path, capsys):
    """`--out .` in a folder whose previous/ held the user's notes: rmtree deleted them."""
    from placer.cli.main import main

    out = tmp_path / "out"
    (out / "previous").mkdir(parents=True)
    (out / "previous" / "notes.txt").write_text("the user's own notes")
    (out / "placement.json").write_text("earlier run")
    status = main(["optimize", str(_tiny_model_file(tmp_path)), "--cluster", "4xK40", "--budget", "50",
                   "--out", str(out), "--baselines", "round_robin", "--no-check", "-q"])
    assert status == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "previous" in err and "Traceback" not in err
    assert (out / "previous" / "notes.txt").read_text() == "the user's own notes"
    assert (out / "placement.json").read_text() == "earlier run"  # nothing moved, nothing written


def test_a_folder_of_placers_own_earlier_files_is_still_replaced_when_results_are_set_aside(tmp_path):
    out = tmp_path / "out"
    (out / "previous").mkdir(parents=True)
    (out / "previous" / "placement.json").write_text("oldest run")
    (out / "placement.json").write_text("earlier run")
    placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out, progress=False,
                    baselines=("round_robin",), verbose=0, check=False)
    assert (out / "previous" / "placement.json").read_text() == "earlier run"


def test_an_interrupt_before_the_run_wrote_anything_puts_the_earlier_results_back(tmp_path, monkeypatch):
    """SIGTERM right after the earlier results were set aside left out/ empty, the results in
    previous/ and the one line 'interrupted'."""
    import placer.optimizing.stages as stages

    out = tmp_path / "out"
    out.mkdir()
    (out / "placement.json").write_text("earlier run")
    (out / "report.md").write_text("earlier report")

    def interrupted_search(*_args, **_kwargs):
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(stages, "search_run", interrupted_search)
    with pytest.raises(KeyboardInterrupt):
        placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out, progress=False,
                        baselines=("round_robin",), verbose=0, check=False)
    assert (out / "placement.json").read_text() == "earlier run"
    assert (out / "report.md").read_text() == "earlier report"
    assert not (out / "previous").exists() and not (out / "failed").exists()


def test_an_interrupt_after_the_search_kept_a_best_leaves_it_in_place(tmp_path, monkeypatch):
    import placer.optimizing.stages as stages

    out = tmp_path / "out"
    out.mkdir()
    (out / "placement.json").write_text("earlier run")

    def interrupted_search(*_args, **_kwargs):
        (out / "best_placement.json").write_text("this run's best")  # as the search keeps it
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(stages, "search_run", interrupted_search)
    with pytest.raises(KeyboardInterrupt):
        placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out, progress=False,
                        baselines=("round_robin",), verbose=0, check=False)
    assert (out / "best_placement.json").read_text() == "this run's best"
    assert (out / "previous" / "placement.json").read_text() == "earlier run"


WIDE_MLP = """
import torch


def get_model(width=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def get_example_inputs(width=8):
    return (torch.randn(4, 8),)
"""


def test_an_interrupted_runs_best_placement_applies_like_placement_json(tmp_path, monkeypatch, capsys):
    """best_placement.json kept during the search lacked the model arguments and the real
    devices: `placer apply` of an interrupted `--model-arg width=16` run said "made for another
    model", and with the argument given, "device 'gpu0' maps onto 'gpu0', which is not a torch device"."""
    import placer.optimizing.stages as stages
    from placer.cli.main import main

    path = tmp_path / "wide.py"
    path.write_text(WIDE_MLP)
    out = tmp_path / "out"

    def interrupted_after_the_search(*_args, **_kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(stages, "confirm", interrupted_after_the_search)
    with pytest.raises(KeyboardInterrupt):
        placer.optimize(str(path), cluster="4xK40", budget="50", out_dir=out, progress=False, model_args={"width": 16},
                        baselines=("round_robin",), verbose=0)
    meta = json.loads((out / "best_placement.json").read_text())["metadata"]
    assert meta["model_args"] == {"width": 16} and meta["real_devices"]["gpu0"] == "cpu"
    assert meta["method"] == "placer (moves)" and meta["checked"] is False
    assert main(["apply", str(path), str(out / "best_placement.json"), "--steps", "1", "--warmup", "0"]) == 0
    assert "step time: median" in capsys.readouterr().out


def test_a_second_run_in_the_same_process_keeps_a_faster_best_on_disk_until_it_beats_it(tmp_path, monkeypatch):
    """The files 'written here' were the process's: a second placer.optimize(resume=True) in one
    process replaced the first run's faster best (zoo:nmt: a pipeline, 1.925 ms) with its own
    search's first, slower one (un-pipelined), which an interrupt then left on disk."""
    import placer.optimizing.stages as stages

    out = tmp_path / "out"
    first = placer.optimize("zoo:nmt", cluster="4xK40", budget="300", out_dir=out, progress=False,
                            baselines=("single",), verbose=0, check=False)
    kept = json.loads((out / "best_placement.json").read_text())
    assert kept["pipeline"] and kept["metadata"]["step_time"] == pytest.approx(first.step_time)

    def interrupted_after_the_search(*_args, **_kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(stages, "confirm", interrupted_after_the_search)
    with pytest.raises(KeyboardInterrupt):
        placer.optimize("zoo:nmt", cluster="4xK40", budget="5", out_dir=out, resume=True, progress=False,
                        baselines=("single",), verbose=0, check=False)
    assert json.loads((out / "best_placement.json").read_text())["metadata"]["step_time"] <= (
        kept["metadata"]["step_time"] * (1 + 1e-9))


def test_save_into_a_folder_holding_another_run_moves_that_run_to_previous_so_no_folder_mixes_two_runs(tmp_path):
    """OptimizeResult.save() wrote placement.json beside the earlier run's best_placement.json and
    moves.pt, which a later --resume then continued from (walk_cli.md item 4); it rotates as --out does."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("placement.json", "earlier run"), ("best_placement.json", "earlier best"),
                       ("moves.pt", "earlier policy"), ("notes.txt", "the user's own file")):
        (out / name).write_text(text)
    result = placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", progress=False,
                             baselines=("round_robin",), verbose=0, check=False)
    result.save(out)
    assert not (out / "best_placement.json").exists() and not (out / "moves.pt").exists()
    assert (out / "previous" / "best_placement.json").read_text() == "earlier best"
    assert (out / "previous" / "moves.pt").read_text() == "earlier policy"
    assert (out / "previous" / "placement.json").read_text() == "earlier run"
    assert (out / "notes.txt").read_text() == "the user's own file"  # only placer's own files move
    assert json.loads((out / "placement.json").read_text())["fingerprint"] == result.placement.fingerprint
    # Saving the same result there again writes over its own files: previous/ keeps the earlier run.
    result.save(out)
    assert (out / "previous" / "placement.json").read_text() == "earlier run"
    assert not (out / "previous" / "report.md").exists()


def test_save_into_the_runs_own_folder_keeps_its_best_placement_and_policy(tmp_path):
    out = tmp_path / "out"
    result = placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", out_dir=out,
                             progress=False, baselines=("round_robin",), verbose=0, check=False)
    own = {p.name for p in out.iterdir()}
    assert "best_placement.json" in own
    result.save(out)
    assert own <= {p.name for p in out.iterdir()} and not (out / "previous").exists()


def test_save_refuses_to_set_aside_into_a_users_own_previous_folder_and_writes_nothing(tmp_path):
    from placer.options import OptionError

    out = tmp_path / "out"
    (out / "previous").mkdir(parents=True)
    (out / "previous" / "notes.txt").write_text("the user's own notes")
    (out / "placement.json").write_text("earlier run")
    result = placer.optimize(str(_tiny_model_file(tmp_path)), cluster="4xK40", budget="50", progress=False,
                             baselines=("round_robin",), verbose=0, check=False)
    with pytest.raises(OptionError, match="notes.txt") as exc:
        result.save(out)
    assert "--resume" not in str(exc.value)
    assert (out / "placement.json").read_text() == "earlier run"
    assert (out / "previous" / "notes.txt").read_text() == "the user's own notes"
