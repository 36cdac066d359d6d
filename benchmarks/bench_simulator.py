"""Simulator speed: placements per second, batched (numba, numpy) against the reference.

Usage::

    python benchmarks/bench_simulator.py                       # print the table
    python benchmarks/bench_simulator.py --output benchmarks/results/simulator.md

Graphs: a synthetic 1,000-node layered DAG on 4 devices (``4xV100-nvlink``), and the
largest zoo graph (NMT, paper size, 8 layers, captured op graph without profiling) when
the capture layer can build it. Every path evaluates the same random placements in the
same run; the batched results are checked against the reference on the placements the
reference timed. Figures are wall-clock placements per second, best of ``--repeats``
runs, on whatever machine runs this (printed with its load average, which matters on a
shared machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import networkx as nx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from envs.hardware.loading import load_cluster  # noqa: E402
from envs.sim.problem import compile_problem  # noqa: E402
from envs.sim.reference_simulator import simulate_reference  # noqa: E402
from envs.sim.simulator import HAS_NUMBA, simulate, simulate_batch  # noqa: E402


def layered_dag(num_nodes: int, width: int = 8, seed: int = 0) -> nx.DiGraph:
    """A synthetic training graph: layers of ``width`` ops, each reading 1-3 ops of the layer before."""
    rng = np.random.default_rng(seed)
    g = nx.DiGraph(name=f"layered-{num_nodes}")
    layers: list[list[str]] = []
    for i in range(num_nodes):
        if i % width == 0:
            layers.append([])
        name = f"op{i}"
        g.add_node(
            name,
            op="call_function",
            flops=int(10 ** rng.uniform(5, 10)),
            bytes_moved=int(10 ** rng.uniform(4, 8)),
            out_bytes=int(10 ** rng.uniform(3, 7)),
            param_bytes=int(10 ** rng.uniform(3, 7)) if rng.random() < 0.3 else 0,
            requires_grad=True,
        )
        if len(layers) > 1:
            prev = layers[-2]
            for p in rng.choice(prev, size=min(len(prev), int(rng.integers(1, 4))), replace=False):
                g.add_edge(str(p), name, bytes=g.nodes[str(p)]["out_bytes"])
        layers[-1].append(name)
    return g


def numba_threads() -> int:
    """numba's thread count for parallel kernels (0 without numba)."""
    if not HAS_NUMBA:
        return 0
    import numba

    return int(numba.get_num_threads())


