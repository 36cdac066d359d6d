"""Benchmark the learning agents on zoo models, simulated on the 4-GPU presets.

For each model and cluster it reports (all step times simulated by envs.sim.simulator on the
cluster spec; search times are measured wall-clock on this machine):

* every heuristic baseline of ``placer.search.baselines`` and the human ``expert``;
* the default agent (``--search-agent``, the move policy) as a user runs it (seeded with the
  baselines' placements, the interleaved local-search phase on), its gain over the best
  heuristic and over the expert, which phase found its best, the share of its gain over the
  seeds that each phase found, and how long it took to come within 5% of its final result;
  and the same search without the local-search phase;
* an ablation at one budget, every agent from scratch (no heuristic seeds, no local
  search, so the learners themselves are compared): hierarchical vs flat vs sequential vs
  REINFORCE;
* training throughput (evaluated placements per second: sample + simulate + learn, no
  local search) of the agents on a synthetic graph, after a short warm-up run (numba JIT,
  first-call set-up) that is not counted.

Usage::

    python benchmarks/bench_agent.py --models nmt,rnnlm --size paper --clusters 4xK40 \
        --budget 120s --ablation-budget 60s --out benchmarks/results/agent.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_baselines(problem, graph, captured, op_to_group, seed: int) -> list[tuple[str, float | None, float, str]]:
    """(name, simulated step time or None, search seconds, note) for every baseline."""
    from envs.sim.simulator import simulate_batch
    from placer.search.baselines import BASELINES, run_baseline

    rows = []
    for name in BASELINES:
        try:
            res = run_baseline(name, problem, graph, seed, captured=captured, op_to_group=op_to_group)
        except Exception as exc:  # a crashing baseline is reported, not fatal for the benchmark
            rows.append((name, None, 0.0, f"error: {type(exc).__name__}: {exc}"[:120], None))
            continue
        if res.placement is None:
            rows.append((name, None, res.search_time, res.reason[:120], None))
            continue
        sim = simulate_batch(problem, np.asarray(res.placement)[None])
        t = float(sim.step_time[0]) if sim.fits[0] else None
        rows.append((name, t, res.search_time, "" if sim.fits[0] else "does not fit", np.asarray(res.placement)))
    return rows


def fmt_ms(t: float | None) -> str:
    return "—" if t is None or not math.isfinite(t) else f"{t * 1e3:.2f}"


def gain(base: float | None, new: float | None) -> str:
    """Speed-up of ``new`` over ``base`` as a percentage of the base step time."""
    if base is None or new is None or not math.isfinite(new):
        return "—"
    return f"{(base - new) / base * 100:+.1f}%"


def bench_case(model: str, cluster: str, prep, args, lines: list[str]) -> None:
    from envs.hardware.loading import load_cluster
    from envs.sim.problem_compile import compile_problem
    from placer.search.search import search

    graph = prep.grouping.graph
    # One truth: the op graph executes, the groups are the placement unit (as optimize compiles it).
    problem = compile_problem(prep.captured.graph, load_cluster(cluster), grouping=prep.grouping)
    lines.append(f"### {model} ({args.size}) on {cluster}: {problem.num_nodes} groups, {problem.num_devices} devices\n")
    base = run_baselines(problem, graph, prep.captured, prep.grouping.op_to_group, args.seed)
    fitting = [(n, t) for n, t, *_ in base if t is not None]
    best_name, best_t = min(fitting, key=lambda x: x[1]) if fitting else ("none", None)
    expert_t = next((t for n, t, *_ in base if n == "expert"), None)
    seeds = [r[4] for r in base if r[4] is not None and r[1] is not None]

    res = search(problem, agent=args.search_agent, budget=args.budget, seed=args.seed, initial_placements=seeds or None,
                 num_envs=args.num_envs)
    within = res.time_to_within(0.05)
    plain = search(problem, agent=args.search_agent, budget=args.budget, seed=args.seed,
                   initial_placements=seeds or None, num_envs=args.num_envs, local_search=False)
    lines.append("| method | step time (ms, simulated) | vs best heuristic | vs expert | search time (s) | note |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for name, t, secs, note, _ in sorted(base, key=lambda r: (r[1] is None, r[1] or 0)):
        lines.append(f"| {name} | {fmt_ms(t)} | {gain(best_t, t)} | {gain(expert_t, t)} | {secs:.2f} | {note} |")
    phases = ", ".join(f"{k} {v:,}" for k, v in res.phase_evaluated.items())
    shares = ", ".join(f"{k} {v:.0%}" for k, v in res.credit().items()) or "none (no gain over the seeds)"
    lines.append(
        f"| **agent: {args.search_agent} (seeded)** | **{fmt_ms(res.best_step_time)}** | {gain(best_t, res.best_step_time)} | "
        f"{gain(expert_t, res.best_step_time)} | {res.wall_s:.1f} | {res.evaluated:,} evaluated ({phases}), "
        f"best found by: {res.best_phase}, gain over the seeds found by: {shares}, "
        f"within 5% of final after {within:.1f} s, stopped: {res.stop_reason} |"
    )
    lines.append(
        f"| agent: {args.search_agent} (seeded, no local search) | {fmt_ms(plain.best_step_time)} | "
        f"{gain(best_t, plain.best_step_time)} | {gain(expert_t, plain.best_step_time)} | {plain.wall_s:.1f} | "
        f"{plain.evaluated:,} evaluated, {plain.evaluated / max(plain.wall_s, 1e-9):,.0f}/s, best found by: "
        f"{plain.best_phase}, stopped: {plain.stop_reason} |"
    )
    lines.append("")
    lines.append(f"Best heuristic: {best_name} ({fmt_ms(best_t)} ms); expert {fmt_ms(expert_t)} ms; "
                 f"agent {fmt_ms(res.best_step_time)} ms ({gain(best_t, res.best_step_time)} vs best heuristic, "
                 f"found by {res.best_phase}).\n")

    if args.ablation_budget:
        lines.append(f"Ablation, from scratch (no heuristic seeds, no local search), budget {args.ablation_budget}, "
                     f"seed {args.seed}:\n")
        lines.append("| agent | best step time (ms) | vs best heuristic | evaluated | placements/s | "
                     "within 5% of final after (s) | stop |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        for agent in _csv(args.agents):
            t0 = time.perf_counter()
            try:
                r = search(problem, agent=agent, budget=args.ablation_budget, seed=args.seed, num_envs=args.num_envs,
                           initial_placements=None, local_search=False)
            except Exception as exc:
                lines.append(f"| {agent} | — | — | — | — | — | error: {type(exc).__name__}: {str(exc)[:80]} |")
                continue
            w = r.time_to_within(0.05)
            lines.append(
                f"| {agent} | {fmt_ms(r.best_step_time) if r.best_fits else 'no fit'} | "
                f"{gain(best_t, r.best_step_time) if r.best_fits else '—'} | {r.evaluated:,} | "
                f"{r.evaluated / max(time.perf_counter() - t0, 1e-9):,.0f} | {'—' if w is None else f'{w:.1f}'} | "
                f"{r.stop_reason} |"
            )
        lines.append("")


def synthetic_problem(n: int, cluster: str, seed: int = 0):
    """A random DAG of ``n`` ops (each fed by up to 2 of the previous 8), roofline-costed on ``cluster``."""
    import networkx as nx

    from envs.sim.problem_compile import compile_problem

    rng = np.random.default_rng(seed)
    g = nx.DiGraph(name=f"dag{n}")
    for i in range(n):
        g.add_node(f"n{i}", op="call_module", out_bytes=int(rng.integers(1e5, 5e7)),
                   param_bytes=int(rng.integers(0, 2e7)), flops=int(rng.integers(1e7, 5e10)))
        if i:
            for j in rng.choice(np.arange(max(0, i - 8), i), size=min(i, 2), replace=False):
                g.add_edge(f"n{j}", f"n{i}", bytes=g.nodes[f"n{j}"]["out_bytes"])
    return compile_problem(g, cluster)


def bench_throughput(n: int, cluster: str, budget: str, args, lines: list[str]) -> None:
    """Training throughput of each agent on a synthetic ``n``-node graph (default group count)."""
    import resource

    from envs.gym.config import default_num_groups
    from placer.search.search import search

    problem = synthetic_problem(n, cluster, args.seed)
    g = default_num_groups(problem.num_nodes, problem.num_devices)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"### Throughput: synthetic {n}-node DAG on {cluster} (G = {g} groups), budget {budget}\n")
    lines.append(f"Training only (sample + simulate + learn; local search off), torch 1 thread, after a "
                 f"{2 * args.num_envs}-placement warm-up per agent; load average {load:.2f} at the start.\n")
    lines.append("| agent | evaluated | wall s | placements/s (wall) | CPU s | placements per CPU s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for agent in _csv(args.agents):
        search(problem, agent=agent, budget=2 * args.num_envs, seed=args.seed, num_envs=args.num_envs, patience=None,
               local_search=False)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        r = search(problem, agent=agent, budget=budget, seed=args.seed, num_envs=args.num_envs, patience=None,
                   local_search=False)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        lines.append(f"| {agent} | {r.evaluated:,} | {r.wall_s:.1f} | {r.evaluated / max(r.wall_s, 1e-9):,.0f} | "
                     f"{cpu:.1f} | {r.evaluated / max(cpu, 1e-9):,.0f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"\n(load average {load:.2f} at the end)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="nmt,rnnlm,resnet50,inception_v3,gpt2,moe")
    parser.add_argument("--size", default="paper")
    parser.add_argument("--clusters", default="4xK40,4xV100-nvlink")
    parser.add_argument("--budget", default="5m", help="budget of the seeded search")
    parser.add_argument("--search-agent", default="moves", help="agent of the seeded search (default: the default agent)")
    parser.add_argument("--ablation-budget", default="60s", help="budget of each ablation run ('' to skip)")
    parser.add_argument("--agents", default="moves,hierarchical,flat,sequential,reinforce")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--costs", choices=("profiled", "roofline"), default="profiled",
                        help="node costs: profiled on this CPU (calibrates the roofline of simulated devices), or the "
                             "uncalibrated roofline from FLOPs and bytes only (paper sizes, whose full-batch profiling "
                             "takes too long on a small machine)")
    parser.add_argument("--out", default=None, help="append the Markdown tables to this file")
    parser.add_argument("--throughput-nodes", type=int, default=0,
                        help="also time every agent on a synthetic DAG of this many nodes (0: skip)")
    parser.add_argument("--throughput-budget", default="4096")
    args = parser.parse_args(argv)

    from graphs.pipeline import prepare

    started = time.perf_counter()
    lines = [
        f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        "Command: `python benchmarks/bench_agent.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, shared 2-core CPU (torch 1 thread). "
        "Step times are **simulated** on the cluster specs; search times and rates are **measured** wall-clock. "
        f"Node costs: {args.costs}.\n",
    ]
    if args.throughput_nodes:
        bench_throughput(args.throughput_nodes, _csv(args.clusters)[0], args.throughput_budget, args, lines)
        print("\n".join(lines[-12:]), flush=True)
    for model in _csv(args.models):
        t0 = time.perf_counter()
        try:
            prep = prepare(f"zoo:{model}", model_args={"size": args.size}, cache_dir=args.cache_dir,
                           profile=args.costs == "profiled")
        except Exception as exc:
            lines.append(f"### {model}: preparation failed: {type(exc).__name__}: {exc}\n")
            continue
        for cluster in _csv(args.clusters):
            bench_case(model, cluster, prep, args, lines)
        lines.append(f"({model}: {time.perf_counter() - t0:.0f} s in all)\n")
        print("\n".join(lines[-40:]), flush=True)
    lines.append(f"Total benchmark time: {time.perf_counter() - started:.0f} s.\n")
    text = "\n".join(lines) + "\n"
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
