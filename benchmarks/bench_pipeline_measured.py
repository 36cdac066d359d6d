"""Pipelines and DDP measured here: 2 gloo processes x 1 thread against one process (issue 16).

Figures, not tests. For each case (a zoo model at a size stated in the table) this runs, on
this machine and in one sitting:

* one process with 1 thread, then with 2 threads (the unsplit captured model, in this process);
* a 2-stage pipeline over 2 processes x 1 thread on ``torch.distributed.pipelining``
  (:func:`envs.runtime.pipeline.launcher.run_training`), split by the partitioner whose
  simulated pipeline is fastest (``placer.search.baselines.pipeline_split``);
* DDP over the same 2 processes x 1 thread.

Every run trains the same model with the same optimizer (SGD, momentum 0.9) on the same
batch. Each figure is the median step of ``--steps`` steps after ``--warmup`` steps, with the
CPU seconds per step (all threads of all processes) and the load average when it finished.
Beside each, the simulator's predictions: the pipeline on the rank cluster ``cpu:0,cpu:1``
(:func:`envs.sim.pipeline.simulate_pipeline`, links measured by ping-pong), DDP by
:func:`envs.sim.data_parallel.simulate_data_parallel`, one process by the rank simulator on
``cpu:0``; the simulator models one thread per process, so the 2-thread row has none.
"simulated" costs every op from the profile at the full batch (a micro-batch pays P2's
default fixed 2.4 us per op, the rest shrinks by ``M``); "calibrated" is what ``placer
optimize --devices cpu:0,cpu:1`` simulates: the model prepared as optimize prepares it over
CPU processes, profiled a second time on a micro-batch (``prepare(...,
microbatch_profile=True)``, :mod:`graphs.profile.batch_scaling`: 1/8 of the batch, or the
largest divisor up to 8), so the compiled problem carries each op's measured fixed part,
which the pipeline's micro-batches, DDP's half batch and the one process's full batch all
read (one process: a 1-stage pipeline of ``M = 1`` on ``cpu:0``,
:data:`envs.sim.stage_costs.ENGINE_COSTS`). The pipeline is the partitioner whose calibrated
step is fastest. The calibrated pipeline row also gives each rank's simulated busy
seconds, beside the measured CPU seconds per rank.

Usage (about 3 minutes on a quiet 2-core machine)::

    python3 benchmarks/bench_pipeline_measured.py [--cases gpt2,resnet50] [--steps 5] [--warmup 2]
        [--microbatches M] [--batch B] [--predict-only]

``--predict-only`` prints the two predictions of each case and runs nothing (seconds, with the
profiles cached).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs.runtime.distributed.rank_cluster import rank_cluster  # noqa: E402
from envs.runtime.pipeline.launcher import run_training  # noqa: E402
from envs.sim.data_parallel import simulate_data_parallel  # noqa: E402
from envs.sim.pipeline import PipelineResult, simulate_pipeline  # noqa: E402
from envs.sim.pipeline_layout import Pipeline, PipelineError  # noqa: E402
from envs.sim.problem_compile import compile_problem  # noqa: E402
from envs.sim.simulator import simulate_batch  # noqa: E402
from graphs.cpu_allocator import retain_freed_memory  # noqa: E402
from graphs.input_batch import batch_size_of  # noqa: E402
from graphs.pipeline import prepare  # noqa: E402
from graphs.profile.batch_scaling import FIXED_ATTRS  # noqa: E402
from placer.benchmark import optimizer_name  # noqa: E402
from placer.search.baselines.common import NoFit  # noqa: E402
from placer.search.baselines.pipeline_split import PARTITIONERS  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A zoo model, its arguments (stated in the table), M and the schedule of its pipeline."""

    model: str
    args: Mapping[str, Any]
    microbatches: int
    schedule: str = "1f1b"
    note: str = ""


# Sizes chosen so that one micro-batch's work on a stage is large against a gloo message
# (milliseconds of compute per send). gpt2: batch 256 in 16 micro-batches of 16 samples keeps
# 1F1B's bubble at 1/17 of the step; measured 2026-12-05 at load ~1.2: batch 128 with M=8
# gave 1.61x and 1.58x (bubble 1/9), batch 128 with M=16 1.47x (8-sample micro-batches cost
# 13% more CPU per sample), batch 256 with M=8 1.63x, batch 256 with M=16 1.69x.
CASES: dict[str, Case] = {
    "gpt2": Case("gpt2", {"size": "small", "width": 384, "heads": 6, "layers": 6, "seq_len": 32, "batch_size": 256},
                 16, note="6 blocks of width 384, 11M parameters, its embedding tied to the head across the stages"),
    "resnet50": Case("resnet50", {"size": "paper", "image_size": 64, "batch_size": 32}, 4,
                     note="paper width, 25.6M parameters, 64x64 images"),
    # BatchNorm after every convolution (94): its DDP runs with synchronised BatchNorm (rule D5).
    "inception_v3": Case("inception_v3", {"size": "paper", "image_size": 107, "batch_size": 16}, 4,
                         note="paper width, 27M parameters, 107x107 images"),
}

