"""The simulated per-rank peak memory of pipelines and DDP against real two-process runs.

For each model: two stages cut by placer's ``even_split_layers`` partitioner on the rank
cluster ``cpu:0,cpu:1``, GPipe at M = 1, 2, 4, 8 and 1F1B at M = 2, 4, 8, and DDP over the
two processes. The simulated peak is ``simulate_pipeline`` of the pipeline the runtime runs
(``whole_pipeline``, as ``run_training``'s memory check simulates it) or
``simulate_data_parallel``; the measured one is each rank's CPU allocator during the last
of three training steps (``benchmarks/memory_rank_worker.py``: placer's worker unchanged
under ``torch.profiler``), and over the whole job (loading the job, the boundary probe,
the result). A ratio below 1 is a rank the simulator would let run out of memory.

Usage: python3 benchmarks/bench_memory_ranks.py [--models gpt2,resnet50,rnnlm] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from envs.runtime.distributed.launcher import free_port
from envs.runtime.distributed.rank_cluster import rank_cluster
from envs.runtime.pipeline.launcher import write_job
from envs.runtime.pipeline.stages import whole_pipeline
from envs.sim.data_parallel import simulate_data_parallel
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem_compile import compile_problem
from graphs.pipeline import prepare
from placer.benchmark import optimizer_name
from placer.search.baselines.pipeline_split import even_split_layers

MiB = 2**20
WORKER = Path(__file__).with_name("memory_rank_worker.py")
MODELS: dict[str, dict[str, Any]] = {
    "gpt2": dict(size="small", width=256, heads=4, layers=4, seq_len=32, batch_size=64),
    "resnet50": dict(size="paper", image_size=64, batch_size=16),
    "rnnlm": dict(size="small", batch_size=256, cell="gates"),
}
#: Links are given, not measured: memory does not depend on them.
LINKS = {("cpu:0", "cpu:1"): (5e-5, 2e9), ("cpu:1", "cpu:0"): (5e-5, 2e9)}


def measure(job_dir: Path, gm: Any, inputs: dict, pipeline: Pipeline | None, spec: Any) -> list[dict[str, float]]:
    """Run the job as two rank processes under the profiler; each rank's peaks in bytes."""
    write_job(job_dir, gm, inputs, pipeline, 3, spec.optimizer_fn, spec.loss_fn, threads=1, timeout_s=300)
    port = free_port("127.0.0.1")
    ranks = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, str(WORKER), str(job_dir)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = [p.communicate(timeout=600)[1] for p in ranks]
    if any(p.returncode for p in ranks):
        raise SystemExit(f"a rank failed: {[e.decode()[-2000:] for e in errors]}")
    return [json.loads((job_dir / f"memory-{r}.json").read_text()) for r in range(2)]


def rows_for(model: str, microbatches: list[int], work: Path) -> list[str]:
    prep = prepare(f"zoo:{model}", model_args=MODELS[model])
    gm, graph, spec = prep.captured.gm, prep.captured.graph, prep.spec
    inputs = dict(zip([n.name for n in gm.graph.nodes if n.op == "placeholder"], tuple(spec.example_inputs)))
    problem = compile_problem(graph, rank_cluster("cpu:0,cpu:1", links=LINKS), optimizer=optimizer_name(spec))
    rows = []

    def row(layout: str, simulated: dict[str, float], measured: list[dict[str, float]]) -> None:
        for r, m in enumerate(measured):
            sim = simulated[f"cpu:{r}"]
            rows.append(f"| {model} | {layout} | {r} | {sim / MiB:.1f} | {m['in_step'] / MiB:.1f} | "
                        f"{sim / m['in_step']:.2f} | {m['whole_run'] / MiB:.1f} | {sim / m['whole_run']:.2f} |")

    for schedule in ("gpipe", "1f1b"):
        for m in microbatches:
            if schedule == "1f1b" and m < 2:
                continue  # Schedule1F1B needs M >= the number of stages
            cut = even_split_layers(problem, m, schedule)
            stages = tuple(tuple(n for n in s if graph.nodes[n].get("op") not in ("placeholder", "output"))
                           for s in cut.stages)
            pipe = Pipeline(stages, cut.devices, m, schedule)
            simulated = simulate_pipeline(problem, whole_pipeline(gm, pipe)).peak_memory
            row(f"2 stages, {schedule}, M={m}", simulated, measure(work / f"{model}-{schedule}-{m}", gm, inputs, pipe, spec))
    simulated = simulate_data_parallel(problem, 2).peak_memory
    row("DDP, 2 replicas", simulated, measure(work / f"{model}-ddp", gm, inputs, None, spec))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    ap.add_argument("--quick", action="store_true", help="M = 2 and 8 only")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"bench_memory_ranks: unknown model(s) {unknown}; expected some of {list(MODELS)}", file=sys.stderr)
        return 2
    start, load = time.time(), os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f}; "
          f"python3 benchmarks/bench_memory_ranks.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("| model | layout | rank | simulated MiB | measured in step MiB | sim / measured | "
          "whole run MiB | sim / whole run |")
    print("|---|---|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="placer-memory-ranks-"))
    try:
        for model in models:
            for line in rows_for(model, [2, 8] if args.quick else [1, 2, 4, 8], work):
                print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{time.time() - start:.0f} s wall, load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
