"""Benchmark: every model file of ``benchmarks/models/`` placed as a user would, one table.

Per file: how it was captured (torch.fx or torch.export), its ops and groups, the winner and its
simulated step time, the speed-up over the fastest single device, DDP's step time, the verdict of
the numerical check (and of the winner's batch split where it has one), and the wall time of the
whole ``placer.optimize`` run. A file that is refused gets its one-line reason. Step times are
**simulated** on the cluster preset named; the wall times are measured on this machine. It is
the regression run behind ``benchmarks/results/model_styles.md``: a style that broke shows as a
refusal or a failed check.

    python benchmarks/bench_model_styles.py                        # every file, 4xV100-nvlink, 1000 placements
    python benchmarks/bench_model_styles.py --models fno1d clip_pair --cluster 4xK40 --budget 2000
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import placer
from graphs.errors import PlacerError

MODELS_DIR = Path(__file__).resolve().parent / "models"
#: Files that need an optional package, and the package.
NEEDS = {"hf_bert": "transformers", "hf_gpt2": "transformers"}


@dataclass
class Row:
    """One model file's run."""

    model: str
    captured: str = ""
    ops: int = 0
    groups: int = 0
    winner: str = ""
    step_ms: float = float("nan")
    speedup: float = float("nan")
    ddp_ms: float = float("nan")
    check: str = ""
    wall_s: float = 0.0


def _speedup(table: pd.DataFrame, winner: str) -> float:
    row = table[table["method"] == winner]
    return float(row["speedup_vs_single"].iloc[0]) if not row.empty else float("nan")


def _ddp_ms(table: pd.DataFrame) -> float:
    row = table[table["method"] == "ddp"]
    value = row["step_time"].iloc[0] if not row.empty else float("nan")  # seconds
    return float(value) * 1e3 if pd.notna(value) else float("nan")


def run_one(path: Path, cluster: str, budget: str, seed: int) -> Row:
    """``placer.optimize`` of one model file, summarised (a refusal as its reason)."""
    row = Row(path.stem)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        try:
            result = placer.optimize(str(path), cluster=cluster, budget=budget, seed=seed, out_dir=out,
                                     progress=False)
        except PlacerError as exc:
            row.check = f"refused: {str(exc).splitlines()[0][:160]}"
            row.wall_s = time.perf_counter() - start
            return row
    row.wall_s = time.perf_counter() - start
    captured = result.prepared.captured
    row.captured, row.ops = captured.method, captured.graph.number_of_nodes()
    row.groups = len(result.prepared.grouping.groups)
    row.winner, row.step_ms = result.winner, result.step_time * 1e3
    row.speedup, row.ddp_ms = _speedup(result.table, result.winner), _ddp_ms(result.table)
    check = result.check
    if check is None:
        row.check = "not checked"
    else:
        row.check = "same" if check.ok else "DIFFERENT"
        if check.microbatches * check.replicas > 1:
            row.check += f"; split {check.replicas}x{check.microbatches} " + ("exact" if check.split_ok else "differs")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model file stems (default: every file in benchmarks/models)")
    parser.add_argument("--cluster", default="4xV100-nvlink")
    parser.add_argument("--budget", default="1000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stems = args.models or sorted(p.stem for p in MODELS_DIR.glob("*.py"))
    rows = []
    for stem in stems:
        package = NEEDS.get(stem)
        if package and importlib.util.find_spec(package) is None:
            rows.append(Row(stem, check=f"skipped: needs {package} (pip install 'placer[hf]')"))
            continue
        rows.append(run_one(MODELS_DIR / f"{stem}.py", args.cluster, args.budget, args.seed))
        print(f"{stem}: {rows[-1].check} ({rows[-1].wall_s:.1f} s)", flush=True)
    table = pd.DataFrame([r.__dict__ for r in rows])
    load = os.getloadavg()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## Model styles, {stamp} (simulated on {args.cluster}, --budget {args.budget}, seed {args.seed}; "
          f"wall times measured here, load {load:.1f})\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
