"""Pipelines and DDP against un-pipelined placements, simulated at paper size.

Figures, not tests (issue 16).

* ``--simulated``: each zoo model at paper size (captured, not profiled: the GPU kinds are
  costed by the roofline, as for any simulated cluster) on ``4xV100-nvlink`` and ``4xK40``:
  the best un-pipelined placement of a set of baselines (simulated by the op-level
  simulator), DDP over the four GPUs (:mod:`envs.sim.data_parallel`) and the best pipeline
  of each partitioner over ``M`` and the schedules (:mod:`envs.sim.pipeline`), and placer's
  pipeline search (:mod:`placer.search.pipeline_search`) twice: with as many simulated
  pipelines as the three partitioners spent together (equal budget) and with ``--budget``.
  "placer's best" is the fastest placement placer can write (un-pipelined, pipelined, or a
  pipeline x DDP hybrid); DDP is the bar it is compared with.

* ``--ablation``: what each part of the pipeline search finds (issue 17's question asked of
  the pipeline space), on equal budgets counted in simulated pipelines, for ``--seeds`` seeds:
  the best partitioner (every ``M`` and schedule), **local search alone** from the
  partitioners' seeds (``policy_share=0``), **the policy alone from scratch** (no seeds, no local
  search: one stage per device cut by group count, ``M = 1``), and **the full search** (the
  default: the policy's rounds, local search and its kicks, from the same seeds). "full < LS"
  counts the seeds on which the full search ends strictly faster than local search alone,
  and the policy's share is its part of the full search's gain over its best seed.

The measured figures (2 gloo processes here) are ``benchmarks/bench_pipeline_measured.py``.

Usage::

    python3 benchmarks/bench_pipeline.py --simulated [--models gpt2,resnet50] [--budget 2000] [--batch-size 16]
    python3 benchmarks/bench_pipeline.py --ablation [--budget 2000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import datetime
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs.hardware.loading import load_cluster  # noqa: E402
from envs.sim.data_parallel import simulate_data_parallel  # noqa: E402
from envs.sim.problem_compile import compile_problem  # noqa: E402
from envs.sim.simulator import simulate_batch  # noqa: E402
from graphs.input_batch import batch_size_of  # noqa: E402
from graphs.pipeline import prepare  # noqa: E402
from placer.benchmark import optimizer_name  # noqa: E402
from placer.search.baselines.pipeline_split import best_pipeline  # noqa: E402
from placer.search.baselines.registry import run_baseline  # noqa: E402
from placer.search.pipeline_search import search_pipeline  # noqa: E402

UNPIPELINED = ("single", "pipeline_dp", "m_topo", "m_etf", "expert", "balanced", "round_robin")
MICROBATCHES = (1, 2, 4, 8, 16, 32, 64)


def uptime() -> str:
    """The load averages, as ``uptime`` prints them."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def _ms(t: float) -> str:
    return "does not fit" if not math.isfinite(t) else f"{t * 1e3:.1f}"


