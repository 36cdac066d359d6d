"""The result files are written as one set: an interrupt while they are written takes effect after."""

from __future__ import annotations

import os
import signal

import pytest

import placer
import placer.report.results as results


def test_an_interrupt_while_results_are_written_waits_until_every_file_is_there(tmp_path, monkeypatch):
    path = tmp_path / "net.py"
    path.write_text(
        "import torch\n"
        "def get_model():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))\n"
        "def get_example_inputs():\n"
        "    return (torch.randn(4, 8),)\n")
    result = placer.optimize(str(path), cluster="4xK40", budget="50", progress=False, baselines=("round_robin",),
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
