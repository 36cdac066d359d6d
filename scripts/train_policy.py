"""Train the move policy the package ships (placer/search/agents/data/moves_pretrained.pt).

    python scripts/train_policy.py                       # the shipped policy: 1 epoch x 3,000 placements per task
    python scripts/train_policy.py --epochs 1 --budget 2000 --out /tmp/p.pt   # a quick one elsewhere

The training set and the held-out set are :func:`placer.search.agents.pretrain.training_tasks`
and :func:`~placer.search.agents.pretrain.held_out_tasks`. Step times are **simulated** (roofline
node costs on the cluster specs); the CPU seconds printed at the end are **measured** on this
machine, with the load average beside them. Torch runs one intra-op thread (as every search).
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
    from placer.search.agents.moves import PRETRAINED_PATH
    from placer.search.agents.pretrain import pretrain, training_tasks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--budget", type=int, default=3000, help="evaluated placements per task and epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PRETRAINED_PATH)
    parser.add_argument("--tasks", default="", help="only the training tasks whose name contains this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("placer.search.agents.pretrain").setLevel(logging.INFO)  # one line per task, as it goes
    tasks = [t for t in training_tasks() if args.tasks in t.name]
    load0 = os.getloadavg()[0]
    print(f"training on {len(tasks)} tasks x {args.epochs} epochs, {args.budget} placements each; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load0:.1f}", flush=True)
    report = pretrain(tasks, args.out, placements=args.budget, seed=args.seed, epochs=args.epochs)
    print(f"saved {args.out} ({args.out.stat().st_size:,} bytes); {report.placements:,} placements, "
          f"CPU {report.cpu_s:.0f} s, wall {report.wall_s:.0f} s, load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
