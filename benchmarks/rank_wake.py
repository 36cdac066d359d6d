"""How late a thread that sleeps on a message is woken, on this machine (issue 15, rule R3).

Two processes ping-pong a small message, as two ranks of ``envs/runtime/distributed``
exchange values: each side spins ``W`` (the work before its send; the peer meanwhile sleeps
in its receive), stamps the message with ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, the
same clock in both processes), sends it, then waits for the reply. The receiver takes the
one-way delay as its clock after the wait returns minus the sender's stamp. Per message it
also records how long it slept in the wait, and the rise of its threads' scheduler
``run_delay`` (``/proc/self/task/*/schedstat``, 2nd field: ns spent runnable but not
running) and of the machine's ``steal`` time (``/proc/stat``: ns a vCPU was ready but the
hypervisor ran something else; this guest reports 0), which tell apart "woken, then queued
behind another thread in this kernel" from "the wake-up itself came late".

Transports: ``gloo`` (``torch.distributed`` ``isend``/``irecv``/``wait`` over loopback, what the
runtime uses: the wait sleeps on a condition variable that gloo's I/O thread signals) and
``pipe`` (a blocking ``os.read``: the kernel's own wake-up, no I/O thread); ``:pin`` puts
side r (and the threads it starts) on CPU r.

    python benchmarks/rank_wake.py --variants gloo gloo:pin pipe pipe:pin --work-us 0 300 1000 3000 --rounds 200

Prints, per work time, the median and 90th/99th percentile of the delay, the share of
delays over 1 ms, and for those the median rise of run_delay and of steal.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LATE_S = 1e-3  # a wake-up this late is "late": on loopback a message takes ~50-100 us


def _spin(seconds: float) -> None:
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while time.perf_counter_ns() < end:
        pass


def _run_delay_ns() -> int:
    """Nanoseconds this process's threads have spent runnable but not running (schedstat)."""
    total = 0
    base = Path("/proc/self/task")
    for t in base.iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just exited
    return total


def _steal_ns() -> int:
    """The machine's steal time so far (ns), summed over the CPUs (``/proc/stat``, in USER_HZ)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) * (10**9 // os.sysconf("SC_CLK_TCK"))


class _Pipe:
    def __init__(self, rank: int, fds: tuple[tuple[int, int], tuple[int, int]]) -> None:
        (r01, w01), (r10, w10) = fds
        self.rd, self.wr = (r10, w01) if rank == 0 else (r01, w10)

    def send(self, stamp: int) -> None:
        os.write(self.wr, stamp.to_bytes(8, "little"))

    def recv(self) -> int:
        return int.from_bytes(os.read(self.rd, 8), "little")


class _Gloo:
    def __init__(self, rank: int, port: int) -> None:
        import torch
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        self.dist, self.torch, self.peer = dist, torch, 1 - rank
        self.buf = torch.zeros(1, dtype=torch.int64)
        self.handle: Any = None

    def post(self) -> None:
        self.buf = self.torch.zeros(1, dtype=self.torch.int64)
        self.handle = self.dist.irecv(self.buf, self.peer)

    def send(self, stamp: int) -> None:
        self.dist.isend(self.torch.tensor([stamp], dtype=self.torch.int64), self.peer).wait()

    def recv(self) -> int:
        self.handle.wait()
        return int(self.buf[0])


def _side(rank: int, transport: str, fds: Any, port: int, works: list[float], rounds: int, pin: bool,
          out: Any) -> None:
    if pin:  # before gloo starts its I/O thread, which inherits the mask
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    chan: Any = _Gloo(rank, port) if transport == "gloo" else _Pipe(rank, fds)
    rows = []
    for work in works:
        for i in range(rounds + 10):
            # Rank 0 sends on even turns, rank 1 on odd ones: the peer sleeps while this one works.
            for turn in (0, 1):
                if turn == rank:
                    _spin(work)
                    chan.send(time.perf_counter_ns())
                else:
                    if transport == "gloo":
                        chan.post()
                    rd0, st0 = _run_delay_ns(), _steal_ns()
                    t0 = time.perf_counter_ns()
                    stamp = chan.recv()
                    t1 = time.perf_counter_ns()
                    rd1, st1 = _run_delay_ns(), _steal_ns()
                    if i >= 10:  # the first rounds warm the connection up
                        rows.append((work, (t1 - stamp) / 1e9, (t1 - t0) / 1e9, (rd1 - rd0) / 1e9, (st1 - st0) / 1e9))
    out.put((rank, rows))
    if transport == "gloo":
        chan.dist.destroy_process_group()


def measure(transport: str, works: list[float], rounds: int, pin: bool = False, port: int = 29611) -> dict[str, Any]:
    """Run the ping-pong; returns every message's (work, delay, slept, run_delay rise, steal rise)."""
    ctx = mp.get_context("fork")  # the pipe ends are inherited; the parent never imports torch
    out = ctx.Queue()
    fds = (os.pipe(), os.pipe()) if transport == "pipe" else None
    procs = [ctx.Process(target=_side, args=(r, transport, fds, port, works, rounds, pin, out))
             for r in (0, 1)]
    load = os.getloadavg()
    for p in procs:
        p.start()
    rows = []
    for _ in procs:
        rows.extend(out.get(timeout=600)[1])
    for p in procs:
        p.join()
    return {"transport": transport, "pin": pin, "rounds": rounds,
            "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
            "rows": rows}


