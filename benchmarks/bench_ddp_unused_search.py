"""DDP's ``find_unused_parameters=True``, measured: what it costs a step on this machine.

Figures, not tests. Two gloo processes on 127.0.0.1 (one thread each) train a stack of
``Linear(16, 16) + ReLU`` layers (small compute, many parameters: the search's cost grows with
the autograd graph and the parameters, not the arithmetic) as ``DistributedDataParallel`` with
and without the flag, in alternating rounds (the fastest of each kept); printed per depth: the median forward (the search
of the autograd graph runs at its end, ``Reducer::prepare_for_backward``) and the median step,
side by side. Why it matters: a pipeline x DDP stage replica sets the flag only where it holds a
parameter the loss does not reach (``envs/runtime/pipeline/launcher.py``, ``_reached_by_no_loss``);
the simulators charge no search.

Usage::

    python3 benchmarks/bench_ddp_unused_search.py [--layers 50,200] [--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.runtime.distributed.launcher import free_port  # noqa: E402

WARMUP = 10


def _rank(rank: int, port: int, layers: int, search: bool, steps: int, out: mp.Queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(layers)])
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=search)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x = torch.randn(4, 16)
    forward, step = [], []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        loss = ddp(x).sum()
        forward.append(time.perf_counter() - start)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step.append(time.perf_counter() - start)
    if rank == 0:
        out.put((statistics.median(forward[WARMUP:]), statistics.median(step[WARMUP:])))
    dist.destroy_process_group()


def _measure(layers: int, search: bool, steps: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, port, layers, search, steps, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="50,200", help="comma-separated stack depths")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest of each kept")
    args = parser.parse_args(argv)
    depths = [int(v) for v in args.layers.split(",")]
    print(f"DDP find_unused_parameters, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"2 gloo processes x 1 thread, load {os.getloadavg()[0]:.1f}")
    print("| layers | parameters | forward without / with (ms) | step without / with (ms) | step with / without |")
    print("|---:|---:|---:|---:|---:|")
    for layers in depths:
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for search in (False, True):
                runs[search].append(_measure(layers, search, args.steps))
        f0, s0 = min(r[0] for r in runs[False]), min(r[1] for r in runs[False])
        f1, s1 = min(r[0] for r in runs[True]), min(r[1] for r in runs[True])
        print(f"| {layers} | {2 * layers} | {f0 * 1e3:.3f} / {f1 * 1e3:.3f} | {s0 * 1e3:.3f} / {s1 * 1e3:.3f} | "
              f"{s1 / s0:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
