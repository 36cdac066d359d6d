"""DDP's reducer on a CPU process, measured: the rate behind rule D3d of ``envs/sim/data_parallel.py``.

Figures, not tests. A world-size-1 ``DistributedDataParallel`` (gloo, one thread, placer's
allocator) against the same model trained plain, on stacks of ``Linear(2048, 2048)`` whose
compute (batch 4) is small beside their parameters: the difference in CPU seconds per step is
the reducer's own work, its copies of every gradient into its buckets and back. Printed per
stack with its seconds per gradient byte, beside the rule's constant.

Usage::

    python3 benchmarks/bench_ddp_reducer.py [--layers 4,8,16] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.sim.data_parallel import CPU_REDUCER_SECONDS_PER_BYTE  # noqa: E402
from graphs.cpu_allocator import retain_freed_memory  # noqa: E402


def cpu_seconds_per_step(model: torch.nn.Module, x: torch.Tensor, steps: int, warmup: int = 3) -> float:
    """Median CPU seconds of a training step (SGD with momentum, gradients set to None)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(warmup + steps):
        t = time.process_time()
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()
        times.append(time.process_time() - t)
    return statistics.median(times[warmup:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8,16", help="comma-separated stack depths")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        depths = [int(d) for d in args.layers.split(",") if d]
    except ValueError:
        print(f"error: --layers {args.layers!r}; expected comma-separated whole numbers, e.g. 4,8,16", file=sys.stderr)
        return 2
    if not depths or min(depths) < 1 or args.steps < 1 or args.rounds < 1:
        print("error: expected --layers of depths >= 1, --steps >= 1 and --rounds >= 1", file=sys.stderr)
        return 2
    retain_freed_memory()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"# {now}, load {os.getloadavg()[0]:.2f}; python3 benchmarks/bench_ddp_reducer.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"rule D3d: {CPU_REDUCER_SECONDS_PER_BYTE * 1e9:.2f} ns per gradient byte\n")
        print("| layers | gradient MB | round | plain CPU ms/step | DDP (world 1) CPU ms/step | reducer ms | ns per byte |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        x = torch.randn(4, 2048)
        for depth in depths:
            plain = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(depth)])
            ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
            nbytes = sum(p.numel() * p.element_size() for p in plain.parameters())
            for r in range(args.rounds):
                a = cpu_seconds_per_step(plain, x, args.steps)
                d = cpu_seconds_per_step(ddp, x, args.steps)
                print(f"| {depth} | {nbytes / 1e6:.1f} | {r + 1} | {a * 1e3:.1f} | {d * 1e3:.1f} | {(d - a) * 1e3:.1f} | "
                      f"{(d - a) / nbytes * 1e9:.2f} |", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
