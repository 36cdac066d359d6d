"""What a backward costs when it accumulates into ``.grad`` (micro-batches 2..M of a pipeline stage).

Figures, not a test. For each model, one process, one thread, the captured GraphModule on a
micro-batch: the CPU seconds (``time.thread_time``) of its forward and of its backward

* after ``zero_grad(set_to_none=True)`` -- what the op profiles time: AccumulateGrad stores
  the new gradient as ``.grad`` -- and
* with every ``.grad`` already there -- what a pipeline stage's micro-batches after the
  first pay: AccumulateGrad adds in place,

alternated step by step so both see the same load, medians of ``--repeats``. Beside them, a
plain ``add_`` of every gradient, and what the micro-batch profile measures and the
simulator charges (:func:`graphs.profile.accumulate_timing.accumulate_seconds`).

Usage::

    python3 benchmarks/grad_accumulate.py [--models resnet50,gpt2] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.pipeline import prepare  # noqa: E402
from graphs.profile.accumulate_timing import accumulate_seconds  # noqa: E402

# The cases of benchmarks/bench_pipeline_measured.py at their micro-batch size.
CASES = {
    "resnet50": ({"size": "paper", "image_size": 64, "batch_size": 32}, 8),
    "gpt2": ({"size": "small", "width": 384, "heads": 6, "layers": 6, "seq_len": 32, "batch_size": 256}, 16),
}


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[-1].strip()


def measure(model: str, repeats: int) -> list[str]:
    """One Markdown row of ``model`` (module doc)."""
    args, micro = CASES[model]
    prep = prepare(f"zoo:{model}", model_args=dict(args))
    gm = prep.captured.gm
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {k: v[:micro] for k, v in zip(names, tuple(prep.spec.example_inputs))}
    loss_fn = prep.spec.loss_fn
    params = [p for p in gm.parameters() if p.requires_grad]

    def step(accumulate: bool) -> tuple[float, float]:
        if not accumulate:
            for p in params:
                p.grad = None
        start = time.thread_time()
        out = gm(**inputs)
        loss = loss_fn(out, *inputs.values()) if loss_fn is not None else out
        mid = time.thread_time()
        loss.backward()
        return mid - start, time.thread_time() - mid

    for _ in range(3):
        step(False)
    fresh, acc = [], []
    for _ in range(repeats):
        fresh.append(step(False))
        acc.append(step(True))
    grads = [p.grad for p in params]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    profiled = accumulate_seconds(gm, tuple(inputs.values()), torch.device("cpu"))
    news = [g.clone() for g in grads]
    adds = []
    for _ in range(repeats):
        t = time.thread_time()
        for g, n in zip(grads, news):
            g.add_(n)
        adds.append(time.thread_time() - t)
    bwd_fresh = statistics.median(b for _, b in fresh)
    bwd_acc = statistics.median(b for _, b in acc)
    return [f"| {model} | {micro} | {len(params)} / {nbytes / 1e6:.1f} MB | "
            f"{statistics.median(f for f, _ in fresh) * 1e3:.1f} | {bwd_fresh * 1e3:.1f} | {bwd_acc * 1e3:.1f} | "
            f"{(bwd_acc - bwd_fresh) * 1e3:+.1f} | {statistics.median(adds) * 1e3:.1f} | {profiled * 1e3:.1f} | "
            f"{_load()} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,gpt2")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CASES]
    if unknown:
        print(f"unknown model(s) {unknown}; expected some of {sorted(CASES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, 1 thread, load {_load()}")
    print("| model | micro-batch | parameters (tensors / bytes) | forward ms | backward after zero_grad ms | "
          "backward accumulating ms | difference | add_ of every gradient ms | profiled (accumulate_seconds) ms | load |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---|")
    for model in models:
        for line in measure(model, args.repeats):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
