"""DDP and the pipeline partitioners as rows of the comparison table, and the recommendation.

Every ``optimize`` report compares its placements with what people would run instead:
data parallelism (:func:`envs.sim.data_parallel.simulate_data_parallel`, over the
pipeline's devices: the accelerators, else every device) and the best pipeline of each
partitioner (:func:`placer.search.baselines.pipeline_split.best_pipeline`). Their rows carry
``kind`` "ddp" or "pipeline" (placements: "placement"); only a placement can be the
search's winner (it is what ``placement.json`` holds), but :func:`recommendation_line` names
whichever fits and is fastest, DDP included, and says when the winning placement is slower
than DDP.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from envs.hardware.units import byte_display_unit
from envs.sim.data_parallel import simulate_data_parallel
from envs.sim.lower_bound import lower_bound
from envs.sim.problem import PlacementProblem
from envs.sim.ranks import RankCosts
from placer.search.baselines.pipeline_split import best_pipeline, pipeline_devices

__all__ = ["batch_size_of", "parallel_records", "with_parallel_rows", "recommendation_line"]


def batch_size_of(example_inputs: Any) -> int | None:
    """The batch size of a model's example inputs: dim 0 of the first tensor with one, else None."""
    stack = [example_inputs]
    while stack:
        x = stack.pop(0)
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
        if isinstance(x, (list, tuple)):
            stack = list(x) + stack
        elif isinstance(x, dict):
            stack = list(x.values()) + stack
    return None


def _memory_text(peak: dict[str, float], names: tuple[str, ...]) -> str:
    values = [float(peak.get(n, 0.0)) for n in names]
    unit, scale = byte_display_unit(max(values, default=0.0))
    return "/".join(f"{v / scale:.3g}" for v in values) + f" {unit}"


def parallel_records(problem: PlacementProblem, batch_size: int | None, best_single: float,
                     costs: RankCosts | None = None) -> list[dict[str, Any]]:
    """Comparison-table records (the columns of :func:`placer.report.compare.comparison_table`
    plus ``kind``) for DDP and each partitioner's best pipeline."""
    bound = lower_bound(problem)
    devs = [problem.device_names[d] for d in pipeline_devices(problem)]
    records: list[dict[str, Any]] = []

    def record(method: str, kind: str, step: float, fits: bool, peak: dict[str, float], note: str) -> None:
        ok = fits and math.isfinite(step)
        records.append({
            "method": method, "step_time": step if ok else float("nan"),
            "simulated_step_time": step if ok else float("nan"),
            "speedup_vs_single": best_single / step if ok and step > 0 else float("nan"),
            "ratio_to_lower_bound": step / bound if ok and bound > 0 else float("nan"),
            "peak_memory": _memory_text(peak, problem.device_names) if peak else "", "fits": ok,
            "search_time": 0.0, "evaluated": 0, "source": "simulated" if ok else "", "note": note, "kind": kind,
        })

    ddp = simulate_data_parallel(problem, devs, costs)
    note = (f"{len(devs)} replicas of 1/{len(devs)} batch, {len(ddp.bucket_bytes)} bucket(s), "
            f"{ddp.exposed_allreduce * 1e3:.3f} ms all-reduce after the backward")
    record("ddp", "ddp", ddp.step_time, ddp.fits, ddp.peak_memory,
           note if ddp.fits else ddp.describe())
    if len(devs) > 1:
        for name, cand in best_pipeline(problem, batch_size, costs=costs).items():
            if cand.pipeline is None or cand.result is None:
                record(f"pipeline:{name}", "pipeline", float("nan"), False, {}, cand.reason)
                continue
            p = cand.pipeline
            sizes = "/".join(str(len(s)) for s in p.stages)
            record(f"pipeline:{name}", "pipeline", cand.step_time, True, cand.result.peak_memory,
                   f"{p.schedule}, M={p.microbatches}, stages of {sizes} node(s)")
    return records


def with_parallel_rows(table: pd.DataFrame, problem: PlacementProblem, batch_size: int | None,
                       costs: RankCosts | None = None) -> pd.DataFrame:
    """``table`` (placements) with ``kind`` and the DDP and pipeline rows, fitting fastest first."""
    table = table.copy()
    table["kind"] = "placement"
    fit = table[table["fits"] & (table["speedup_vs_single"] > 0)]
    best_single = (float((fit["step_time"] * fit["speedup_vs_single"]).iloc[0]) if not fit.empty
                   else float("nan"))
    extra = pd.DataFrame.from_records(parallel_records(problem, batch_size, best_single, costs))
    out = pd.concat([table, extra], ignore_index=True)
    out["_order"] = np.where(out["fits"], out["step_time"], np.inf)
    return out.sort_values(["_order", "method"], kind="stable").drop(columns="_order").reset_index(drop=True)


def recommendation_line(table: pd.DataFrame, winner: str) -> str:
    """One line: the fastest fitting row (DDP and pipelines included) and how the winning
    placement compares with DDP."""
    if "kind" not in table.columns:
        return f"recommendation: {winner}"
    fitting = table[table["fits"]]
    mine = table[table["method"] == winner]
    ddp = table[(table["kind"] == "ddp")]
    parts = []
    if not fitting.empty:
        top = fitting.sort_values("step_time", kind="stable").iloc[0]
        parts.append(f"recommendation: {top['method']} ({top['step_time'] * 1e3:.3f} ms per step, {top['kind']})")
    if not ddp.empty:
        d = ddp.iloc[0]
        if not bool(d["fits"]):
            parts.append("DDP does not fit (a replica is larger than a device)")
        elif not mine.empty and bool(mine.iloc[0]["fits"]):
            ratio = float(mine.iloc[0]["step_time"]) / float(d["step_time"])
            if ratio > 1.0:
                parts.append(f"the placement {winner} is {ratio:.2f}x slower than DDP "
                             f"({float(d['step_time']) * 1e3:.3f} ms, simulated)")
            else:
                parts.append(f"the placement {winner} is {1 / ratio:.2f}x faster than DDP "
                             f"({float(d['step_time']) * 1e3:.3f} ms, simulated)")
    return "; ".join(parts)