OPTIMIZER = ("sgd", {"lr": 0.01, "momentum": 0.9})


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    return out.strip().split("load average:")[-1].strip()


@dataclass
class Figure:
    """One row: median seconds per step, CPU seconds per step, the simulator's seconds, the load."""

    label: str
    step_s: float
    cpu_s: float
    simulated_s: float | None
    load: str
    steps: list[float] = field(default_factory=list)
    rank_cpu_s: list[float] = field(default_factory=list)
    calibrated_s: float | None = None
    calibrated_rank_s: list[float] = field(default_factory=list)


def _median_after(values: list[float], warmup: int) -> float:
    return float(np.median(values[warmup:]))


def one_process(gm: torch.fx.GraphModule, inputs: Mapping[str, torch.Tensor],
                loss_fn: Callable[..., torch.Tensor] | None, threads: int, warmup: int, steps: int) -> tuple[list, list]:
    """Wall and CPU seconds of each step of the unsplit model trained in this process, with the
    CPU allocator of placer's workers (:mod:`graphs.cpu_allocator`)."""
    retain_freed_memory()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = copy.deepcopy(gm)
        opt = torch.optim.SGD(model.parameters(), **OPTIMIZER[1])  # OPTIMIZER is SGD, as the workers build it
        order = [n.name for n in model.graph.nodes if n.op == "placeholder"]
        args = [inputs[k] for k in order]
        wall, cpu = [], []
        for _ in range(warmup + steps):
            t, c = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            out = model(*args)
            loss = loss_fn(out, *args) if loss_fn is not None else out
            loss.backward()
            opt.step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return wall, cpu
    finally:
        torch.set_num_threads(before)


def plan(problem: Any, graph: Any, microbatches: int, schedule: str) -> tuple[float, str, Pipeline, Pipeline]:
    """The partitioner whose 2-stage pipeline the simulator finds fastest: its simulated step,
    the partitioner, the pipeline as a runnable one (stages of compute nodes only) and as
    simulated (over every node of ``problem``)."""
    plans = []
    for name, fn in PARTITIONERS.items():
        try:
            cand = fn(problem, microbatches, schedule)
        except (NoFit, PipelineError) as exc:
            print(f"  {name}: {exc}", file=sys.stderr)
            continue
        stages = tuple(tuple(n for n in s if graph.nodes[n].get("op") not in ("placeholder", "output"))
                       for s in cand.stages)
        if not all(stages):
            continue
        res = simulate_pipeline(problem, cand)
        plans.append((res.step_time if res.fits else math.inf, name,
                      Pipeline(stages, cand.devices, microbatches, schedule), cand))
    if not plans:
        raise SystemExit("no partitioner produced a 2-stage pipeline with compute on both stages")
    return min(plans, key=lambda p: p[0])


def default_rule_graph(graph: Any) -> Any:
    """A copy of ``graph`` without the micro-batch profile's fixed parts: what the simulator
    costs without that profile (P2's default fixed part per op), the "simulated" column."""
    plain = graph.copy()
    for _, attrs in plain.nodes(data=True):
        for key in FIXED_ATTRS:
            attrs.pop(key, None)
    plain.graph.pop("batch_scaling", None)
    return plain


def calibrated_predictions(problem: Any, one: Any, cand: Pipeline) -> tuple[float, PipelineResult, float]:
    """(one process, the pipeline's result, DDP) simulated on problems that carry the measured fixed parts."""
    whole = tuple(one.node_names)
    one_s = simulate_pipeline(one, Pipeline((whole,), ("cpu:0",), 1, "gpipe")).step_time
    res = simulate_pipeline(problem, cand)
    ddp = simulate_data_parallel(problem, 2).step_time
    return one_s, res, ddp


@dataclass
class Predictions:
    """What the simulator says for one case, before anything runs."""

    prep: Any
    batch: int
    scaling: dict[str, Any]
    method: str
    pipe: Pipeline
    sim_one: float
    sim_pipe: float
    sim_ddp: float
    cal_one: float
    cal_pipe: PipelineResult
    cal_ddp: float


