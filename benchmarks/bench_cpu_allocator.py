"""The CPU allocator placer's processes run with, measured: glibc's defaults against retained memory.

Figures, not tests (``graphs/cpu_allocator.py`` says why the setting exists). Each round starts
two fresh processes one after the other, one with glibc's defaults and one calling
:func:`graphs.cpu_allocator.retain_freed_memory` first; each trains a zoo model in one thread
(SGD with momentum, ``zero_grad(set_to_none=True)``) and reports, over its steady steps only
(after the warm-up), the median step, the minor page faults and the kernel seconds per step,
and its peak resident memory. Fresh processes alternate because this machine's speed drifts
by 5-10% within minutes: compare within a round.

Usage::

    python3 benchmarks/bench_cpu_allocator.py [--models resnet50,gpt2] [--rounds 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The measured pipeline benchmark's cases (``bench_pipeline_measured.py``), trained whole.
CASES = {
    "resnet50": {"size": "paper", "image_size": 64, "batch_size": 32},
    "gpt2": {"size": "small", "width": 384, "heads": 6, "layers": 6, "seq_len": 32, "batch_size": 256},
}


def child(model: str, retain: bool, warmup: int, steps: int) -> dict[str, float]:
    """Train ``model`` in this (fresh) process and measure its steady steps."""
    sys.path.insert(0, str(ROOT))
    if retain:
        from graphs.cpu_allocator import retain_freed_memory

        retain_freed_memory()
    import torch

    from graphs.pipeline import prepare

    torch.set_num_threads(1)
    prep = prepare(f"zoo:{model}", model_args=CASES[model], profile=False)
    gm = copy.deepcopy(prep.captured.gm)
    args = list(prep.spec.example_inputs)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = gm(*args)
        loss = prep.spec.loss_fn(out, *args) if prep.spec.loss_fn is not None else out
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_ms": statistics.median(times) * 1e3,
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "kernel_ms_per_step": (after.ru_stime - before.ru_stime) / steps * 1e3,
            "max_rss_mib": after.ru_maxrss / 1024}


def run_child(model: str, retain: bool, warmup: int, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", model, "--warmup", str(warmup), "--steps", str(steps)]
    if retain:
        cmd.append("--retain")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,gpt2", help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.retain, args.warmup, args.steps)))
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CASES]
    if unknown:
        print(f"error: unknown model(s) {unknown}; expected some of {list(CASES)}", file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {now}, load {os.getloadavg()[0]:.2f}; python3 benchmarks/bench_cpu_allocator.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n| model | round | allocator | median step (ms) | page faults per step | kernel ms per step | peak RSS (MiB) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for model in models:
        for r in range(args.rounds):
            for retain in (False, True):
                f = run_child(model, retain, args.warmup, args.steps)
                print(f"| {model} | {r + 1} | {'retaining' if retain else 'glibc defaults'} | {f['step_ms']:.1f} | "
                      f"{f['faults_per_step']:.0f} | {f['kernel_ms_per_step']:.1f} | {f['max_rss_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