def rate(fn, count: int, repeats: int) -> tuple[float, float]:
    """Best placements per wall-clock second and per CPU second (all threads) over ``repeats`` runs.

    On a shared machine the wall-clock rate depends on what else runs; the CPU-time rate
    (placements per second of CPU this process used) does much less.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return count / best_wall, count / max(best_cpu, 1e-9)


def bench_graph(label: str, graph: nx.DiGraph, cluster_name: str, batches: list[int], ref_count: int,
                repeats: int) -> list[dict]:
    cluster = load_cluster(cluster_name)
    problem = compile_problem(graph, cluster)
    rng = np.random.default_rng(0)
    placements = rng.integers(0, problem.num_devices, size=(max(batches), problem.num_nodes), dtype=np.int64)
    rows = []
    ref_rows = placements[:ref_count]
    ref_dicts = [problem.array_to_placement(r) for r in ref_rows]
    t0, c0 = time.perf_counter(), time.process_time()
    ref = [simulate_reference(graph, cluster, p) for p in ref_dicts]
    ref_rate = ref_count / (time.perf_counter() - t0)
    ref_cpu = ref_count / (time.process_time() - c0)
    base = dict(graph=label, nodes=problem.num_nodes, edges=problem.num_edges, devices=problem.num_devices)
    rows.append(dict(base, path="reference (event-driven, networkx)", batch=1, rate=ref_rate, cpu_rate=ref_cpu))
    backends = (["numba"] if HAS_NUMBA else []) + ["numpy"]
    for backend in backends:
        check = simulate_batch(problem, ref_rows, backend=backend)
        worst = max(abs(check.step_time[i] - ref[i].step_time) / ref[i].step_time for i in range(ref_count))
        if worst > 1e-9:
            raise SystemExit(f"{backend} disagrees with the reference on {label}: relative error {worst:.3g}")
        for batch in batches:
            if backend == "numpy" and batch > 1024:
                continue  # numpy's rate does not grow past ~1k; keep the run short
            sub = placements[:batch]
            simulate_batch(problem, sub, backend=backend)  # warm-up (JIT load, caches)
            wall, cpu = rate(lambda: simulate_batch(problem, sub, backend=backend), batch, repeats)
            rows.append(dict(base, path=f"{backend} batched", batch=batch, rate=wall, cpu_rate=cpu))
        if backend == "numba" and numba_threads() > 1:
            # The same largest batch on one thread: how much the threads add on this machine.
            import numba

            threads, sub = numba.get_num_threads(), placements[:max(batches)]
            numba.set_num_threads(1)
            try:
                wall, cpu = rate(lambda: simulate_batch(problem, sub, backend=backend), len(sub), repeats)
            finally:
                numba.set_num_threads(threads)
            rows.append(dict(base, path="numba batched, 1 thread", batch=len(sub), rate=wall, cpu_rate=cpu))
        # One placement per call, as a Gym environment step does.
        single = placements[0]
        simulate(problem, single, backend=backend)
        calls = 200 if backend == "numba" else 5
        wall, cpu = rate(lambda: [simulate(problem, single, backend=backend) for _ in range(calls)], calls, repeats)
        rows.append(dict(base, path=f"{backend}, one placement per call (simulate)", batch=1, rate=wall, cpu_rate=cpu))
    for row in rows:
        row["vs_reference"] = row["rate"] / ref_rate
    return rows


def zoo_graph() -> tuple[str, nx.DiGraph] | None:
    try:
        from graphs.pipeline import prepare

        prep = prepare("zoo:nmt", model_args={"size": "paper", "layers": 8}, profile=False)
    except Exception as exc:  # the capture layer is optional for this benchmark
        print(f"skipping the zoo graph: prepare('zoo:nmt', size=paper, layers=8) failed: {type(exc).__name__}: {exc}")
        return None
    return "zoo:nmt paper, 8 layers (op graph)", prep.captured.graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--cluster", default="4xV100-nvlink")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--reference", type=int, default=20, help="placements the reference simulates")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-zoo", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the table as markdown here")
    args = parser.parse_args(argv)

    rows = bench_graph("layered DAG", layered_dag(args.nodes), args.cluster, args.batches, args.reference, args.repeats)
    if not args.no_zoo:
        zoo = zoo_graph()
        if zoo is not None:
            rows += bench_graph(zoo[0], zoo[1], args.cluster, args.batches, max(3, args.reference // 4), args.repeats)

    threads = str(numba_threads()) if HAS_NUMBA else "n/a"
    load = os.getloadavg()
    header = (
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, numba threads {threads}, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, python {platform.python_version()}, "
        f"numpy {np.__version__}" + (f", numba {version('numba')}" if HAS_NUMBA else ", numba not installed")
    )
    table = ["| graph | nodes | edges | devices | path | batch | placements/s (wall) | × reference | "
             "placements per CPU-second |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['graph']} | {r['nodes']} | {r['edges']} | {r['devices']} | {r['path']} | {r['batch']} | "
                     f"{r['rate']:,.1f} | {r['vs_reference']:,.0f} | {r['cpu_rate']:,.1f} |")
    text = "\n".join([header, f"cluster: {args.cluster} (simulated)", ""] + table)
    print(text)
    if args.output:
        command = "python benchmarks/bench_simulator.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            f"# Simulator speed\n\nCommand: `{command.strip()}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"{text}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