def predict(case: Case, ranks: Any, m: int) -> Predictions:
    """The simulated and calibrated steps of one process, the 2-stage pipeline with ``m``
    micro-batches and DDP (module doc)."""
    prep = prepare(f"zoo:{case.model}", model_args=dict(case.args), microbatch_profile=True)
    scaling = dict(prep.captured.graph.graph.get("batch_scaling") or {})
    if "ratio" not in scaling:
        raise SystemExit(f"{case.model}: no micro-batch profile ({scaling.get('skipped', 'no reason recorded')})")
    batch = batch_size_of(prep.spec.example_inputs, prep.spec.batch_dim)
    if batch is None:
        raise SystemExit(f"{case.model}: no batch dimension found in its inputs; expected a batched model")
    opt = optimizer_name(prep.spec)
    problem = compile_problem(prep.captured.graph, ranks, optimizer=opt)
    _, method, pipe, cand = plan(problem, prep.captured.graph, m, case.schedule)
    plain_graph = default_rule_graph(prep.captured.graph)
    plain = compile_problem(plain_graph, ranks, optimizer=opt)
    sim_pipe = simulate_pipeline(plain, cand).step_time
    sim_ddp = simulate_data_parallel(plain, 2).step_time
    one_rank = rank_cluster("cpu:0")
    plain_one = compile_problem(plain_graph, one_rank, optimizer=opt)
    sim_one = float(simulate_batch(plain_one, np.zeros((1, plain_one.num_nodes), dtype=np.int64)).step_time[0])
    one = compile_problem(prep.captured.graph, one_rank, optimizer=opt)
    cal_one, cal_pipe, cal_ddp = calibrated_predictions(problem, one, cand)
    return Predictions(prep, batch, scaling, method, pipe, sim_one, sim_pipe, sim_ddp, cal_one, cal_pipe, cal_ddp)


def prediction_rows(case: str, p: Predictions, m: int) -> list[str]:
    """``--predict-only``'s Markdown table of one case."""
    busy = " + ".join(f"{p.cal_pipe.busy[d]:.3f}" for d in p.pipe.ranks)
    return [f"### {case} (batch {p.batch}, micro-batch profile at {p.scaling['batch']}), pipeline split by "
            f"{p.method}, M={m}", "",
            "| run | simulated ms/step | calibrated ms/step (busy s per rank) |", "|---|---:|---:|",
            f"| one process, 1 thread | {p.sim_one * 1e3:.1f} | {p.cal_one * 1e3:.1f} |",
            f"| 2-stage pipeline | {p.sim_pipe * 1e3:.1f} | {p.cal_pipe.step_time * 1e3:.1f} ({busy}) |",
            f"| DDP | {p.sim_ddp * 1e3:.1f} | {p.cal_ddp * 1e3:.1f} |", ""]


def run_case(case: Case, warmup: int, steps: int, ranks: Any,
             microbatches: int | None = None) -> tuple[list[Figure], str]:
    """The four figures of one case and a one-line description of the pipeline."""
    m = microbatches or case.microbatches
    pr = predict(case, ranks, m)
    prep, batch, method, pipe = pr.prep, pr.batch, pr.method, pr.pipe
    sim_one, sim_pipe, sim_ddp, cal_one, cal_pipe, cal_ddp = (pr.sim_one, pr.sim_pipe, pr.sim_ddp, pr.cal_one,
                                                              pr.cal_pipe, pr.cal_ddp)
    gm = prep.captured.gm
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(names, tuple(prep.spec.example_inputs)))
    loss_fn = prep.spec.loss_fn

    figures = []
    for threads, sim in ((1, sim_one), (2, None)):
        wall, cpu = one_process(gm, inputs, loss_fn, threads, warmup, steps)
        figures.append(Figure(f"one process, {threads} thread{'s' if threads > 1 else ''}",
                              _median_after(wall, warmup), _median_after(cpu, warmup), sim, load_average(), wall,
                              calibrated_s=cal_one if threads == 1 else None))
    total = warmup + steps
    run = run_training(gm, inputs, pipe, steps=total, optimizer=OPTIMIZER, loss_fn=loss_fn, timeout_s=240)
    sizes = "/".join(str(len(s)) for s in pipe.stages)
    figures.append(Figure(f"2-stage pipeline, {case.schedule}, M={m}, 2 processes x 1 thread",
                          _median_after(run.step_times, warmup), _median_after(run.cpu_times, warmup), sim_pipe,
                          load_average(), run.step_times,
                          [_median_after(c, warmup) for _, c in sorted(run.rank_cpu_times.items())],
                          cal_pipe.step_time, [cal_pipe.busy[d] for d in pipe.ranks]))
    run = run_training(gm, inputs, None, world=2, steps=total, optimizer=OPTIMIZER, loss_fn=loss_fn, timeout_s=240)
    figures.append(Figure("DDP, 2 processes x 1 thread", _median_after(run.step_times, warmup),
                          _median_after(run.cpu_times, warmup), sim_ddp, load_average(), run.step_times,
                          [_median_after(c, warmup) for _, c in sorted(run.rank_cpu_times.items())], cal_ddp))
    args = ", ".join(f"{k}={v}" for k, v in case.args.items())
    desc = (f"{case.model} ({args}; batch {batch}; {case.note}); pipeline split by {method}: "
            f"stages of {sizes} ops; ops' fixed parts profiled at batch {pr.scaling['batch']}")
    return figures, desc


