"""gloo's all-reduce and DDP's step on two CPU processes, measured: the constants of rule D3c.

Figures, not tests. Two 1-thread processes on this host (gloo on loopback, placer's allocator),
for Linear stacks of widths giving 17 KB to 34 MB of gradients: (a) an all-reduce of that many
bytes alone, back to back after a barrier; (b) a plain training step and a DDP step of the stack
at batch 8, each split into forward, backward and optimizer; (c) the DDP step with
``find_unused_parameters=True`` (its search of the autograd graph every step, which placer's DDP
jobs turn on for a model with parameters the loss does not reach; the simulator does not charge
it). Printed per width, then the least-squares line through the all-reduces (fixed seconds, bytes per second) beside the rule's
constants, and DDP's extra over plain beside what the rule charges for it.

Usage::

    python3 benchmarks/bench_cpu_allreduce.py [--widths 32,256,512,768,1024,1448] [--steps 30]
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

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.runtime.distributed.launcher import free_port  # noqa: E402
from envs.sim.data_parallel import (  # noqa: E402
    CPU_ALLREDUCE_BYTES_PER_S,
    CPU_ALLREDUCE_STEP_S,
    buckets,
    reducer_seconds,
    replica_host_seconds,
    ring_allreduce_time,
)
from graphs.cpu_allocator import retain_freed_memory  # noqa: E402


def _ms(values: list[float], skip: int = 5) -> float:
    return statistics.median(values[skip:]) * 1e3


def _rank(rank: int, port: int, widths: list[int], steps: int, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    retain_freed_memory()
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = []
    try:
        for width in widths:
            torch.manual_seed(0)
            plain = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
            nbytes = sum(p.numel() * p.element_size() for p in plain.parameters())
            x = torch.randn(8, width)
            flat = torch.randn(nbytes // 4)
            reduce_s = []
            for _ in range(steps):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(flat)
                reduce_s.append(time.perf_counter() - t)
            phases = {}
            searching = nn.parallel.DistributedDataParallel(copy.deepcopy(plain), find_unused_parameters=True)
            for name, model in (("plain", plain), ("ddp", nn.parallel.DistributedDataParallel(plain)),
                                ("ddp_search", searching)):
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                fwd, bwd, upd, step = [], [], [], []
                for _ in range(steps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss = model(x).square().mean()
                    t1 = time.perf_counter()
                    loss.backward()
                    t2 = time.perf_counter()
                    opt.step()
                    t3 = time.perf_counter()
                    fwd.append(t1 - t0)
                    bwd.append(t2 - t1)
                    upd.append(t3 - t2)
                    step.append(t3 - t0)
                phases[name] = [_ms(v) for v in (fwd, bwd, upd, step)]
            sizes = [float(p.numel() * p.element_size()) for p in plain.parameters()][::-1]
            bucket_bytes = [sum(sizes[i] for i in group) for group in buckets(sizes)]
            rows.append((width, nbytes, _ms(reduce_s), phases["plain"], phases["ddp"], bucket_bytes,
                         phases["ddp_search"][3]))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,256,512,768,1024,1448", help="comma-separated Linear widths")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",") if w]
    except ValueError:
        print(f"error: --widths {args.widths!r}; expected comma-separated whole numbers", file=sys.stderr)
        return 2
    if not widths or min(widths) < 1 or args.steps < 6:
        print("error: expected --widths >= 1 and --steps >= 6 (the first 5 are warm-up)", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, port, widths, args.steps, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    rows = results.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {now}, load {os.getloadavg()[0]:.2f}; python3 benchmarks/bench_cpu_allreduce.py "
          + " ".join(argv if argv is not None else sys.argv[1:]) + "\n")
    print("| width | gradient MB | all-reduce ms | plain fwd / bwd / opt / step ms | DDP fwd / bwd / opt / step ms "
          "| DDP - plain ms | rule's DDP extra ms | DDP with find_unused_parameters, step ms |")
    print("|---:|---:|---:|---|---|---:|---:|---:|")
    for width, nbytes, reduce_ms, plain, ddp, bucket_bytes, searching_ms in rows:
        # D3c over the reducer's buckets (D2), D3d, D3e: what the simulator adds to a replica's step
        ring = sum(ring_allreduce_time(b, 2, CPU_ALLREDUCE_BYTES_PER_S, CPU_ALLREDUCE_STEP_S) for b in bucket_bytes)
        rule = (ring + reducer_seconds(nbytes, True) + replica_host_seconds(True, 2)) * 1e3
        print(f"| {width} | {nbytes / 1e6:.3f} | {reduce_ms:.3f} | {' / '.join(f'{v:.3f}' for v in plain)} | "
              f"{' / '.join(f'{v:.3f}' for v in ddp)} | {ddp[3] - plain[3]:.3f} | {rule:.3f} | {searching_ms:.3f} |")
    size = np.array([r[1] for r in rows], dtype=float)
    took = np.array([r[2] for r in rows]) / 1e3
    slope, fixed = np.polyfit(size, took, 1)
    print(f"\nall-reduce, least squares over the widths: {fixed * 1e3:.3f} ms + bytes / {1 / slope / 1e9:.2f} GB/s "
          f"(rule D3c at 2 ranks: {2 * CPU_ALLREDUCE_STEP_S * 1e3:.3f} ms + bytes / "
          f"{CPU_ALLREDUCE_BYTES_PER_S / 1e9:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
