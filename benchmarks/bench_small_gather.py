"""How long a small all-gather takes between CPU processes (gloo), against the ping-pong latency.

Rule D5 of ``envs.sim.data_parallel`` charges each synchronised BatchNorm two all-gathers of
a few kilobytes a step (``envs.runtime.replica_batch_norm``). This measures what one costs
here: two 1-thread processes on loopback, all-gathers of ``--floats`` float32 values back to
back, as ``process_group_gather`` issues them, and the same processes'
ping-pong (``send``/``recv`` of one float there and back), the latency the rank cluster's
links are measured with (``envs.runtime.distributed.launcher.measure_links``). Prints the
median of each over ``--rounds`` rounds of ``--calls`` calls.

    python benchmarks/bench_small_gather.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, floats: list[int], calls: int, rounds: int, out) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    from envs.runtime.replica_batch_norm import process_group_gather

    gather = process_group_gather(group)
    results: dict[str, float] = {}
    one = torch.zeros(1)
    for _ in range(20):
        dist.all_reduce(one, group=group)
    times = []
    for _ in range(rounds):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(calls):
            if rank == 0:
                dist.send(one, 1)
                dist.recv(one, 1)
            else:
                dist.recv(one, 0)
                dist.send(one, 0)
        times.append((time.perf_counter() - t) / calls / 2)
    results["ping-pong latency (one way)"] = statistics.median(times)
    for n in floats:
        x = torch.randn(n)
        times = []
        for _ in range(rounds):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(calls):
                gather(x)
            times.append((time.perf_counter() - t) / calls)
        results[f"all-gather of {n} floats (process_group_gather)"] = statistics.median(times)
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floats", type=int, nargs="+", default=[65, 512, 2049, 4096])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--port", type=int, default=29633)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, args.port, args.floats, args.calls, args.rounds, q), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    results = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"2 processes x 1 thread, gloo on 127.0.0.1")
    lat = results["ping-pong latency (one way)"]
    for name, seconds in results.items():
        extra = "" if name.startswith("ping") else f"  ({seconds / lat:.1f}x the one-way latency)"
        print(f"{name}: {seconds * 1e6:.1f} us{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
