"""A real two-process pipeline's ranks stay within their simulated peak memory (each rank's CPU
allocator under torch.profiler during a training step: benchmarks/bench_memory_ranks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory_ranks.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory_ranks", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: How far a measured in-step peak may rise above the simulated one: the last rank's peak moves
#: with the two processes' relative timing (likely a gradient it sends back, alive until the
#: first rank receives it; not traced). Measured on this test's case (2026-12-05/06, 23:55-00:35 UTC): the
#: last rank's in-step peak 2,196,124 B in each of 6 runs at load 1; the test failed in 5 of
#: 41 runs, each while other jobs loaded the 2 cores (load 2-6), at up to 2,328,348 B, 1.6%
#: above the simulated 2,291,201. The simulator prices the schedule's own timing, not the
#: worst over timings.
TIMING_SPREAD = 0.05


def test_each_rank_of_a_1f1b_pipeline_stays_within_its_simulated_peak(tmp_path):
    """Before the runtime kept only its own stages and rules P5a-c, GPT-2's 1F1B ranks peaked
    at up to 1.35x what the simulator said (0.74x simulated / measured); now at or above 1 on a
    quiet machine, and within :data:`TIMING_SPREAD` of it under load."""
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from envs.runtime.pipeline.stages import whole_pipeline
    from envs.sim.pipeline import simulate_pipeline
    from envs.sim.pipeline_layout import Pipeline
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare
    from placer.benchmark import optimizer_name
    from placer.search.baselines.pipeline_split import even_split_layers

    bench = _bench()
    prep = prepare("zoo:gpt2", model_args=dict(size="small", width=64, heads=2, layers=2, seq_len=16, batch_size=16))
    gm, graph, spec = prep.captured.gm, prep.captured.graph, prep.spec
    inputs = dict(zip([n.name for n in gm.graph.nodes if n.op == "placeholder"], tuple(spec.example_inputs)))
    problem = compile_problem(graph, rank_cluster("cpu:0,cpu:1", links=bench.LINKS), optimizer=optimizer_name(spec))
    cut = even_split_layers(problem, 4, "1f1b")
    stages = tuple(tuple(n for n in s if graph.nodes[n].get("op") not in ("placeholder", "output")) for s in cut.stages)
    pipe = Pipeline(stages, cut.devices, 4, "1f1b")
    simulated = simulate_pipeline(problem, whole_pipeline(gm, pipe)).peak_memory
    measured = bench.measure(tmp_path / "job", gm, inputs, pipe, spec)
    for rank, peaks in enumerate(measured):
        assert peaks["in_step"] > 0
        assert simulated[f"cpu:{rank}"] * (1 + TIMING_SPREAD) >= peaks["in_step"], (rank, simulated, measured)
