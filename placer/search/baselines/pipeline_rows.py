"""DDP and the pipeline partitioners as rows of the comparison table, and the recommendation.

Every ``optimize`` report compares its placements with what people would run instead:
data parallelism (:func:`envs.sim.data_parallel.simulate_data_parallel`, over the
pipeline's devices: the accelerators, else every device) and the best pipeline of each
partitioner (:func:`placer.search.baselines.pipeline_split.best_pipeline`), and placer's own
pipeline search (:func:`placer.search.pipeline_search.search_pipeline`, when the batch allows
``M > 1`` and there are two devices or more): its best pipeline and its best pipeline x
data-parallel hybrid (:attr:`envs.sim.pipeline_layout.Pipeline.replicas`). Rows carry ``kind``
"ddp" or "pipeline" (placements: "placement"). A placement, a pipeline (hybrids included) or
DDP can be the run's winner: ``placement.json`` holds any of them, DDP as one stage replicated
on every device (:func:`envs.sim.data_parallel.data_parallel_pipeline`; :func:`parallel_rows`
returns the pipelines, DDP's under ``"ddp"``). :func:`recommendation_line` names whichever
fits and is fastest and says how placer's own best placement compares with DDP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from envs.hardware.units import byte_display_unit
from envs.sim.data_parallel import data_parallel_pipeline, simulate_data_parallel
from envs.sim.hybrid import simulate_pipelined
from envs.sim.lower_bound import lower_bound
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem import PlacementProblem
from envs.sim.rank_costs import RankCosts
from placer.measuring.significance import faster_in_every_run, run_gaps
from placer.report.compare import ONE_PROCESS_KIND, fastest_first, is_placer_method
from placer.search.baselines.pipeline_split import best_pipeline, pipeline_devices
from placer.search.pipeline_moves import microbatch_choices
from placer.search.pipeline_search import DEFAULT_PIPELINE_PLACEMENTS, search_pipeline

__all__ = ["parallel_records", "parallel_rows", "with_parallel_rows", "recommendation_line",
           "SEARCH_METHOD", "HYBRID_METHOD"]

#: The comparison-table method of the pipeline search's best pipeline, and of its best hybrid.
SEARCH_METHOD = "placer (pipeline search)"
HYBRID_METHOD = "placer (pipeline x DDP)"
#: How the note of a DDP row that cannot run (its replicas' share is below the model's smallest batch) starts.
DDP_DOES_NOT_RUN = "does not run"


def _memory_text(peak: dict[str, float], names: tuple[str, ...]) -> str:
    values = [float(peak.get(n, 0.0)) for n in names]
    unit, scale = byte_display_unit(max(values, default=0.0))
    return "/".join(f"{v / scale:.3g}" for v in values) + f" {unit}"


def parallel_records(problem: PlacementProblem, batch_size: int | None, best_single: float,
                     costs: RankCosts | None = None, search_budget: int | None = DEFAULT_PIPELINE_PLACEMENTS,
                     seed: int = 0, initial: Sequence[Pipeline] = (), min_samples: int = 1,
                     batch_refusal: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Pipeline]]:
    """Comparison-table records (the columns of :func:`placer.report.compare.comparison_table`
    plus ``kind``) for DDP, each partitioner's best pipeline and the pipeline search's bests
    (``search_budget`` simulated pipelines, starting from ``initial`` too; None: no search),
    and the pipeline of every pipeline row by method. ``min_samples``: the fewest samples the
    model runs on (:func:`graphs.profile.batch_scaling.min_microbatch_samples`); no micro-batch
    or DDP replica gets fewer, and DDP that would is a row that does not run. ``batch_refusal``:
    why the batch cannot be cut at all (:func:`graphs.batch_agreement.batch_disagreement`): DDP
    does not run, and pipelines run the whole batch as one micro-batch.

    ``ratio_to_lower_bound`` is left empty for DDP, for pipelines with micro-batches or
    replicas, and on a rank cluster: the bound (:func:`envs.sim.lower_bound.lower_bound`, and
    the rank placements' :func:`envs.sim.rank_bound.rank_lower_bound`) runs the whole batch in one
    pass, which a step split into smaller parts can undercut (DDP came out at 0.40 of it)."""
    bound = lower_bound(problem) if problem.rank_simulator is None else float("nan")
    devs = [problem.device_names[d] for d in pipeline_devices(problem)]
    records: list[dict[str, Any]] = []
    pipelines: dict[str, Pipeline] = {}

    def record(method: str, kind: str, step: float, fits: bool, peak: dict[str, float], note: str,
               search_time: float = 0.0, evaluated: int = 0, whole_batch: bool = False) -> None:
        ok = fits and math.isfinite(step)
        records.append({
            "method": method, "step_time": step if ok else float("nan"),
            "simulated_step_time": step if ok else float("nan"),
            "speedup_vs_single": best_single / step if ok and step > 0 else float("nan"),
            "ratio_to_lower_bound": step / bound if ok and whole_batch and bound > 0 else float("nan"),
            "peak_memory": _memory_text(peak, problem.device_names) if peak else "", "fits": ok,
            "search_time": search_time, "evaluated": evaluated, "source": "simulated" if ok else "", "note": note,
            "kind": kind,
        })

    if batch_refusal is not None:
        batch_size, min_samples = None, 1  # one micro-batch: the whole batch, uncut
    share = batch_size // len(devs) if batch_size is not None and devs else None
    if batch_refusal is not None and len(devs) > 1:
        record("ddp", "ddp", float("nan"), False, {}, f"{DDP_DOES_NOT_RUN}: {batch_refusal}")
    elif len(devs) < 2:
        # One replica is not data parallelism, and no runtime runs it as DDP: the row would be
        # the one-device placement priced by other rules (the pipeline engine's stage costs).
        record("ddp", "ddp", float("nan"), False, {},
               f"{DDP_DOES_NOT_RUN}: DDP needs 2 devices at least; the cluster has {len(devs)} it can use")
    elif share is not None and share < min_samples:
        # One clause, which the terminal table shows whole (it keeps a note's first clause): the
        # share alone gave no reason ("each of the 2 replicas would get 16 sample(s) of the batch of 32")
        fewest = (f", but the model runs on no fewer than {min_samples} (micro-batch profile)" if share
                  else "")  # no sample at all needs no profile to rule it out
        record("ddp", "ddp", float("nan"), False, {},
               f"{DDP_DOES_NOT_RUN}: each of the {len(devs)} replicas would get {share} sample(s) of the batch of "
               f"{batch_size}{fewest}")
    elif batch_size is not None and devs and batch_size % len(devs):
        record("ddp", "ddp", float("nan"), False, {},
               f"{DDP_DOES_NOT_RUN}: the batch of {batch_size} does not split into {len(devs)} equal replicas")
    else:
        ddp = simulate_data_parallel(problem, devs, costs)
        note = (f"{len(devs)} replicas of 1/{len(devs)} batch, {len(ddp.bucket_bytes)} bucket(s), "
                f"{ddp.exposed_allreduce * 1e3:.3f} ms all-reduce after the backward")
        step = ddp.step_time
        if ddp.fits:
            # Written as a one-stage pipeline: its step is what `placer show` computes for that file
            # (the same rules; they agree up to rounding, tests/test_data_parallel.py).
            pipelines["ddp"] = data_parallel_pipeline(problem, devs)
            step = simulate_pipelined(problem, pipelines["ddp"], costs).step_time
        record("ddp", "ddp", step, ddp.fits, ddp.peak_memory, note if ddp.fits else ddp.describe())
    if len(devs) > 1:
        for name, cand in best_pipeline(problem, batch_size, costs=costs, min_samples=min_samples).items():
            if cand.pipeline is None or cand.result is None:
                record(f"pipeline:{name}", "pipeline", float("nan"), False, {}, cand.reason,
                       evaluated=cand.evaluated)
                continue
            p = cand.pipeline
            sizes = "/".join(str(len(s)) for s in p.stages)
            record(f"pipeline:{name}", "pipeline", cand.step_time, True, cand.result.peak_memory,
                   f"{p.schedule}, M={p.microbatches}, stages of {sizes} node(s)", evaluated=cand.evaluated,
                   whole_batch=p.microbatches == 1 and not p.replicas)
            pipelines[f"pipeline:{name}"] = p
    if len(devs) > 1 and search_budget is not None and len(microbatch_choices(batch_size, 1, min_samples)) > 1:
        found = search_pipeline(problem, batch_size, budget=search_budget, seed=seed, costs=costs, initial=initial,
                                min_samples=min_samples)
        shares = ", ".join(f"{phase} {share:.2f}" for phase, share in sorted(found.credit().items()))
        tail = (f"; {found.evaluated} pipelines simulated, gain over the partitioner seeds credited to "
                f"{shares or 'none (a seed was best)'}")
        for method, replicas in ((SEARCH_METHOD, 1), (HYBRID_METHOD, None)):
            if replicas is None:  # the best with two or more replicas
                options = [v for r, v in found.by_replicas.items() if r > 1]
                state, step = min(options, key=lambda v: v[1]) if options else (None, math.inf)
            else:
                state, step = found.best_with_replicas(replicas)
            what = "pipeline" if replicas == 1 else "pipeline x DDP hybrid"
            if state is None:
                why = (f"no {what}: the model is one group, and a stage holds whole groups"
                       if problem.num_nodes < 2
                       else f"no {what} on {len(devs)} devices: one needs 2 stages x 2 replicas, 4 devices at least"
                       if replicas is None and len(devs) < 4
                       else f"no fitting {what} among the {found.evaluated} simulated")
                record(method, "pipeline", float("nan"), False, {}, why + tail, found.wall_s, found.evaluated)
                continue
            pipe = state.pipeline(problem)
            # Re-simulated op by op (the search's prefix tables agree up to rounding): the row's
            # step is then exactly what `placer show` and the report compute for this pipeline.
            again = simulate_pipelined(problem, pipe, costs)
            step, peak = again.step_time, dict(again.peak_memory)
            note = state.describe() + ", stages of " + "/".join(str(len(s)) for s in pipe.stages) + " node(s)"
            record(method, "pipeline", step, True, peak, note + tail, found.wall_s, found.evaluated,
                   whole_batch=pipe.microbatches == 1 and not pipe.replicas)
            pipelines[method] = pipe
    return records, pipelines


def parallel_rows(table: pd.DataFrame, problem: PlacementProblem, batch_size: int | None,
                  costs: RankCosts | None = None, search_budget: int | None = DEFAULT_PIPELINE_PLACEMENTS,
                  seed: int = 0, initial: Sequence[Pipeline] = (), min_samples: int = 1,
                  batch_refusal: str | None = None) -> tuple[pd.DataFrame, dict[str, Pipeline]]:
    """``table`` (placements) with ``kind`` and the DDP, pipeline and hybrid rows, fitting
    fastest first; and the pipeline of each pipeline row (:func:`parallel_records`)."""
    table = table.copy()
    table["kind"] = "placement"
    fit = table[table["fits"] & (table["speedup_vs_single"] > 0)]
    best_single = (float((fit["step_time"] * fit["speedup_vs_single"]).iloc[0]) if not fit.empty
                   else float("nan"))
    records, pipelines = parallel_records(problem, batch_size, best_single, costs, search_budget, seed, initial,
                                          min_samples, batch_refusal)
    out = fastest_first(pd.concat([table, pd.DataFrame.from_records(records)], ignore_index=True))
    return out, pipelines


def with_parallel_rows(table: pd.DataFrame, problem: PlacementProblem, batch_size: int | None,
                       costs: RankCosts | None = None, search_budget: int | None = DEFAULT_PIPELINE_PLACEMENTS,
                       seed: int = 0, min_samples: int = 1) -> pd.DataFrame:
    """``table`` (placements) with ``kind`` and the DDP, pipeline and hybrid rows (:func:`parallel_rows`)."""
    return parallel_rows(table, problem, batch_size, costs, search_budget, seed, min_samples=min_samples)[0]


def _runs(row: pd.Series) -> tuple[float, ...]:
    """The runs a measured row's step time is the mean of (the final comparison's), or ()."""
    runs = row.get("measured_runs", ())
    return tuple(float(t) for t in runs) if isinstance(runs, (tuple, list)) else ()


def _one_process_clause(table: pd.DataFrame, top: pd.Series, noise: float | None) -> str | None:
    """How the recommended measured row ``top`` compares with the measured one-process reference
    (``kind`` :data:`~placer.report.compare.ONE_PROCESS_KIND`: the unsplit model on the same
    cores), or None without one. Closer than ``noise`` is no measured difference."""
    ref = table[(table["kind"] == ONE_PROCESS_KIND) & (table["source"] == "measured")]
    if ref.empty or str(top.get("source", "")) != "measured":
        return None
    one = ref.iloc[0]
    name, t_one, t_top = str(one["method"]), float(one["step_time"]), float(top["step_time"])
    ratio = t_top / t_one
    if noise is not None and max(ratio, 1 / ratio) - 1 < noise:
        return (f"{name} runs the unsplit model in {t_one * 1e3:.3f} ms, within the {noise:.1%} two runs of one "
                f"placement differed by: running it over the worker processes does not pay on these cores")
    if ratio > 1:
        return (f"{name} runs the unsplit model in {t_one * 1e3:.3f} ms, {ratio:.2f}x faster than {top['method']}: "
                "on these cores, keep the model in one process")
    return f"{top['method']} is {1 / ratio:.2f}x faster than {name} ({t_one * 1e3:.3f} ms, the unsplit model)"


def recommendation_line(table: pd.DataFrame, winner: str, noise: float | None = None) -> str:
    """One line: the fastest fitting row (DDP and pipelines included) and how placer's own best
    compares with DDP: the winner's, or when DDP itself won, the fastest other row's.

    A measured recommendation whose runner-up (the next slower measured row) ran beside it in
    the same runs (``measured_runs``) and was not slower in every run, by more than the gap
    moved between runs (:func:`placer.measuring.significance.faster_in_every_run`), says there
    is no measured difference between them. ``noise``: how far two measured runs of one
    placement differed (the median fraction, :func:`placer.measuring.summary.repeat_spread`);
    rows not timed in the same runs (a pipeline, DDP) closer than that are not told apart either.
    """
    if "kind" not in table.columns:
        return f"recommendation: {winner}"
    fitting = table[table["fits"] & (table["kind"] != ONE_PROCESS_KIND)]  # a reference, not a placement
    if "set_aside" in table.columns:  # rows whose batch split changes the numerics (optimize's check)
        fitting = fitting[~fitting["set_aside"].astype(bool)]
    mine = table[table["method"] == winner]
    ddp = table[(table["kind"] == "ddp")]
    # A measured winner is ranked among measured rows only: a simulated time (DDP under a
    # measured reward) is not a figure of the same machine state and may not outrank it.
    measured = "source" in table.columns and not mine.empty and str(mine.iloc[0]["source"]) == "measured"
    if measured:
        fitting = fitting[fitting["source"] == "measured"]
    ddp_won = winner == "ddp"
    if ddp_won:  # placement.json holds DDP: compare DDP with the best placer found itself
        own = fitting[fitting["kind"] != "ddp"]
        if measured:
            own = own[own["source"] == "measured"]
        # Among rows tied at the best time, placer's own search's is "placer's own best".
        ranked = own.assign(_not_placer=~own["method"].map(is_placer_method).astype(bool))
        mine = ranked.sort_values(["step_time", "_not_placer"], kind="stable").iloc[:1]
        winner = str(mine.iloc[0]["method"]) if not mine.empty else winner
    parts = []
    if not fitting.empty:
        top = fitting.sort_values("step_time", kind="stable").iloc[0]
        parts.append(f"recommendation: {top['method']} ({top['step_time'] * 1e3:.3f} ms per step, {top['kind']}"
                     + (", measured" if measured else "") + ")")
        # DDP has its own comparison below; the runner-up here is the next other row.
        slower = fitting[(fitting["step_time"] > top["step_time"]) & (fitting["kind"] != "ddp")]
        slower = slower.sort_values("step_time", kind="stable")
        if measured and not slower.empty:
            runner = slower.iloc[0]
            gap = float(runner["step_time"]) / float(top["step_time"]) - 1
            next_text = f"the next, {runner['method']} ({float(runner['step_time']) * 1e3:.3f} ms), is {gap:.1%} slower"
            mine_runs, next_runs = _runs(top), _runs(runner)
            gaps = run_gaps(mine_runs, next_runs)
            if len(gaps) >= 2:  # timed side by side in the same runs: compared run by run
                if not faster_in_every_run(mine_runs, next_runs):
                    parts.append(f"{next_text} on average, but " + " and ".join(f"{g:+.1%}" for g in gaps)
                                 + f" in the {len(gaps)} runs of the final comparison: no measured difference")
            elif noise is not None and gap < noise:
                parts.append(f"{next_text}, less than the {noise:.1%} two runs of one placement differed by: "
                             "no measured difference")
        clause = _one_process_clause(table, top, noise)
        if clause is not None:
            parts.append(clause)
    if not ddp.empty:
        d = ddp.iloc[0]
        note = str(d.get("note", "") or "")
        if not bool(d["fits"]):
            parts.append("DDP " + (note if note.startswith(DDP_DOES_NOT_RUN)
                                   else "does not fit (a replica is larger than a device)"))
        elif bool(d.get("set_aside", False)):
            parts.append(f"DDP ({float(d['step_time']) * 1e3:.3f} ms) set aside: " + note.split("set aside: ", 1)[-1])
        elif measured and "measurement invalid" in note:
            parts.append("DDP did not run when measured (" + note.split("measurement invalid: ", 1)[1].splitlines()[0]
                         + ")")
        elif measured and str(d.get("source", "simulated")) != "measured":
            parts.append(f"DDP simulated at {float(d['step_time']) * 1e3:.3f} ms, not measured: "
                         "not comparable with the measured times")
        elif not mine.empty and bool(mine.iloc[0]["fits"]):
            ratio = float(mine.iloc[0]["step_time"]) / float(d["step_time"])
            close = (" (within the noise of repeat runs)" if measured and noise is not None
                     and abs(max(ratio, 1 / ratio) - 1) < noise else "")
            if ratio > 1.0:
                parts.append(f"the placement {winner} is {ratio:.2f}x slower than DDP "
                             f"({float(d['step_time']) * 1e3:.3f} ms, {d.get('source', 'simulated')})"
                             + (", so the placement written is DDP" if ddp_won else "") + close)
            else:
                # DDP slower than the winner is not checked: it may also compute something else.
                unchecked = "batch split not checked" in note
                parts.append(f"the placement {winner} is {1 / ratio:.2f}x faster than DDP "
                             f"({float(d['step_time']) * 1e3:.3f} ms, {d.get('source', 'simulated')}"
                             + ("; whether DDP's batch split computes the same was not checked" if unchecked
                                else "") + ")" + close)
    return "; ".join(parts)