def simulated(models: list[str], clusters: list[str], budget: int, seed: int = 0,
              batch_size: int | None = None) -> list[str]:
    """One Markdown table row per (model, cluster), then the budgets and the credit; ``batch_size``
    replaces the paper preset's batch (e.g. a batch whose step no longer fits one device)."""
    rows = ["| model | cluster | batch | best un-pipelined (method) | DDP | even_layers | even_params | pipedream_dp "
            "| search, equal budget (best of either) | search | search's best pipeline (layout) | search's best pipeline x DDP | "
            "placer's best | vs DDP | vs best partitioner | vs un-pipelined |", "|" + "---|" * 16]
    notes: list[str] = []
    for model in models:
        start = time.perf_counter()
        model_args: dict[str, object] = {"size": "paper"}
        if batch_size is not None:
            model_args["batch_size"] = batch_size
        prep = prepare(f"zoo:{model}", model_args=model_args, profile=False)
        batch = batch_size_of(prep.spec.example_inputs, prep.spec.batch_dim)
        opt = optimizer_name(prep.spec)
        for cname in clusters:
            cluster = load_cluster(cname)
            problem = compile_problem(prep.captured.graph, cluster, optimizer=opt, grouping=prep.grouping)
            unpiped, method = math.inf, "-"
            found = []
            for name in UNPIPELINED:
                try:
                    res = run_baseline(name, problem, prep.grouping.graph, captured=prep.captured,
                                       op_to_group=prep.grouping.op_to_group)
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run here is skipped
                    print(f"  {model}/{cname}: {name} failed: {exc}", file=sys.stderr)
                    continue
                if res.placement is not None:
                    found.append((name, np.asarray(res.placement)))
            if found:
                sim = simulate_batch(problem, np.stack([r for _, r in found]))
                for (name, _), t, ok in zip(found, sim.step_time, sim.fits):
                    if ok and t < unpiped:
                        unpiped, method = float(t), name
            ddp = simulate_data_parallel(problem, [d for d, k in zip(problem.device_names, problem.device_kinds)
                                                   if k != "cpu"])
            ddp_t = ddp.step_time if ddp.fits else math.inf
            pipes = best_pipeline(problem, batch, microbatches=MICROBATCHES)
            pt = {k: c.step_time for k, c in pipes.items()}
            spent = sum(c.evaluated for c in pipes.values())
            # Equal budgets: the search gets as many simulated pipelines as the three
            # partitioners spent together, then a larger budget.
            equal = search_pipeline(problem, batch, budget=spent, seed=seed)
            big = search_pipeline(problem, batch, budget=budget, seed=seed)
            single_state, single_t = big.best_with_replicas(1)
            hybrids = [v for r, v in big.by_replicas.items() if r > 1]
            hyb_state, hyb_t = min(hybrids, key=lambda v: v[1]) if hybrids else (None, math.inf)
            eq_t = equal.step_time  # its best, pipeline or hybrid
            # Every pipeline, hybrids included, is a placement placer writes (Pipeline.replicas).
            writable = min([unpiped, *pt.values(), single_t, eq_t, hyb_t])
            part = min(pt.values())
            dp = pipes["pipedream_dp"].pipeline
            note = f" (M={dp.microbatches}, {dp.schedule})" if dp is not None else ""
            layout = single_state.describe() if single_state is not None else "-"
            hyb = f"{_ms(hyb_t)} ({hyb_state.describe()})" if hyb_state is not None else "none fits"
            rows.append(f"| {model} | {cname} | {batch} | {_ms(unpiped)} ({method}) | {_ms(ddp_t)} | "
                        f"{_ms(pt['even_layers'])} | {_ms(pt['even_params'])} | {_ms(pt['pipedream_dp'])}{note} | "
                        f"{_ms(eq_t)} | {_ms(single_t)} | {layout} | {hyb} | {_ms(writable)} | "
                        f"{_ratio(ddp_t, writable)} | {_ratio(part, writable)} | {_ratio(unpiped, writable)} |")
            shares = ", ".join(f"{k} {v:.2f}" for k, v in sorted(big.credit().items())) or "none"
            eq_layout = equal.best.describe() if equal.best is not None else "-"
            notes.append(f"- {model} / {cname}: partitioners simulated {spent} pipelines; the search "
                         f"{equal.evaluated} (equal budget: {_ms(equal.step_time)} ms, {eq_layout}) and "
                         f"{big.evaluated} ({big.wall_s:.1f} s, "
                         f"{big.evaluated / max(big.wall_s, 1e-9):.0f} pipelines/s); its best overall "
                         f"{_ms(big.step_time)} ms ({big.best.describe() if big.best else '-'}), gain over its "
                         f"seeds ({_ms(big.seed_step_time)} ms) credited to {shares}")
            print(rows[-1], flush=True)
        print(f"  {model}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return rows + [""] + notes


def ablation(models: list[str], clusters: list[str], budget: int, seeds: int) -> list[str]:
    """One Markdown row per (model, cluster): each method's mean step over the seeds, then the totals."""
    rows = ["| model | cluster | best partitioner | DDP | LS alone | policy alone, scratch | full search "
            "| full / partitioner | full < LS alone (seeds) | policy's share of the gain |", "|" + "---|" * 10]
    wins = cases = policy_half = gained = 0
    for model in models:
        prep = prepare(f"zoo:{model}", model_args={"size": "paper"}, profile=False)
        batch = batch_size_of(prep.spec.example_inputs, prep.spec.batch_dim)
        opt = optimizer_name(prep.spec)
        for cname in clusters:
            problem = compile_problem(prep.captured.graph, load_cluster(cname), optimizer=opt, grouping=prep.grouping)
            part = min(c.step_time for c in best_pipeline(problem, batch, microbatches=MICROBATCHES).values())
            gpus = [d for d, k in zip(problem.device_names, problem.device_kinds) if k != "cpu"]
            ddp = simulate_data_parallel(problem, gpus)
            ls, scratch, full, shares = [], [], [], []
            for seed in range(seeds):
                ls.append(search_pipeline(problem, batch, budget, seed=seed, policy_share=0.0).step_time)
                scratch.append(search_pipeline(problem, batch, budget, seed=seed, seeded=False,
                                               local_search=False).step_time)
                res = search_pipeline(problem, batch, budget, seed=seed)
                full.append(res.step_time)
                credit = res.credit()
                if credit:
                    shares.append(credit.get("policy_moves", 0.0))
            better = sum(f < x * (1 - 1e-9) for f, x in zip(full, ls))
            worse = sum(f > x * (1 + 1e-9) for f, x in zip(full, ls))
            cases += 1
            wins += better > worse
            share = float(np.mean(shares)) if shares else None
            if share is not None:
                gained += 1
                policy_half += share >= 0.5
            share_text = "-" if share is None else f"{share:.0%}"
            rows.append(f"| {model} | {cname} | {_ms(part)} | {_ms(ddp.step_time if ddp.fits else math.inf)} | "
                        f"{_ms(float(np.mean(ls)))} | {_ms(float(np.mean(scratch)))} | {_ms(float(np.mean(full)))} | "
                        f"{float(np.mean(full)) / part:.3f} | {better} better, {worse} worse of {seeds} | "
                        f"{share_text} |")
            print(rows[-1], flush=True)
    return rows + ["", f"- full search strictly better than local search alone on more seeds than worse: "
                       f"**{wins} of {cases}** cases",
                   f"- the policy credited with >= half of the full search's gain over its seeds (mean over "
                   f"seeds): **{policy_half} of {gained}** cases with a gain"]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated", action="store_true")
    parser.add_argument("--models", default="gpt2,resnet50,inception_v3,rnnlm,nmt,moe")
    parser.add_argument("--clusters", default="4xV100-nvlink,4xK40")
    parser.add_argument("--budget", type=int, default=2000, help="simulated pipelines of the larger search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each --ablation search")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="--simulated: this batch instead of each paper preset's")
    args = parser.parse_args()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {stamp}, torch {torch.__version__}, load {uptime()}")
    print(f"# python3 benchmarks/bench_pipeline.py {' '.join(sys.argv[1:])}")
    if args.simulated:
        for line in simulated(args.models.split(","), args.clusters.split(","), args.budget, args.seed,
                              args.batch_size):
            print(line)
    if args.ablation:
        for line in ablation(args.models.split(","), args.clusters.split(","), args.budget, args.seeds):
            print(line)


if __name__ == "__main__":
    main()
