"""Does a search stop at a local optimum? For each (model, cluster): local search alone and the
full search from the heuristic seeds (as ``bench_ablation.py`` runs them, same budget and seed),
then every single-group move of each one's best placement, simulated: how many improve it.

A search whose best still has improving single moves ran out of budget while descending; one
whose best has none sits in a local optimum, and a final descent would not change it::

    python benchmarks/ablation_local_optima.py rnnlm/4xK40 inception_v3/4xV100-nvlink --budget 6000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def single_moves(row: np.ndarray, num_devices: int) -> np.ndarray:
    """Every placement one group away from ``row`` ([G] device indices): [G * (D - 1), G]."""
    out = []
    for i in range(len(row)):
        for d in range(num_devices):
            if d != row[i]:
                moved = row.copy()
                moved[i] = d
                out.append(moved)
    return np.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="MODEL/CLUSTER, e.g. rnnlm/4xK40 (zoo models at --size)")
    parser.add_argument("--size", default="paper")
    parser.add_argument("--budget", type=int, default=6000, help="placements per search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=256)
    args = parser.parse_args(argv)

    from bench_ablation import local_search_alone
    from bench_agent import run_baselines

    from envs.hardware.loading import load_cluster
    from envs.sim.problem_compile import compile_problem
    from envs.sim.simulator import simulate_batch
    from graphs.pipeline import prepare
    from placer.benchmark import optimizer_name
    from placer.search.search import search

    print("| model | cluster | search | best step (ms, simulated) | best single move (ms) | improving moves |")
    print("|---|---|---|---:|---:|---:|")
    for case in args.cases:
        model, _, cluster_name = case.partition("/")
        if not cluster_name:
            parser.error(f"case {case!r}: expected MODEL/CLUSTER, e.g. rnnlm/4xK40")
        prep = prepare(f"zoo:{model}", model_args={"size": args.size}, profile=False)
        problem = compile_problem(prep.captured.graph, load_cluster(cluster_name), optimizer=optimizer_name(prep.spec),
                                  grouping=prep.grouping)
        base = run_baselines(problem, prep.grouping.graph, prep.captured, prep.grouping.op_to_group, args.seed)
        seeds = np.stack([row for _, t, _, _, row in base if t is not None and row is not None])
        results = {
            "local search alone": local_search_alone(problem, seeds, args.budget, args.seed, args.num_envs),
            "full search": search(problem, agent="moves", budget=args.budget, seed=args.seed, num_envs=args.num_envs,
                                  patience=None, initial_placements=seeds, pretrained=True),
        }
        for name, result in results.items():
            moves = single_moves(np.asarray(result.best_row), problem.num_devices)
            sim = simulate_batch(problem, moves)
            steps = np.where(sim.fits, sim.step_time, np.inf)
            better = int((steps < result.best_step_time).sum())
            print(f"| {model} | {cluster_name} | {name} | {result.best_step_time * 1e3:.3f} | {steps.min() * 1e3:.3f} | "
                  f"{better} of {len(steps)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