def summarise(result: dict[str, Any]) -> list[dict[str, float]]:
    """Per work time: delay quantiles, the share of late wake-ups, and what the late ones waited on."""
    arr = np.array(result["rows"], dtype=float)
    out = []
    for work in sorted(set(arr[:, 0])):
        sub = arr[arr[:, 0] == work]
        delay, late = sub[:, 1], sub[:, 1] > LATE_S
        out.append({
            "work_us": work * 1e6, "n": float(len(sub)),
            "delay_median_us": float(np.median(delay) * 1e6), "delay_p90_us": float(np.percentile(delay, 90) * 1e6),
            "delay_p99_us": float(np.percentile(delay, 99) * 1e6), "late_share": float(late.mean()),
            "late_delay_median_us": float(np.median(delay[late]) * 1e6) if late.any() else float("nan"),
            "late_run_delay_median_us": float(np.median(sub[late, 3]) * 1e6) if late.any() else float("nan"),
            "late_steal_median_us": float(np.median(sub[late, 4]) * 1e6) if late.any() else float("nan"),
            "slept_median_us": float(np.median(sub[:, 2]) * 1e6),
        })
    return out


def _print(res: dict[str, Any]) -> None:
    print(f"transport={res['transport']} pin={res['pin']} "
          f"load {res['load_before']} -> {res['load_after']}")
    print("work_us     n  delay_med  p90     p99     late>1ms  late:delay  run_delay  steal  slept_med (us)")
    for s in summarise(res):
        print(f"{s['work_us']:7.0f} {s['n']:5.0f} {s['delay_median_us']:8.0f} {s['delay_p90_us']:7.0f} "
              f"{s['delay_p99_us']:7.0f} {s['late_share']:8.1%} {s['late_delay_median_us']:10.0f} "
              f"{s['late_run_delay_median_us']:10.0f} {s['late_steal_median_us']:6.0f} {s['slept_median_us']:9.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["gloo", "gloo:pin"],
                        help="TRANSPORT[:pin] each, run in turn: gloo or pipe; pin = side r (and its threads) "
                             "on CPU r")
    parser.add_argument("--work-us", type=float, nargs="+", default=[0, 100, 300, 1000, 3000])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", help="also write every message's figures here (JSON)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(w < 0 for w in args.work_us):
        parser.error("--rounds must be >= 1 and --work-us >= 0")
    runs = []
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    for v in args.variants:
        transport, *flags = v.split(":")
        if transport not in ("gloo", "pipe") or not set(flags) <= {"pin"}:
            parser.error(f"bad variant {v!r}: expected gloo or pipe, optionally followed by :pin")
        res = measure(transport, [w * 1e-6 for w in args.work_us], args.rounds, "pin" in flags)
        _print(res)
        runs.append({**res, "variant": v, "summary": summarise(res)})
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                                              "started_utc": started,
                                              "runs": runs}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
