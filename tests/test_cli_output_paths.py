"""Where the CLI writes: an --out or --save it cannot write to, a pipeline show cannot run, and a
stdout reader that leaves early each end in one line (or quietly), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.sim.pipeline_layout import Pipeline
from graphs.capture import capture
from graphs.pipeline import load_source
from placer.cli.main import main
from placer.placement_file import Placement, save_placement
from tests.helpers.model_files import CHAIN_MLP

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "chain.py"
    path.write_text(CHAIN_MLP)  # batch 8
    return path


def _pipelined(model_file: Path, path: Path, microbatches: int) -> Path:
    """A 2-stage pipeline of the chain over two simulated K40s of 4xK40."""
    spec = load_source(str(model_file), {})
    captured = capture(spec.model, spec.example_inputs, name=spec.name)
    ops = list(captured.graph.nodes)
    pipe = Pipeline((tuple(ops[:len(ops) // 2]), tuple(ops[len(ops) // 2:])), ("gpu0", "gpu1"), microbatches, "gpipe")
    devices = ["cpu", "gpu0", "gpu1", "gpu2", "gpu3"]
    meta = {"cluster": "4xK40", "simulated_cluster": True, "real_devices": {d: "cpu" for d in devices}}
    save_placement(Placement(pipe.assignment(), captured.fingerprint, devices, meta, pipeline=pipe), path)
    return path


def _read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` refuse writes as a read-only one does: the tests run as root, where chmod
    does not, so the permission check itself is made to say no."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def _one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("under", [False, True], ids=["the-file", "a-folder-in-it"])
def test_show_refuses_an_out_that_is_a_file_in_one_line(model_file, tmp_path, capsys, under):
    placement = _pipelined(model_file, tmp_path / "placement.json", microbatches=4)
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    out = blocker / "pics" if under else blocker
    assert main(["show", str(placement), "--model", str(model_file), "--out", str(out)]) == 2
    _one_line_error(capsys, f"{str(blocker)!r} is not a directory")


def test_show_refuses_a_read_only_out_in_one_line(model_file, tmp_path, capsys, monkeypatch):
    placement = _pipelined(model_file, tmp_path / "placement.json", microbatches=4)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _read_only(monkeypatch, read_only)
    assert main(["show", str(placement), "--model", str(model_file), "--out", str(read_only)]) == 2
    _one_line_error(capsys, f"{str(read_only)!r} is not writable")


def test_graph_refuses_a_save_under_a_file_in_one_line(model_file, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    assert main(["graph", str(model_file), "--no-profile", "--save", str(blocker / "x.json")]) == 2
    _one_line_error(capsys, f"{str(blocker)!r} is not a directory")


def test_graph_refuses_a_save_into_a_read_only_folder_in_one_line(model_file, tmp_path, capsys, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _read_only(monkeypatch, read_only)
    assert main(["graph", str(model_file), "--no-profile", "--save", str(read_only / "x.json")]) == 2
    _one_line_error(capsys, f"{str(read_only)!r} is not writable")
    assert not (read_only / "x.json").exists()


@pytest.mark.parametrize("microbatches, code", [(3, 2), (4, 0)])
def test_show_refuses_a_pipeline_whose_microbatches_do_not_divide_the_batch_as_apply_does(
        model_file, tmp_path, capsys, microbatches, code):
    placement = _pipelined(model_file, tmp_path / "placement.json", microbatches)
    assert main(["show", str(placement), "--model", str(model_file), "--out", str(tmp_path / "pics"),
                 "--cache-dir", str(tmp_path / "cache")]) == code
    captured = capsys.readouterr()
    if code:
        assert "3 micro-batches do not divide the batch of 8" in captured.err
        assert "ms per step" not in captured.out
    else:
        assert "pipelined (2 stages, gpipe, M=4)" in captured.out


@pytest.mark.parametrize("argv", [["presets"], ["show", "PLACEMENT"]])
def test_a_closed_stdout_ends_the_command_quietly_with_status_141(model_file, tmp_path, argv):
    placement = _pipelined(model_file, tmp_path / "placement.json", microbatches=4)
    argv = [str(placement) if a == "PLACEMENT" else a for a in argv]
    # The reader is gone before the first write, as after `| head -1` read its line.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "placer", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_show_and_apply_rebuild_the_model_with_the_arguments_optimize_recorded(tmp_path, capsys):
    """A placement made with --model-arg is shown and applied without repeating it; given others,
    the refusal names the recorded ones."""
    from placer.cli.main import main

    model = tmp_path / "widths.py"
    model.write_text(
        "import torch\n"
        "def get_model(width=8):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))\n"
        "def get_example_inputs(width=8):\n"
        "    return (torch.randn(4, 4),)\n")
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    assert main(["optimize", str(model), "--model-arg", "width=16", "--cluster", "4xK40", "--budget", "30",
                 "--out", str(out), "--cache-dir", str(cache)]) == 0
    optimized = json.loads((out / "placement.json").read_text())["metadata"]
    assert optimized["model_args"] == {"width": 16} and optimized["cache_dir"] == str(cache.resolve())
    capsys.readouterr()
    assert main(["show", str(out / "placement.json"), "--model", str(model), "--out", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "model arguments (recorded by optimize): {'width': 16}" in shown
    assert main(["apply", str(model), str(out / "placement.json"), "--steps", "1", "--warmup", "0"]) == 0
    assert main(["show", str(out / "placement.json"), "--model", str(model), "--model-arg", "width=8",
                 "--out", str(tmp_path)]) == 2
    assert "it was made with the model arguments {'width': 16}" in capsys.readouterr().err


def test_an_out_starting_with_a_tilde_is_the_home_directory_not_a_folder_named_tilde(model_file, tmp_path,
                                                                                      monkeypatch, capsys):
    """--out "~/runs" (quoted, or from a script's config) made a folder named '~' in the current
    one while the run printed "results in ~/runs/"; --cache-dir already read '~' as home."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "20", "--baselines", "single",
                 "--no-check", "-q", "--out", "~/runs"]) == 0
    assert (home / "runs" / "placement.json").is_file() and not (work / "~").exists()
