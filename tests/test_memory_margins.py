"""A user near the memory limits reads, for every device a placement uses, its simulated peak,
what it may fill there and the margin left: in the terminal, in report.md and in ``placer show``."""

from __future__ import annotations

import json
from pathlib import Path

from placer.cli.main import main
from placer.memory_fit import memory_margins

MODEL = """
import torch

def get_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])

def get_example_inputs():
    return (torch.randn(8, 256),)
"""


def test_margins_say_peak_usable_and_spare_or_over():
    text = memory_margins(["gpu0", "gpu1"], [3 * 2**20, 5 * 2**20], [4 * 2**20, 4 * 2**20])
    assert text == "gpu0=3 MiB of 4 MiB usable (1 MiB spare), gpu1=5 MiB of 4 MiB usable (1 MiB over)"


def _optimized_on_a_small_spec(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``optimize`` of MODEL on a spec file of two 2 MiB K40s: (model file, spec file, results folder)."""
    model = tmp_path / "mlp.py"
    model.write_text(MODEL)
    spec = tmp_path / "small.json"
    device = {"kind": "K40", "memory": "2MiB", "reserved": 0, "peak_flops": "4.29T", "mem_bandwidth": "288GB/s"}
    spec.write_text(json.dumps({"name": "small", "devices": [{"name": f"gpu{i}", **device} for i in range(2)],
                                "default_link": {"latency": "10us", "bandwidth": "10GB/s"}}))
    out = tmp_path / "out"
    assert main(["optimize", str(model), "--cluster", str(spec), "--budget", "200", "--out", str(out), "-q",
                 "--no-check", "--baselines", "single,expert"]) == 0
    return model, spec, out


def test_optimize_report_and_show_give_each_devices_peak_and_margin(tmp_path, capsys):
    model, spec, out = _optimized_on_a_small_spec(tmp_path)
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("memory ("))
    assert "simulated peak per device" in line and "of 2 MiB usable (" in line and " spare)" in line
    report = (out / "report.md").read_text()
    assert "of 2 MiB usable (" in report
    assert main(["show", str(out / "placement.json"), "--model", str(model), "--cluster", str(spec),
                 "--out", str(tmp_path / "pics")]) == 0
    shown = capsys.readouterr().out
    assert "of 2 MiB usable (" in shown and " spare)" in shown


def test_show_finds_the_spec_file_a_placement_was_made_on(tmp_path, capsys):
    """The placement recorded the spec's name ('small'), which no preset has: show refused it
    unless --cluster named the file again (memory walkthrough)."""
    model, spec, out = _optimized_on_a_small_spec(tmp_path)
    metadata = json.loads((out / "placement.json").read_text())["metadata"]
    assert metadata["cluster"] == "small" and metadata["cluster_spec"] == str(spec.resolve())
    capsys.readouterr()
    assert main(["show", str(out / "placement.json"), "--model", str(model), "--out", str(tmp_path / "pics")]) == 0
    assert "of 2 MiB usable (" in capsys.readouterr().out
