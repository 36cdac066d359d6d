"""Ablation of the search on placement-count budgets: what does each part find?

For each zoo model and cluster (step times **simulated** by ``envs.sim.simulator`` on the cluster
spec; node costs the roofline from FLOPs and bytes, as paper sizes are not profiled here), on
the same budget of evaluated placements and the same seed:

* **best heuristic** — the fastest placement of every baseline in ``placer.search.baselines``;
* **local search alone** — the batched local search of ``placer.search.local_search`` seeded
  with every heuristic placement (the seeds count against the budget), no policy;
* **local search with scopes** — the same, its neighbourhood widened by every move of a whole
  module scope (``placer.search.move_scopes``, the moves the policy may make): what the wider
  neighbourhood finds without any learning, so the policy's credit is not the neighbourhood's;
* **policy alone, from scratch** — the learned move policy (agent ``moves``) with no seeds and
  no local search, from its own start (:func:`placer.search.agents.move_start.start_row`); its
  weights are the shipped pretrained policy (a search's default) unless ``--weights fresh``;
* **full search** — the default search: the move policy from the heuristic seeds with the
  local search interleaved (the agent's share of evaluations).

Each result is also given as its ratio to the lower bound (``envs.sim.lower_bound``), and the
full search's gain over its seeds is split by the phase that found each improvement (credit
read from the search result: seeds, policy, policy-guided moves, local search). Budgets are
placements, not seconds, so the machine's load does not change the figures (only the wall
times, which are measured and printed for information).

Usage::

    python benchmarks/bench_ablation.py --models rnnlm,nmt,inception_v3,resnet50,gpt2,moe \
        --clusters 4xK40,4xV100-nvlink --budget 6000 --out benchmarks/results/agent.md
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class Case:
    """One (model, cluster) row of the ablation."""

    model: str
    cluster: str
    groups: int
    ops: int
    lower_bound: float
    best_name: str = ""
    best_heuristic: float = math.inf
    local_search: float = math.inf
    local_search_scopes: float = math.inf
    scratch: float = math.inf
    full: float = math.inf
    credit: dict[str, float] = field(default_factory=dict)
    policy_share: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    improvements: int = 0


def local_search_alone(problem, seeds: np.ndarray, budget: int, seed: int, num_envs: int, scopes: bool = False):
    """The improvement phase alone from the heuristic seeds, on the search's evaluation path
    (with ``scopes``, its neighbourhood holds every move of a whole module scope too)."""
    from envs.gym.vector_env import BatchedPlacementVecEnv
    from placer.search.local_search import LocalSearch
    from placer.search.tracker import BestTracker, StopSearch

    env = BatchedPlacementVecEnv(problem, n_envs=1, hierarchical=False, seed=seed)
    tracker = BestTracker(problem, budget, patience=None, agent="local_search")

    def evaluate(rows):
        _, ev = env.evaluate_placements(rows)
        return ev.step_time, ev.valid

    # The same streams as search(): the improvement phase draws from the second child of the seed.
    _, local_stream = np.random.SeedSequence(int(seed)).spawn(2)
    from placer.search.move_scopes import problem_scopes

    ls = LocalSearch(problem, evaluate, tracker, rng=np.random.default_rng(local_stream),
                     scopes=problem_scopes(problem) if scopes else None)
    try:
        t, ok = evaluate(seeds[: tracker.remaining_placements()])
        tracker.record(seeds, t, ok, phase="seeds")
        ls.run(budget)
    except StopSearch as stop:
        reason = stop.reason
    else:
        reason = "finished"
    return tracker.result(reason)


def run_case(model: str, cluster_name: str, prep, args) -> Case:
    from bench_agent import run_baselines

    from envs.hardware.loading import load_cluster
    from envs.sim.lower_bound import lower_bound
    from envs.sim.problem_compile import compile_problem
    from placer.benchmark import optimizer_name
    from placer.search.search import search

    problem = compile_problem(prep.captured.graph, load_cluster(cluster_name), optimizer=optimizer_name(prep.spec),
                              grouping=prep.grouping)
    ops = problem.ops.num_ops if problem.ops is not None else problem.num_nodes
    case = Case(model, cluster_name, problem.num_nodes, ops, float(lower_bound(problem)))
    t0 = time.perf_counter()
    base = run_baselines(problem, prep.grouping.graph, prep.captured, prep.grouping.op_to_group, args.seed)
    case.seconds["heuristics"] = time.perf_counter() - t0
    fitting = [(name, t, row) for name, t, _, _, row in base if t is not None and row is not None]
    if fitting:
        case.best_name, case.best_heuristic, _ = min(fitting, key=lambda x: x[1])
    seeds = np.stack([row for _, _, row in fitting]) if fitting else None
    budget = int(args.budget)

    if seeds is not None:
        t0 = time.perf_counter()
        ls = local_search_alone(problem, seeds, budget, args.seed, args.num_envs)
        case.seconds["local search"] = time.perf_counter() - t0
        case.local_search = ls.best_step_time if ls.best_fits else math.inf
        t0 = time.perf_counter()
        wide = local_search_alone(problem, seeds, budget, args.seed, args.num_envs, scopes=True)
        case.seconds["local search + scopes"] = time.perf_counter() - t0
        case.local_search_scopes = wide.best_step_time if wide.best_fits else math.inf

    t0 = time.perf_counter()
    pretrained: bool | Path = (args.policy or True) if args.weights == "shipped" else False
    scratch = search(problem, agent="moves", budget=int(args.scratch_budget or budget), seed=args.seed,
                     num_envs=args.num_envs, patience=None, local_search=False, pretrained=pretrained)
    case.seconds["scratch"] = time.perf_counter() - t0
    case.scratch = scratch.best_step_time if scratch.best_fits else math.inf

    t0 = time.perf_counter()
    full = search(problem, agent="moves", budget=budget, seed=args.seed, num_envs=args.num_envs, patience=None,
                  initial_placements=seeds, pretrained=pretrained, local_search_share=args.local_search_share)
    case.seconds["full"] = time.perf_counter() - t0
    case.full = full.best_step_time if full.best_fits else math.inf
    case.credit = full.credit()
    case.policy_share = full.policy_share()
    case.improvements = sum(1 for i in full.improvements if i.phase != "seeds")
    return case


def ms(t: float) -> str:
    return "—" if not math.isfinite(t) else f"{t * 1e3:,.2f}"


def ratio(a: float, b: float) -> str:
    return "—" if not (math.isfinite(a) and math.isfinite(b)) or b <= 0 else f"{a / b:.3f}"


def table(cases: list[Case]) -> list[str]:
    lines = [
        "| model (groups / ops) | cluster | lower bound | best heuristic | local search alone | local search + scopes "
        "| policy from scratch | full search | full / best heur. | full < LS alone | full < LS + scopes "
        "| gain over seeds by phase | policy's share |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|:---:|:---:|---|---:|",
    ]
    for c in cases:
        lb = c.lower_bound
        credit = ", ".join(f"{p} {s:.0%}" for p, s in sorted(c.credit.items(), key=lambda x: -x[1])) or "no gain"
        better = _better(c.full, c.local_search)
        lines.append(
            f"| {c.model} ({c.groups:,} / {c.ops:,}) | {c.cluster} | {ms(lb)} | {c.best_name} {ms(c.best_heuristic)} "
            f"(×{ratio(c.best_heuristic, lb)} LB) | {ms(c.local_search)} (×{ratio(c.local_search, lb)}) | "
            f"{ms(c.local_search_scopes)} (×{ratio(c.local_search_scopes, lb)}) | "
            f"{ms(c.scratch)} (×{ratio(c.scratch, lb)}; {ratio(c.scratch, c.best_heuristic)} of heur.) | "
            f"{ms(c.full)} (×{ratio(c.full, lb)}) | {ratio(c.full, c.best_heuristic)} | {better} | "
            f"{_better(c.full, c.local_search_scopes)} | "
            f"{credit} ({c.improvements} impr.) | "
            f"{'—' if c.policy_share is None else f'{c.policy_share:.0%}'} |"
        )
    return lines


def _better(full: float, other: float) -> str:
    return "yes" if full < other * (1 - 1e-9) else ("equal" if full <= other else "no")


def summary(cases: list[Case]) -> list[str]:
    n = len(cases)
    wins = sum(c.full < c.local_search * (1 - 1e-9) for c in cases)
    wide_wins = sum(c.full < c.local_search_scopes * (1 - 1e-9) for c in cases)
    wide_losses = sum(c.full > c.local_search_scopes * (1 + 1e-9) for c in cases)
    with_gain = [c for c in cases if c.policy_share is not None]
    half = sum(c.policy_share >= 0.5 for c in with_gain)
    at_most_one = sum(c.full <= c.best_heuristic * (1 + 1e-9) for c in cases)
    scratch_ok = sum(c.scratch <= 1.05 * c.best_heuristic for c in cases)
    key = [c for c in cases if c.model.startswith(("nmt", "moe"))]
    key_ok = sum(c.full <= 0.90 * c.best_heuristic for c in key)
    return [
        f"- full search strictly better than local search alone (same seeds, same budget): **{wins} of {n}** "
        "(target ≥ 8 of 12)",
        f"- full search against local search with the scope moves (the policy's neighbourhood, no learning): "
        f"strictly better on **{wide_wins} of {n}**, worse on {wide_losses}",
        f"- the policy's phases credited with ≥ half of the gain over the seeds: **{half} of {len(with_gain)}** "
        "cases with a gain",
        f"- full search ≤ 1.00 × best heuristic: **{at_most_one} of {n}**; ≤ 0.90 × on NMT and MoE: "
        f"**{key_ok} of {len(key)}**",
        f"- policy from scratch ≤ 1.05 × best heuristic: **{scratch_ok} of {n}**",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="rnnlm,nmt,inception_v3,resnet50,gpt2,moe",
                        help="zoo models; nmt:4 is the 4-layer NMT (model argument layers=4)")
    parser.add_argument("--size", default="paper")
    parser.add_argument("--clusters", default="4xK40,4xV100-nvlink")
    parser.add_argument("--budget", default="6000", help="evaluated placements per search (seeds included)")
    parser.add_argument("--scratch-budget", default="", help="placements of the from-scratch policy (default: --budget)")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("shipped", "fresh"), default="shipped",
                        help="the move policy's starting weights: the policy shipped with the package (what a "
                             "search uses by default) or fresh ones (SearchConfig(pretrained=False))")
    parser.add_argument("--policy", type=Path, default=None,
                        help="with --weights shipped: start from this weights file instead of the shipped one "
                             "(e.g. one written by scripts/train_policy.py --out)")
    parser.add_argument("--local-search-share", type=float, default=None,
                        help="the full search's share of evaluations for local search (default: the agent's own)")
    parser.add_argument("--out", default=None, help="append the Markdown to this file")
    args = parser.parse_args(argv)

    from graphs.pipeline import prepare

    started = time.perf_counter()
    sim_commit = subprocess.run(["git", "log", "-1", "--format=%h %ci %s", "--", "envs/sim/simulator.py"],
                                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "envs/sim"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    header = [
        f"## Ablation run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        "Command: `python benchmarks/bench_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n",
        f"Simulator: envs/sim/simulator.py at `{sim_commit}`"
        + (" with uncommitted changes in envs/sim (the op-level simulator in progress)" if dirty else "") + ". "
        "Step times **simulated** on the cluster specs (roofline node costs); wall seconds **measured** on this "
        f"shared 2-core machine (load {os.getloadavg()[0]:.1f} at the start). Budget {args.budget} placements "
        f"per search, seed {args.seed}, batches of {args.num_envs}; the move policy starts from "
        + ("fresh weights" if args.weights == "fresh" else f"the weights in `{args.policy}`" if args.policy
           else "the shipped pretrained weights") + ".\n",
    ]
    print("\n".join(header), flush=True)
    cases: list[Case] = []
    for model in _csv(args.models):
        name, _, layers = model.partition(":")
        model_args = {"size": args.size, **({"layers": int(layers)} if layers else {})}
        t0 = time.perf_counter()
        try:
            prep = prepare(f"zoo:{name}", model_args=model_args, profile=False)
        except Exception as exc:  # a model that fails to prepare is reported, the rest still run
            print(f"{model}: preparation failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        label = f"{name} ({layers} layers)" if layers else name
        for cluster in _csv(args.clusters):
            case = run_case(label, cluster, prep, args)
            cases.append(case)
            print(table([case])[-1], "| seconds:", {k: round(v, 1) for k, v in case.seconds.items()}, flush=True)
        print(f"({model}: {time.perf_counter() - t0:.0f} s in all)", flush=True)
    lines = header + table(cases) + [""] + summary(cases) + ["", f"Total: {time.perf_counter() - started:.0f} s.", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with Path(args.out).open("a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
