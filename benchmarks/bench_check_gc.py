"""The numerical check of a large generated graph with Python's cyclic GC running or paused.

A chain model of ``--ops`` elementwise ops is captured, grouped and compiled (what an
``optimize`` run holds in memory when it checks its winner), then checked with
:func:`envs.runtime.check.check_placement` over two virtual devices, alternately with the
collector running (the check as it was) and paused (as shipped: ``graphs.gc_pause.paused_gc``
around the check and around ``apply_placement``). Each run
prints its wall and CPU time and the collections made during it with the time spent in
them (``gc.callbacks``), so the collector's share is measured directly, not inferred.

    python3 benchmarks/bench_check_gc.py --ops 50000 --rounds 2

Measured here, two runs of the command above (2 cores shared with other jobs, Python 3.11,
torch 2.13 CPU; 50,002 nodes, 1.16 M objects tracked by the GC): with the collector running,
524-532 collections took 3.7-9.6 s (clock time inside the collector) and a check 7.1-8.4 s
of CPU; paused, one collection of 0.2-0.5 s and 6.0-6.6 s of CPU. Wall time (23-65 s) is
mostly waiting for a core on the shared machine; the CPU and GC columns are the comparable
figures. This graph does not reproduce the 197 s of issue 18's run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch
from torch import nn

import envs.runtime.apply as apply
import envs.runtime.check as check
from envs.hardware.loading import load_cluster
from envs.sim.problem_compile import compile_problem
from graphs.model_file import ModelSpec
from graphs.pipeline import prepare


class Chain(nn.Module):
    """``n`` rounds of ``tanh(x) + 0.5 * x``: three fx nodes per round."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.inp = nn.Linear(16, 16)
        self.outp = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for _ in range(self.n):
            x = torch.tanh(x) + 0.5 * x
        return self.outp(x)


class GcClock:
    """Collections and seconds spent in the cyclic collector since :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds, self.count, self._start = 0.0, 0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.count += 1

    def reset(self) -> None:
        """Start counting afresh."""
        self.seconds, self.count = 0.0, 0


def main() -> None:
    """Run the alternating measurement and print one line per check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=50_000, help="fx ops in the generated graph")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of checks (running, paused; then reversed)")
    args = parser.parse_args()
    clock = GcClock()
    torch.manual_seed(0)
    spec = ModelSpec(model=Chain(args.ops // 3), example_inputs=(torch.randn(4, 16),), name="chain")
    start = time.perf_counter()
    prepared = prepare(spec, profile=False)
    problem = compile_problem(prepared.grouping.graph, load_cluster("4xK40"))
    print(f"{prepared.captured.graph.number_of_nodes():,} nodes captured, {problem.num_nodes:,} groups compiled in "
          f"{time.perf_counter() - start:.1f} s; {len(gc.get_objects()):,} objects tracked by the GC", flush=True)
    assignment = {n: ("a" if (i // 1000) % 2 else "b") for i, n in enumerate(prepared.captured.graph.nodes)}
    shipped = check.paused_gc
    for r in range(args.rounds):
        for mode in (("running", "paused") if r % 2 == 0 else ("paused", "running")):
            pause = contextlib.nullcontext if mode == "running" else shipped
            check.paused_gc = apply.paused_gc = pause  # type: ignore[assignment]
            clock.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            report = check.check_placement(spec, prepared.captured, assignment, real_devices={"a": "cpu", "b": "cpu"})
            print(f"round {r} GC {mode:8s}: check {time.perf_counter() - wall:6.1f} s wall, "
                  f"{time.process_time() - cpu:6.1f} s CPU; {clock.count} collections, {clock.seconds:.1f} s in "
                  f"them; {report.describe()}", flush=True)
    check.paused_gc = apply.paused_gc = shipped


if __name__ == "__main__":
    main()
