"""Train the move policy the package ships (placer/search/agents/data/moves_pretrained.pt).

    python scripts/train_policy.py                          # the shipped policy: imitation of local search
    python scripts/train_policy.py --out /tmp/p.pt --tasks layered   # a quick one elsewhere
    python scripts/train_policy.py --method reinforce --budget 3000  # the earlier chained-REINFORCE policy

``--method imitation`` (default) walks local search on every training task and fits the move
scorer to the moves that improved each visited placement, weighted by their gain, and the scope
scorer to the whole-module moves that did (:func:`placer.search.agents.pretrain.pretrain_imitation`,
:mod:`placer.search.agents.scope_imitation`); ``--finetune N`` then runs the
chained REINFORCE searches (N placements per task) from those weights. ``--method reinforce``
is the chained REINFORCE alone (:func:`~placer.search.agents.pretrain.pretrain`), which did not
transfer to held-out graphs (``benchmarks/results/agent.md``).

The training set and the held-out set are :func:`placer.search.agents.pretrain.training_tasks`
and :func:`~placer.search.agents.pretrain.held_out_tasks`. Step times are **simulated** (roofline
node costs on the cluster specs); the CPU seconds printed at the end are **measured** on this
machine, with the load average beside them. Torch runs one intra-op thread (as every search),
so the same seed writes the same file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Train, save, and print one line per task and the CPU time used."""
    import torch

    from placer.search.agents.moves import PRETRAINED_PATH
    from placer.search.agents.pretrain import pretrain, pretrain_imitation, training_tasks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("imitation", "reinforce"), default="imitation")
    parser.add_argument("--steps", type=int, default=16, help="imitation: local-search states per walk")
    parser.add_argument("--candidates", type=int, default=256,
                        help="imitation: single moves simulated per state (all of them on a small graph)")
    parser.add_argument("--fit-epochs", type=int, default=40, help="imitation: passes over the states")
    parser.add_argument("--finetune", type=int, default=0,
                        help="imitation: then chained REINFORCE with this many placements per task (0: none)")
    parser.add_argument("--epochs", type=int, default=1, help="reinforce: passes over the tasks")
    parser.add_argument("--budget", type=int, default=3000, help="reinforce: evaluated placements per task and epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PRETRAINED_PATH)
    parser.add_argument("--tasks", default="", help="only the training tasks whose name contains this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("placer.search.agents.pretrain").setLevel(logging.INFO)  # one line per task, as it goes
    torch.set_num_threads(1)
    tasks = [t for t in training_tasks() if args.tasks in t.name]
    if not tasks:
        print(f"error: no training task name contains {args.tasks!r}", file=sys.stderr)
        return 2
    load0 = os.getloadavg()[0]
    print(f"training ({args.method}) on {len(tasks)} tasks; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {load0:.1f}", flush=True)
    if args.method == "imitation":
        report = pretrain_imitation(tasks, args.out, seed=args.seed, steps=args.steps, candidates=args.candidates,
                                    epochs=args.fit_epochs)
        if args.finetune > 0:
            tuned = pretrain(tasks, args.out, placements=args.finetune, seed=args.seed, start=args.out)
            report.lines += tuned.lines
            report.placements += tuned.placements
            report.cpu_s += tuned.cpu_s
            report.wall_s += tuned.wall_s
    else:
        report = pretrain(tasks, args.out, placements=args.budget, seed=args.seed, epochs=args.epochs)
    print(f"saved {args.out} ({args.out.stat().st_size:,} bytes); {report.placements:,} placements, "
          f"CPU {report.cpu_s:.0f} s, wall {report.wall_s:.0f} s, load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
