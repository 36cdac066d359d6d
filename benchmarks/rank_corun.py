"""Does an op run slower while the other worker process computes too? (issue 15, the rank model)

The rank simulator charges each op its time profiled in one process with the other core idle.
Over ``cpu:0,cpu:1`` both workers often compute at once, sharing the caches and the memory
bus (and, on a VM, perhaps one physical core's two hyperthreads). This times four kinds of
work, one thread each, in one process alone and then in two processes at once, and prints the
per-process slowdown ``alone / each of two``:

* ``mm``: a 256 x 256 matrix product (compute-bound),
* ``lstm``: an LSTM cell step at batch 32, width 256 (the zoo NMT's and rnnlm's op),
* ``small``: three elementwise ops on a 32 x 64 tensor (dispatch-bound, like most ops of the
  small zoo models),
* ``big``: an elementwise op over 4 million floats into a kept buffer (memory-bound).

    python benchmarks/rank_corun.py --kinds mm lstm small big --seconds 3 --repeats 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable

import torch


def _workload(kind: str) -> Callable[[], object]:
    if kind == "mm":
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        return lambda: a @ b
    if kind == "lstm":
        cell = torch.nn.LSTMCell(256, 256)
        x, h, c = torch.randn(32, 256), torch.randn(32, 256), torch.randn(32, 256)
        return lambda: cell(x, (h, c))
    if kind == "small":
        x = torch.randn(32, 64)
        return lambda: torch.tanh(x) * x + x
    if kind == "big":
        y, z = torch.randn(4_000_000), torch.empty(4_000_000)
        return lambda: torch.mul(y, 1.0001, out=z)  # into a kept buffer: no page faults, the bus only
    raise SystemExit(f"unknown kind {kind!r}; expected mm, lstm, small or big")


def _run(kind: str, seconds: float, results: mp.Queue, start: mp.Event) -> None:
    torch.set_num_threads(1)
    fn = _workload(kind)
    for _ in range(50):  # warm: allocator, caches
        fn()
    start.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    results.put(n / (time.perf_counter() - t0))


def per_process_rate(kind: str, processes: int, seconds: float) -> float:
    """Calls per second of one process, the mean over ``processes`` run at once."""
    ctx = mp.get_context("spawn")
    results, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_run, args=(kind, seconds, results, start), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # every process imported torch and warmed up before the clock starts
    start.set()
    rates = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["mm", "lstm", "small", "big"])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("| work | alone (calls/s) | each of two at once (calls/s) | slowdown |")
    print("|---|---:|---:|---:|")
    for kind in args.kinds:
        for _ in range(args.repeats):
            alone = per_process_rate(kind, 1, args.seconds)
            both = per_process_rate(kind, 2, args.seconds)
            print(f"| {kind} | {alone:,.0f} | {both:,.0f} | {alone / both:.3f} |", flush=True)


if __name__ == "__main__":
    main()
