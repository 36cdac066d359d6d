"""Benchmark: capture, profile and group every zoo model; compare node times with the real step.

Per model: ops and groups, the wall time of capture, profiling (a fresh cache, so the
time is the real measurement) and grouping, the profiling method used,
and the sum of the profiled node times (forward + backward + optimizer update, CPU, one
thread, the model's own optimizer) against the measured whole training step (forward +
loss + backward + optimizer step, CPU, one thread, median). Every figure is measured on
this machine; nothing is simulated. ``--out`` appends a dated section (with the load
average) to the file, keeping the earlier ones.

    python benchmarks/bench_capture.py                      # small zoo
    python benchmarks/bench_capture.py --size paper --models rnnlm resnet50
    python benchmarks/bench_capture.py --out benchmarks/results/capture.md
    python benchmarks/bench_capture.py --models --scale        # only the ~1,000-op case
    python benchmarks/bench_capture.py --size paper --models nmt --model-arg batch_size=1

``--scale`` adds a ~1,000-op graph (NMT, 4 layers, 25+25 unrolled steps, small widths):
capture + profile of it must take under a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path

import torch

from graphs.capture import capture
from graphs.errors import PlacerError
from graphs.grouping import group_graph
from graphs.profile.cache import device_name
from graphs.profile.profiler import profile_graph
from graphs.profile.step_timing import StepTimes, measure_step_parts
from graphs.zoo import ZOO_MODELS, load_zoo_model

# Fast steps are measured for about this long (at most this many steps), as the profile's rounds.
STEP_SECONDS = 1.0
MAX_STEP_REPEATS = 50

# The ~1,000-op case of the "Done when": (zoo model, size, model arguments).
SCALE_CASE = ("nmt", "small", {"layers": 4, "src_len": 25, "tgt_len": 25})


@dataclass
class Row:
    """One benchmarked model."""

    model: str
    size: str
    nodes: int
    train_ops: int
    groups: int
    capture_s: float
    profile_s: float
    group_s: float
    method: str
    node_fwd_ms: float
    node_bwd_ms: float
    node_opt_ms: float
    opt_fixed_ms: float
    step_fwd_ms: float
    step_bwd_ms: float
    step_opt_ms: float
    step_ms: float
    ratios: list[float] = field(default_factory=list)

    @property
    def node_sum_ms(self) -> float:
        return self.node_fwd_ms + self.node_bwd_ms + self.node_opt_ms

    @property
    def ratio(self) -> float:
        return self.node_sum_ms / self.step_ms if self.step_ms > 0 else float("nan")


def bench_model(name: str, size: str, repeats: int, cache_dir: str, step_repeats: int,
                model_args: dict | None = None, method: str = "in_situ", rounds: int = 1) -> Row:
    """Capture, profile (CPU) and group one zoo model and time its real training step.

    With ``rounds`` > 1 the model is profiled afresh, its step measured right before and
    right after (the two averaged), that many times, and the round with the median ratio is kept (``Row.ratios`` holds
    every round's): on a shared machine the load changes between two measurements, and a
    profile and a step taken side by side see the same load.
    """
    spec = load_zoo_model(name, size, **(model_args or {}))
    start = time.perf_counter()
    cap = capture(spec.model, spec.example_inputs, name=name)
    capture_s = time.perf_counter() - start

    label = name + (f"[{','.join(f'{k}={v}' for k, v in model_args.items())}]" if model_args else "")
    results: list[Row] = []
    def measure_step() -> StepTimes:
        step = measure_step_parts(spec.model, spec.example_inputs, spec.loss_fn, repeats=step_repeats,
                                  optimizer_fn=spec.optimizer_fn)
        if step.total * step_repeats < STEP_SECONDS:
            # A step of a few milliseconds: a median over ~1 s of steps, as the profile's rounds.
            more = min(MAX_STEP_REPEATS, math.ceil(STEP_SECONDS / max(step.total, 1e-9)))
            step = measure_step_parts(spec.model, spec.example_inputs, spec.loss_fn, repeats=more,
                                      optimizer_fn=spec.optimizer_fn)
        return step

    for i in range(rounds):
        # The step is measured just before and just after the profile and the two averaged,
        # so that a load change during the round weighs on both sides alike.
        before = measure_step() if rounds > 1 else None
        start = time.perf_counter()
        profile_graph(cap, spec.example_inputs, devices=["cpu"], repeats=repeats, cache_dir=cache_dir,
                      method=method, optimizer_fn=spec.optimizer_fn, use_cache=i == 0)
        profile_s = time.perf_counter() - start

        start = time.perf_counter()
        grouping = group_graph(cap.graph, gm=cap.gm)
        group_s = time.perf_counter() - start

        node_fwd = sum(d["fwd_time"].get("cpu", 0.0) for _, d in cap.graph.nodes(data=True))
        node_bwd = sum(d["bwd_time"].get("cpu", 0.0) for _, d in cap.graph.nodes(data=True))
        node_opt = sum(d.get("opt_time", {}).get("cpu", 0.0) for _, d in cap.graph.nodes(data=True))
        step = measure_step()
        if before is not None:
            step = StepTimes(*((a + b) / 2 for a, b in zip(astuple(before), astuple(step))))
        info = cap.graph.graph["profile_info"]["cpu"]
        results.append(Row(
            label, size, cap.graph.number_of_nodes(),
            info["compute_nodes"] + info["autograd_nodes"]
            + sum(int(d.get("param_tensors") or 0) for _, d in cap.graph.nodes(data=True)),
            len(grouping.groups), capture_s, profile_s, group_s,
            info["method"] + (f" ({info['signatures']} signatures)" if info["method"] == "isolated" else ""),
            node_fwd * 1e3, node_bwd * 1e3, node_opt * 1e3, info["optimizer_fixed"] * 1e3, step.forward * 1e3,
            step.backward * 1e3, step.optimizer * 1e3, step.total * 1e3))
    ratios = [r.ratio for r in results]
    kept = sorted(results, key=lambda r: r.ratio)[(len(results) - 1) // 2]
    kept.ratios = ratios
    return kept


def table(rows: list[Row]) -> str:
    """The results as a markdown table."""
    head = ("| model | size | ops | training-graph ops | groups | capture s | profile s | group s | profile method "
            "| node fwd / step fwd ms | node bwd / step bwd ms | node opt (+ fixed) / step optimizer ms "
            "| sum of node times ms | measured step ms | ratio (every round) |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(f"| {r.model} | {r.size} | {r.nodes} | {r.train_ops} | {r.groups} | {r.capture_s:.2f} | {r.profile_s:.2f} "
                     f"| {r.group_s:.3f} | {r.method} | {r.node_fwd_ms:.2f} / {r.step_fwd_ms:.2f} "
                     f"| {r.node_bwd_ms:.2f} / {r.step_bwd_ms:.2f} "
                     f"| {r.node_opt_ms:.2f} (+ {r.opt_fixed_ms:.3f}) / {r.step_opt_ms:.2f} "
                     f"| {r.node_sum_ms:.2f} | {r.step_ms:.2f} | {r.ratio:.2f} "
                     f"({', '.join(f'{x:.2f}' for x in r.ratios)}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["small", "paper"], default="small")
    parser.add_argument("--models", nargs="*", default=list(ZOO_MODELS), metavar="NAME",
                        help=f"zoo models (default: all of {', '.join(ZOO_MODELS)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op signature (median)")
    parser.add_argument("--step-repeats", type=int, default=5, help="timed training steps (median)")
    parser.add_argument("--cache-dir", default=None,
                        help="profile cache (default: a fresh temporary one, so profiling is measured)")
    parser.add_argument("--method", choices=["in_situ", "isolated"], default="in_situ",
                        help="profiling method (see graphs.profile.profiler)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="model argument for every model, e.g. batch_size=1 (repeatable; ints parsed)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="profile + step measurements per model, side by side; the median-ratio round is kept")
    parser.add_argument("--scale", action="store_true", help="also run the ~1,000-op NMT case")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    model_args: dict = {}
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--model-arg expects KEY=VALUE, got {item!r}")
        model_args[key] = int(value) if value.lstrip("-").isdigit() else value
    unknown = [m for m in args.models if m not in ZOO_MODELS]
    if unknown:
        parser.error(f"unknown zoo model(s) {unknown}; expected some of {', '.join(ZOO_MODELS)}")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="placer-bench-") as tmp:
        cache_dir = args.cache_dir or tmp
        cases = [(name, args.size, dict(model_args)) for name in args.models] + ([SCALE_CASE] if args.scale else [])
        for name, size, model_args in cases:
            try:
                row = bench_model(name, size, args.repeats, cache_dir, args.step_repeats, model_args, args.method,
                                  args.rounds)
            except PlacerError as exc:
                print(f"{name}: error: {exc}", file=sys.stderr)
                continue
            rows.append(row)
            print(f"{row.model} ({size}): {row.nodes} ops, {row.groups} groups, capture {row.capture_s:.2f}s, "
                  f"profile {row.profile_s:.2f}s, ratio {row.ratio:.2f} (rounds {row.ratios})", file=sys.stderr, flush=True)

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (f"## Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (load average {load})\n\n"
              f"Measured on {device_name(torch.device('cpu'))} ({platform.machine()}), torch {torch.__version__}, "
              f"CPU at one thread, CPU time of the thread; profile method {args.method}, repeats {args.repeats}; "
              "training-graph ops = compute ops + the backward's autograd nodes + one update per trainable "
              "tensor (what a TensorFlow training graph of the same step counts as operations); "
              "ratio = sum of profiled node times (forward+backward+optimizer update, the model's own "
              "optimizer; the optimizer step's fixed cost, owned by no node, shown in brackets and not "
              "summed) / measured training step (forward+loss+backward+optimizer, median of "
              f"{args.step_repeats}, more for a step under 0.2 s, up to 1 s of steps; with several rounds the mean of "
              f"a measurement before and one after each profile); {args.rounds} rounds of profile + step side by side, the median-ratio round "
              "shown. All figures measured, none simulated.")
    text = header + "\n\n" + table(rows) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        earlier = args.out.read_text(encoding="utf-8").rstrip() + "\n\n" if args.out.exists() else ""
        args.out.write_text(earlier + text, encoding="utf-8")
    return 0 if len(rows) == len(cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
