"""DDP is a placement placer can write: when it is the fastest checked layout, placement.json holds
it (one stage replicated on every device), the check runs its batch split, and `placer show`
simulates the same step."""

from __future__ import annotations

import json

import pandas as pd

from placer.cli.main import main
from tests.helpers.model_files import SMALL_CNN


def test_when_ddp_is_fastest_the_placement_written_is_ddp_checked_and_show_gives_its_step(tmp_path, capsys):
    model = tmp_path / "cnn.py"
    model.write_text(SMALL_CNN)
    out = tmp_path / "out"
    code = main(["optimize", str(model), "--cluster", "4xV100-nvlink", "--budget", "100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    table = pd.read_csv(out / "comparison.csv")
    fitting = table[table["fits"] & ~table["set_aside"].astype(bool)]
    assert fitting.sort_values("step_time").iloc[0]["method"] == "ddp"
    written = json.loads((out / "placement.json").read_text())
    pipe = written["pipeline"]
    assert len(pipe["stages"]) == 1 and pipe["microbatches"] == 1 and len(pipe["replicas"]) == 3
    ddp_step = float(table.loc[table["method"] == "ddp", "step_time"].iloc[0])
    assert written["metadata"]["method"] == "ddp" and written["metadata"]["step_time"] == ddp_step
    assert "4 replicas x 1 micro-batch of 8 samples give the full batch's loss, gradients and buffers" in printed
    assert "so the placement written is DDP" in printed
    assert not (out / "device_map.json").exists()  # accelerate's one-process map cannot say DDP
    assert "accelerate's one-process device_map cannot express" in (out / "report.md").read_text()

    assert main(["show", str(out / "placement.json")]) == 0  # without the model: what the file holds
    assert "data parallel (DDP over 4 replicas) on gpu0; gpu1; gpu2; gpu3" in capsys.readouterr().out
    assert main(["show", str(out / "placement.json"), "--model", str(model), "--out", str(tmp_path / "pics")]) == 0
    shown = capsys.readouterr().out
    assert f"data parallel (DDP over 4 replicas): {ddp_step * 1e3:.3f} ms per step" in shown


def test_applying_a_ddp_result_in_this_process_says_it_runs_un_pipelined(tmp_path, caplog):
    """optimize(...).apply() applied a pipelined or DDP winner's devices un-pipelined, silently."""
    import logging

    import placer

    model = tmp_path / "cnn.py"
    model.write_text(SMALL_CNN)
    result = placer.optimize(str(model), cluster="4xV100-nvlink", budget="100", progress=False, verbose=0)
    assert result.placement.pipeline is not None
    with caplog.at_level(logging.WARNING, logger="placer.result"):
        result.apply()
    assert "the placement is data parallel (DDP over 4 replicas), which runs one process per device" in caplog.text
