"""The hybrid rounds' calibration replayed on recorded runs: plain least squares against the robust fit.

``optimize --devices cpu:0,cpu:1`` (reward hybrid) measures a few placements per round and
refits the simulator on all runs so far (``envs.sim.calibration.calibrate_simulator``); the
rest of the search runs on that fit. A disturbed machine can make some runs of a round slow.
This replays each recorded run: for round k = 1, 2, ... it fits on the runs of the rounds
before k and predicts round k's runs, once with plain least squares (``outlier_scale=None``)
and once with the robust fit the rounds use (``OUTLIER_SCALE``), and prints the prediction's
mean absolute percentage error and Spearman rank correlation.

Inputs are the ``measurements.json`` of optimize runs, or the compact record this writes
(``--compact``: per run the model, its arguments, the groups and each run's row, phase and
time), so that the figures can be reproduced without the runs' folders. The model is
prepared as optimize prepares it (profile cache included), and the recorded placements
must name today's groups.

    python benchmarks/bench_calibration_outliers.py --runs benchmarks/results/calibration_outliers_runs.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def compact_run(path: Path, model: str, model_args: dict[str, Any], label: str) -> dict[str, Any]:
    """One optimize run's measurements as a compact record (group order once, rows of indices)."""
    doc = json.loads(path.read_text())
    recs = [r for r in doc["placements"] if r["valid"]]
    groups = list(recs[0]["placement"])
    devices = sorted({d for r in recs for d in r["placement"].values()})
    return {"label": label, "model": model, "model_args": model_args, "devices": devices, "groups": groups,
            "runs": [{"phase": r["phase"], "step_time": r["step_time"],
                      "row": [devices.index(r["placement"][g]) for g in groups]} for r in recs]}


def replay(run: dict[str, Any], problem: Any) -> list[dict[str, Any]]:
    """Per round k >= 1, the plain and the robust fit on the rounds before it, scored on round k."""
    from envs.sim.calibration import OUTLIER_SCALE, agreement, calibrate_simulator

    index = [problem.node_names.index(g) for g in run["groups"]]
    dev = [problem.device_names.index(d) for d in run["devices"]]
    rows, times, rounds = [], [], []
    for r in run["runs"]:
        if not r["phase"].startswith("round "):
            continue
        row = np.zeros(problem.num_nodes, dtype=np.int64)
        row[index] = [dev[i] for i in r["row"]]
        rows.append(row)
        times.append(float(r["step_time"]))
        rounds.append(int(r["phase"].split()[1]))
    rows_a, times_a, rounds_a = np.stack(rows), np.array(times), np.array(rounds)
    out = []
    for k in range(1, int(rounds_a.max()) + 1):
        fit, test = rounds_a < k, rounds_a == k
        entry: dict[str, Any] = {"round": k, "fitted_on": int(fit.sum()), "predicted": int(test.sum())}
        for name, scale in (("plain", None), ("robust", OUTLIER_SCALE)):
            cal = calibrate_simulator(problem, rows_a[fit], times_a[fit], outlier_scale=scale)
            entry[name] = agreement(cal.predict(problem, rows_a[test]), times_a[test])
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="a compact record (this script's --compact), or measurements.json files")
    parser.add_argument("--model", default="zoo:resnet50", help="the model of measurements.json inputs")
    parser.add_argument("--model-args", default='{"size": "paper", "image_size": 64, "batch_size": 32}',
                        help="its arguments, as JSON")
    parser.add_argument("--compact", type=Path, help="write the runs as one compact record here")
    args = parser.parse_args(argv)

    runs: list[dict[str, Any]] = []
    for path in args.runs:
        doc = json.loads(path.read_text())
        if "runs_recorded" in doc:
            runs += doc["runs_recorded"]
        else:
            runs.append(compact_run(path, args.model, json.loads(args.model_args), str(path.parent)))
    if args.compact is not None:
        args.compact.write_text(json.dumps({"runs_recorded": runs}) + "\n")

    from placer.optimizing import stages
    from placer.optimizing.config import make_config

    problems: dict[str, Any] = {}
    print("| run | round | fitted on | predicted | plain MAPE | robust MAPE | plain Spearman | robust Spearman |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for run in runs:
        key = json.dumps([run["model"], run["model_args"], run["devices"]], sort_keys=True)
        if key not in problems:
            cfg = make_config(run["model"], model_args=run["model_args"], devices=",".join(run["devices"]),
                              progress=False, verbose=0)
            problems[key] = stages.compile_run(cfg, stages.prepare_run(cfg)).problem
        for e in replay(run, problems[key]):
            print(f"| {run['label']} | {e['round']} | {e['fitted_on']} | {e['predicted']} | "
                  f"{e['plain']['mape']:.1%} | {e['robust']['mape']:.1%} | {e['plain']['spearman']:.2f} | "
                  f"{e['robust']['spearman']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
