"""What synchronised BatchNorm costs in compute on a CPU process, beyond native BatchNorm (rule D5).

``envs.runtime.replica_batch_norm.ReplicaBatchNorm`` computes BatchNorm from ATen pieces so that
its statistics can be gathered over the replicas. This times one training step of a zoo model
(default ResNet-50 at paper width, 64x64 images, batch 16: a DDP replica's half of 32) with
native BatchNorm and with ReplicaBatchNorm over one replica (no communication), alternately,
one thread, and profiles one native step for the time of its BatchNorm ops. Prints the
difference as a share of that time: ``CPU_REPLICA_NORM_EXTRA`` of ``envs.sim.data_parallel``.

    python benchmarks/bench_replica_batch_norm.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.runtime.replica_batch_norm import replace_batch_norms  # noqa: E402
from graphs.cpu_allocator import retain_freed_memory  # noqa: E402
from graphs.pipeline import prepare  # noqa: E402

NATIVE_NORM_OPS = ("aten::native_batch_norm", "aten::native_batch_norm_backward")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    retain_freed_memory()
    prep = prepare(f"zoo:{args.model}", model_args={"size": "paper", "image_size": args.image_size,
                                                    "batch_size": args.batch}, profile=False)
    inputs = prep.spec.example_inputs
    native = copy.deepcopy(prep.captured.gm)
    replica = copy.deepcopy(prep.captured.gm)
    swapped = replace_batch_norms(replica, lambda t: t[None])

    def step(module: torch.nn.Module) -> None:
        out = module(*inputs)
        loss = prep.spec.loss_fn(out, *inputs) if prep.spec.loss_fn else out.float().square().mean()
        loss.backward()

    for module in (native, replica):
        for _ in range(2):
            step(module)
    times: dict[str, list[float]] = {"native": [], "replica": []}
    for _ in range(args.rounds):
        for name, module in (("native", native), ("replica", replica)):
            t = time.perf_counter()
            step(module)
            times[name].append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(native)
    norm_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in NATIVE_NORM_OPS) / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, 1 thread; "
          f"{args.model}, paper width, {args.image_size}x{args.image_size}, batch {args.batch}, "
          f"{len(swapped)} BatchNorms")
    for name, values in times.items():
        print(f"{name:8s} step: median {med[name] * 1e3:.1f} ms ({', '.join(f'{v * 1e3:.0f}' for v in values)})")
    print(f"native BatchNorm ops (forward + backward, profiled): {norm_s * 1e3:.1f} ms")
    print(f"extra of ReplicaBatchNorm: {(med['replica'] - med['native']) * 1e3:.1f} ms = "
          f"{(med['replica'] - med['native']) / norm_s:.2f} of the native BatchNorm time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
