"""An output directory that stops taking writes mid-run (full disk, made read-only): one clear
line, exit status 2, and the best placement saved to a fallback file (or printed) — never lost.

The tests run as root, where chmod does not block writes, so the fault is injected where every
output goes through: the atomic writer, which raises the OSError a full disk or a read-only
directory raises, for paths under the output directory after its first N writes there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

import pytest

import graphs.atomic_write
from placer.cli.main import main
from placer.placement_file import Placement, load_placement
from placer.write_failure import OutputWriteError, fallback_path, save_or_fallback
from tests.helpers.model_files import BRANCHING_NET


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(BRANCHING_NET)
    return path


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """The system temporary directory (where the fallback goes), private to the test."""
    path = tmp_path / "systmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def _fail_writes(monkeypatch, under: list[Path], after: int, err: int, only: str | None = None) -> list[str]:
    """Make the atomic writer raise OSError(err) for files under any of ``under`` after ``after``
    writes there succeeded (``only``: just files of that name). Returns the failed paths."""
    real = graphs.atomic_write.atomic_path
    seen = {"ok": 0}
    failed: list[str] = []

    @contextlib.contextmanager
    def faulty(path, suffix=None):
        target = Path(path).resolve()
        hit = any(target.is_relative_to(d.resolve()) for d in under) and (only is None or target.name == only)
        if hit and seen["ok"] >= after:
            failed.append(str(target))
            raise OSError(err, os.strerror(err), str(target))
        if hit:
            seen["ok"] += 1
        with real(path, suffix) as tmp:
            yield tmp

    monkeypatch.setattr(graphs.atomic_write, "atomic_path", faulty)
    return failed


def _optimize(model_file, out) -> int:
    return main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "300", "--out", str(out),
                 "--baselines", "single,m_etf", "--no-check", "-q"])


def _valid_fallback(path: Path, model_file) -> Placement:
    placement = load_placement(path)
    assert placement.fingerprint and placement.devices and placement.assignment
    assert set(placement.assignment.values()) <= set(placement.devices)
    return placement


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_full_or_read_only_out_dir_mid_search_exits_2_with_the_best_saved_elsewhere(
        model_file, tmp_path, temp_dir, monkeypatch, capsys, err):
    out = tmp_path / "out"
    failed = _fail_writes(monkeypatch, [out], after=1, err=err)  # the first best_placement.json lands
    code = _optimize(model_file, out)
    stderr = capsys.readouterr().err
    assert code == 2
    assert failed, "the fault was never injected"
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert os.strerror(err) in errors[0] and str(out) in errors[0]
    saved = [p for p in temp_dir.iterdir() if p.name.startswith("placer-best-")]
    assert len(saved) == 1 and str(saved[0]) in errors[0]
    placement = _valid_fallback(saved[0], model_file)
    assert saved[0] == fallback_path(placement.fingerprint)
    assert not (out / "placement.json").exists()


def test_results_unwritable_at_the_end_save_the_winner_elsewhere(model_file, tmp_path, temp_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    _fail_writes(monkeypatch, [out], after=0, err=errno.ENOSPC, only="placement.json")
    code = _optimize(model_file, out)
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert f"cannot write {out}: No space left on device" in stderr
    (saved,) = temp_dir.glob("placer-best-*.json")
    placement = _valid_fallback(saved, model_file)
    assert placement.metadata["method"]  # the confirmed winner, not a search snapshot
    assert json.loads((out / "best_placement.json").read_text())["assignment"] == placement.assignment


def test_when_even_the_fallback_fails_the_placement_is_printed_on_stderr(
        model_file, tmp_path, temp_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    _fail_writes(monkeypatch, [out, temp_dir], after=0, err=errno.ENOSPC)
    code = _optimize(model_file, out)
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    first, rest = stderr.split("\n", 1)
    assert first.startswith("error: cannot write") and "follows on stderr" in first
    printed = json.loads(rest[rest.index("{"):])
    assert printed["assignment"] and printed["fingerprint"]


def test_save_or_fallback_writes_the_target_when_it_can(tmp_path, temp_dir):
    placement = Placement(assignment={"a": "gpu0"}, fingerprint="abc123", devices=["gpu0"], metadata={})
    assert save_or_fallback(placement, tmp_path / "p.json") == tmp_path / "p.json"
    assert load_placement(tmp_path / "p.json").assignment == {"a": "gpu0"}
    assert not list(temp_dir.iterdir())


def test_save_or_fallback_raises_one_error_naming_path_reason_and_fallback(tmp_path, temp_dir, monkeypatch):
    placement = Placement(assignment={"a": "gpu0"}, fingerprint="abc123", devices=["gpu0"], metadata={})
    _fail_writes(monkeypatch, [tmp_path / "out"], after=0, err=errno.EROFS)
    with pytest.raises(OutputWriteError) as info:
        save_or_fallback(placement, tmp_path / "out" / "p.json")
    assert str(info.value) == (f"cannot write {tmp_path / 'out' / 'p.json'}: Read-only file system; "
                               f"the best placement was saved to {temp_dir / 'placer-best-abc123.json'} instead")
    assert load_placement(info.value.fallback).assignment == {"a": "gpu0"}


def test_a_policy_save_failing_after_the_fault_does_not_hide_the_rescued_best(
        model_file, tmp_path, temp_dir, monkeypatch, capsys):
    # A really read-only directory also refuses the policy the search saves on its way out
    # (torch.save, not the atomic writer); the first error, with its rescued placement, is the one reported.
    import torch

    out = tmp_path / "out"
    _fail_writes(monkeypatch, [out], after=1, err=errno.EACCES)
    real_save = torch.save

    def refusing_save(obj, f, *args, **kwargs):
        if str(f).startswith(str(out)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", refusing_save)
    code = _optimize(model_file, out)
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert f"cannot write {out / 'best_placement.json'}: Permission denied; the best placement was saved to" in stderr
    (saved,) = temp_dir.glob("placer-best-*.json")
    _valid_fallback(saved, model_file)


def test_a_policy_that_cannot_be_saved_costs_the_policy_not_the_run(model_file, tmp_path, monkeypatch, capsys):
    # The disk fills just as the search saves its policy (torch.save): the placement still lands.
    import torch

    out = tmp_path / "out"
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if str(f).startswith(str(out)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    code = main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "300", "--out", str(out),
                 "--baselines", "single,m_etf", "--no-check"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    assert "could not save the search policy" in captured.out + captured.err
    load_placement(out / "placement.json")


def test_benchmark_outputs_are_written_atomically_and_a_failed_chart_leaves_no_partial_file(tmp_path, monkeypatch):
    import matplotlib.figure
    import pandas as pd

    from placer.report.benchmark import plot_bars, write_outputs

    table = pd.DataFrame({"model": ["m", "m"], "cluster": ["c", "c"], "method": ["single", "m_etf"],
                          "step_time": [2e-3, 1e-3], "speedup_vs_single": [1.0, 2.0],
                          "ratio_to_lower_bound": [2.0, 1.0], "search_time": [0.1, 0.2], "note": ["", ""]})
    paths = write_outputs(table, {}, tmp_path / "bench")
    assert [p.name for p in paths] == ["results.csv", "results.md", "bars_m.png"]
    assert paths[2].read_bytes().startswith(b"\x89PNG")

    def full_disk(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError):
        plot_bars(table, "m", tmp_path / "again" / "bars.png")
    assert list((tmp_path / "again").iterdir()) == []
