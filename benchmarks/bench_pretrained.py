"""The shipped move policy on graphs it never trained on, against the same policy from fresh weights.

For each held-out task (:func:`placer.search.agents.pretrain.held_out_tasks`: the ``branching``
family, the zoo's ``inception_v3``, larger sizes of the trained families, the ``8xH100``
cluster), step times **simulated** on the cluster spec (roofline node costs):

* **best heuristic** — the best of :data:`~placer.search.agents.pretrain.SEED_HEURISTICS`;
* **first placement** — :func:`placer.search.agents.move_start.first_placement`: one forward pass
  from the policy's start, its proposals simulated in one batch; wall seconds measured;
* **placements to the heuristic's level** — the policy alone (no seeds, no local search), on a
  budget of evaluated placements: how many it evaluated before its best was at most the best
  heuristic's step time ("—": not within the budget), shipped weights vs fresh ones, same seeds;
* **full search** — the default search (heuristic seeds, local search interleaved) with the
  shipped weights and with fresh ones, and local search alone from the same seeds: is the
  full search strictly better than local search alone, and which weights make it so.

Each search runs for ``--seeds`` seeds; a table cell gives the median (placements, step time)
and the count of seeds that reached the level. Budgets are placements, so the machine's load
changes only the wall times.

Usage::

    python benchmarks/bench_pretrained.py --budget 6000 --seeds 3 --out benchmarks/results/agent.md
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def reached(result, level: float) -> int | None:
    """Placements evaluated when the search's best first was at most ``level`` (None: never)."""
    for imp in result.improvements:
        if imp.after <= level * (1 + 1e-9):
            return int(imp.evaluated)
    return None


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.inf


def run_task(task, policy_path: Path, args) -> dict:
    """Every figure of one held-out task (see the module doc)."""
    from bench_ablation import local_search_alone

    from envs.sim.lower_bound import lower_bound
    from envs.sim.simulator import simulate_batch
    from placer.search.agents.move_policy import MovePolicy
    from placer.search.agents.move_start import first_placement
    from placer.search.agents.pretrain import heuristic_seeds
    from placer.search.search import search

    problem, graph = task.build()
    seeds, best_name, best_t = heuristic_seeds(problem, graph)
    out = {"task": task.name, "groups": problem.num_nodes, "devices": problem.num_devices,
           "lb": float(lower_bound(problem)), "heuristic": (best_name, best_t)}

    def evaluate(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ev = simulate_batch(problem, rows)
        return ev.step_time, ev.fits

    for label, policy in (("shipped", MovePolicy.load(policy_path)), ("fresh", MovePolicy())):
        t0 = time.perf_counter()
        _, t, fits = first_placement(policy, problem, evaluate, batch=args.num_envs, seed=0)
        out[f"first_{label}"] = (t if fits else math.inf, time.perf_counter() - t0)
    budget = int(args.budget)
    for label, pretrained in (("shipped", policy_path), ("fresh", False)):
        alone, full = [], []
        for s in range(args.first_seed, args.first_seed + args.seeds):
            r = search(problem, agent="moves", budget=budget, seed=s, patience=None, local_search=False,
                       pretrained=pretrained, num_envs=args.num_envs)
            alone.append((reached(r, best_t), r.best_step_time if r.best_fits else math.inf))
            if seeds is not None:
                f = search(problem, agent="moves", budget=budget, seed=s, patience=None, initial_placements=seeds,
                           pretrained=pretrained, num_envs=args.num_envs)
                full.append((f.best_step_time if f.best_fits else math.inf, f.policy_share()))
        out[f"alone_{label}"], out[f"full_{label}"] = alone, full
    ls = []
    if seeds is not None:
        for s in range(args.first_seed, args.first_seed + args.seeds):
            r = local_search_alone(problem, seeds, budget, s, args.num_envs)
            ls.append(r.best_step_time if r.best_fits else math.inf)
    out["ls"] = ls
    return out


def ms(t: float) -> str:
    return "—" if not math.isfinite(t) else f"{t * 1e3:,.2f}"


def row(o: dict) -> str:
    """One Markdown table row of :func:`run_task`'s figures."""
    name, best = o["heuristic"]
    cells = [f"{o['task']} ({o['groups']} / {o['devices']})", f"{name} {ms(best)} (×{best / o['lb']:.2f} LB)"]
    for label in ("shipped", "fresh"):
        t, wall = o[f"first_{label}"]
        cells.append(f"{ms(t)} ({t / best:.2f}×; {wall:.2f} s)")
    for label in ("shipped", "fresh"):
        runs = o[f"alone_{label}"]
        hit = [p for p, _ in runs if p is not None]
        med = f"{statistics.median(hit):,.0f}" if len(hit) * 2 > len(runs) else "—"
        cells.append(f"{med} ({len(hit)}/{len(runs)}; end {_median([t for _, t in runs]) / best:.3f}×)")
    ls = _median(o["ls"])
    for label in ("shipped", "fresh"):
        runs = o[f"full_{label}"]
        if not runs:
            cells.append("—")
            continue
        t = _median([t for t, _ in runs])
        wins = sum(t_full < t_ls * (1 - 1e-9) for (t_full, _), t_ls in zip(runs, o["ls"]))
        shares = [s for _, s in runs if s is not None]
        share = f"{statistics.median(shares):.0%}" if shares else "—"
        cells.append(f"{t / best:.3f}× (< LS {wins}/{len(runs)}; policy {share})")
    cells.append(f"{ls / best:.3f}×" if math.isfinite(ls) else "—")
    return "| " + " | ".join(cells) + " |"


HEADER = [
    "| held-out task (groups / devices) | best heuristic | first placement, shipped (of heur.; wall) "
    "| first placement, fresh | placements to heur. level, shipped (seeds reaching; end of budget) "
    "| same, fresh | full search, shipped (of heur.; beats LS alone; policy's share) | full search, fresh "
    "| LS alone |",
    "|---|---|---|---|---|---|---|---|---|",
]


def main(argv: list[str] | None = None) -> int:
    """Run the held-out tasks and print (and append to ``--out``) the Markdown table."""
    from placer.search.agents.moves import PRETRAINED_PATH
    from placer.search.agents.pretrain import held_out_tasks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="6000", help="evaluated placements per search")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--policy", type=Path, default=PRETRAINED_PATH, help="the pretrained weights")
    parser.add_argument("--tasks", default="", help="only the held-out tasks whose name contains one of these "
                                                    "comma-separated strings")
    parser.add_argument("--out", default=None, help="append the Markdown to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    header = [
        f"## Pretrained policy on held-out graphs, run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        "Command: `python benchmarks/bench_pretrained.py " + " ".join(argv if argv is not None else sys.argv[1:])
        + "`\n",
        f"Step times **simulated** (roofline node costs); wall seconds **measured** on this shared 2-core machine "
        f"(load {os.getloadavg()[0]:.1f} at the start). Budget {args.budget} placements per search, seeds "
        f"{args.first_seed}-{args.first_seed + args.seeds - 1}, batches of {args.num_envs}; policy `{args.policy.name}`.\n",
    ]
    print("\n".join(header + HEADER), flush=True)
    rows = []
    for task in held_out_tasks():
        if args.tasks and not any(part in task.name for part in args.tasks.split(",")):
            continue
        rows.append(row(run_task(task, args.policy, args)))
        print(rows[-1], flush=True)
    text = "\n".join(header + HEADER + rows + ["", f"Total: {time.perf_counter() - started:.0f} s "
                                                    f"(load {os.getloadavg()[0]:.1f} at the end).", ""]) + "\n"
    if args.out:
        with Path(args.out).open("a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