def table(case: str, desc: str, figures: list[Figure]) -> list[str]:
    """The case's Markdown table and its summary line."""
    base = figures[0].step_s
    rows = [f"### {case}: {desc}", "",
            "| run | measured ms/step (median) | CPU s/step (per rank) | speed vs 1 thread | simulated ms/step "
            "| calibrated ms/step (busy s per rank) | load (1, 5, 15 min) |",
            "|---|---|---|---|---|---|---|"]
    for f in figures:
        sim = "(one thread per process modelled)" if f.simulated_s is None else f"{f.simulated_s * 1e3:.1f}"
        cal = "-" if f.calibrated_s is None else f"{f.calibrated_s * 1e3:.1f}" + (
            f" ({' + '.join(f'{c:.3f}' for c in f.calibrated_rank_s)})" if f.calibrated_rank_s else "")
        cpu = f"{f.cpu_s:.3f}" + (f" ({' + '.join(f'{c:.3f}' for c in f.rank_cpu_s)})" if f.rank_cpu_s else "")
        rows.append(f"| {f.label} | {f.step_s * 1e3:.1f} | {cpu} | {base / f.step_s:.2f}x | {sim} | {cal} | {f.load} |")
    pipe, two, ddp = figures[2], figures[1], figures[3]
    rows += ["", f"{case}: the pipeline is {base / pipe.step_s:.2f}x one 1-thread process "
                 f"(target >= 1.6x: {'met' if base / pipe.step_s >= 1.6 else 'missed'}), {two.step_s / pipe.step_s:.2f}x "
                 f"one 2-thread process and {ddp.step_s / pipe.step_s:.2f}x DDP.", ""]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print the Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=None,
                        help="M for every case's pipeline (default: each case's own; it must divide the batch)")
    parser.add_argument("--batch", type=int, default=None, help="the batch of every case (default: each case's own)")
    parser.add_argument("--predict-only", action="store_true",
                        help="print the simulated and calibrated predictions, run nothing")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or args.steps < 1 or args.warmup < 0:
        print(f"error: unknown case(s) {unknown} (expected some of {list(CASES)}) or steps < 1 / warmup < 0",
              file=sys.stderr)
        return 2
    chosen = {c: CASES[c] if args.batch is None else replace(CASES[c], args={**CASES[c].args, "batch_size": args.batch})
              for c in cases}
    m = args.microbatches
    bad = [c for c in cases if (args.batch is not None and args.batch < 2)
           or (m or chosen[c].microbatches) < 2 or chosen[c].args["batch_size"] % (m or chosen[c].microbatches)]
    if bad:
        print(f"error: M does not divide the batch of {bad} (--batch {args.batch}, --microbatches {m}); "
              "expected M >= 2 dividing a batch >= 2", file=sys.stderr)
        return 2
    start = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {stamp}, torch {torch.__version__}, {torch.get_num_threads()} cores visible, load {load_average()}")
    print(f"# python3 benchmarks/bench_pipeline_measured.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    ranks = rank_cluster("cpu:0,cpu:1")  # links between the two ranks measured by ping-pong
    for name in cases:
        if args.predict_only:
            for line in prediction_rows(name, predict(chosen[name], ranks, m or chosen[name].microbatches),
                                        m or chosen[name].microbatches):
                print(line, flush=True)
            continue
        figures, desc = run_case(chosen[name], args.warmup, args.steps, ranks, m)
        for line in table(name, desc, figures):
            print(line, flush=True)
    print(f"# {time.perf_counter() - start:.0f} s wall, load {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
