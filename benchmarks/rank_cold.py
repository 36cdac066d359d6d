"""How much slower a thread computes right after it slept, on this machine (issue 15, rule R3b).

A rank of ``envs/runtime/distributed`` that waits for a message sleeps (gloo's receive is a
condition variable), then runs its next stage's ops. This script measures, in one process
with one torch thread, what such a sleep does to the ops that follow it: a pass over the
first three stages of the paper ResNet-50 (stem, layer1-3; 51 modules, each timed with
``time.process_time``, i.e. CPU time, so waiting for a core is not in it) runs ``--passes``
times back to back (the steady reference), then again after a ``time.sleep(gap)`` before
each pass. It prints, per gap, the extra CPU time accumulated after 3, 5, 10, 20 and 40 ms of
steady work and over the whole pass: how large the slowdown is and how long it lasts.

Measured 2026-12-05 10:20-10:43 UTC (load ~1, this 2-core Firecracker VM; three runs, the
first an ad-hoc version of this script, then ``--passes 25`` and ``--passes 41``): after a
20 ms sleep the work costs 2.1-3.2 ms more CPU, 1.5-2.2 ms of it within the first 3 ms of
work and little after 20 ms; after 5 ms of sleep 0.6-1.6 ms, after 1 ms 0.1-1.9 ms (the
noisiest). So a sleep makes the next ~20 ms of work slower, more so the longer it slept.
The rank simulator's rule R3b (``envs.sim.ranks``: after a sleeping wait the next
``cold_s`` = 20 ms of op time runs ``1 + cold_factor`` slower) keeps the window and charges
every sleep alike; its factor is fitted on measured steps (``benchmarks/agreement_ranks.py``).

    python benchmarks/rank_cold.py [--gaps-ms 1 5 20] [--passes 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.zoo import resnet50  # noqa: E402

MARKS_S = (0.003, 0.005, 0.010, 0.020, 0.040)


def _modules() -> list[torch.nn.Module]:
    model = resnet50.get_model(size="paper").eval()
    return [model.conv1, model.bn1, torch.nn.ReLU(), model.maxpool, *model.layer1, *model.layer2, *model.layer3]


def one_pass(modules: list[torch.nn.Module], x: torch.Tensor, repeat: int = 3) -> np.ndarray:
    """CPU seconds of each module call in ``repeat`` forward passes over ``modules``."""
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            h = x
            for m in modules:
                start = time.process_time()
                h = m(h)
                times.append(time.process_time() - start)
    return np.array(times)


def profile(modules: list[torch.nn.Module], x: torch.Tensor, gap_s: float, passes: int) -> np.ndarray:
    """The median over ``passes`` (the first 3 dropped) of each call's CPU seconds, a sleep of
    ``gap_s`` before every pass."""
    rows = []
    for _ in range(passes):
        if gap_s > 0:
            time.sleep(gap_s)
        rows.append(one_pass(modules, x))
    return np.median(np.array(rows[3:]), axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps-ms", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    parser.add_argument("--passes", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    modules = _modules()
    x = torch.randn(args.batch, 3, 64, 64)
    for _ in range(5):
        one_pass(modules, x)
    steady = profile(modules, x, 0.0, args.passes)
    done = np.cumsum(steady)
    print(f"steady pass: {len(steady)} calls, {done[-1] * 1e3:.1f} ms CPU (batch {args.batch}, 1 thread)")
    print("| sleep before the pass | " + " | ".join(f"extra after {m * 1e3:.0f} ms" for m in MARKS_S)
          + " | extra over the pass |")
    print("|---:|" + "---:|" * (len(MARKS_S) + 1))
    for gap in args.gaps_ms:
        after = profile(modules, x, gap / 1e3, args.passes)
        extra = np.cumsum(after - steady)
        cells = [f"{extra[min(np.searchsorted(done, m), len(done) - 1)] * 1e3:.2f} ms" for m in MARKS_S]
        print(f"| {gap:g} ms | " + " | ".join(cells) + f" | {extra[-1] * 1e3:.2f} ms ({after.sum() / steady.sum():.3f}x) |")


if __name__ == "__main__":
    main()
