"""Simulator speed: placements per second, batched (numba, numpy) against the reference.

Usage::

    python benchmarks/bench_simulator.py                       # print the table
    python benchmarks/bench_simulator.py --output benchmarks/results/simulator.md
    python benchmarks/bench_simulator.py --calibrate           # measure the host overheads

``--calibrate`` measures, on this machine's CPU with one torch thread, the fixed host
costs the simulator charges (:class:`envs.sim.cost_model.HostOverheads`): an fx
GraphModule of ``k`` tiny ops (``x + 1``), of ``k`` ``to_device`` copy nodes, and its
``backward()``, for several ``k``; a least-squares line per series gives the per-node and
the fixed cost. It prints the fit and the load average (the figures grow with the load).

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
from envs.sim.problem_compile import compile_problem  # noqa: E402
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
                repeats: int, grouping=None, numpy_batch: int = 64,
                backends: tuple[str, ...] = ("numba", "numpy")) -> list[dict]:
    cluster = load_cluster(cluster_name)
    problem = compile_problem(graph, cluster, grouping=grouping)
    rng = np.random.default_rng(0)
    placements = rng.integers(0, problem.num_devices, size=(max(batches), problem.num_nodes), dtype=np.int64)
    rows = []
    ref_rows = placements[:ref_count]
    ref_dicts = [{op: problem.device_names[int(d)] for op, d in zip(problem.ops.names, problem.ops.expand(r))}
                 for r in ref_rows]
    t0, c0 = time.perf_counter(), time.process_time()
    ref = [simulate_reference(graph, cluster, p) for p in ref_dicts]
    ref_rate = ref_count / (time.perf_counter() - t0)
    ref_cpu = ref_count / (time.process_time() - c0)
    base = dict(graph=label, nodes=problem.ops.num_ops, groups=problem.num_nodes, devices=problem.num_devices)
    rows.append(dict(base, path="reference (event-driven, networkx)", batch=1, rate=ref_rate, cpu_rate=ref_cpu,
                     load=os.getloadavg()[0], certified=float("nan")))
    for backend in [b for b in backends if b != "numba" or HAS_NUMBA]:
        check = simulate_batch(problem, ref_rows, backend=backend)
        worst = max(abs(check.step_time[i] - ref[i].step_time) / ref[i].step_time for i in range(ref_count))
        if worst > 1e-9:
            raise SystemExit(f"{backend} disagrees with the reference on {label}: relative error {worst:.3g}")
        for batch in batches:
            if backend == "numpy":
                batch = min(batch, numpy_batch)  # several-GPU rows run the engine in Python: slow
            sub = placements[:batch]
            simulate_batch(problem, sub, backend=backend)  # warm-up (JIT load, caches)
            wall, cpu = rate(lambda: simulate_batch(problem, sub, backend=backend), batch, repeats)
            certified = float(simulate_batch(problem, sub[:256], backend=backend).certified.mean())
            rows.append(dict(base, path=f"{backend} batched", batch=batch, rate=wall, cpu_rate=cpu,
                             load=os.getloadavg()[0], certified=certified))
        if backend == "numba" and numba_threads() > 1:
            # The same largest batch on one thread: how much the threads add on this machine.
            import numba

            threads, sub = numba.get_num_threads(), placements[:max(batches)]
            numba.set_num_threads(1)
            try:
                wall, cpu = rate(lambda: simulate_batch(problem, sub, backend=backend), len(sub), repeats)
            finally:
                numba.set_num_threads(threads)
            rows.append(dict(base, path="numba batched, 1 thread", batch=len(sub), rate=wall, cpu_rate=cpu,
                             load=os.getloadavg()[0], certified=float("nan")))
        # One placement per call, as a Gym environment step does.
        single = placements[0]
        simulate(problem, single, backend=backend)
        calls = 200 if backend == "numba" else 2
        wall, cpu = rate(lambda: [simulate(problem, single, backend=backend) for _ in range(calls)], calls, repeats)
        rows.append(dict(base, path=f"{backend}, one placement per call (simulate)", batch=1, rate=wall,
                         cpu_rate=cpu, load=os.getloadavg()[0], certified=float("nan")))
    for row in rows:
        row["vs_reference"] = row["rate"] / ref_rate
    return rows


def zoo_graph():
    """(label, op graph, its 256-group grouping) of the paper NMT, or None."""
    try:
        from graphs.grouping import group_graph
        from graphs.pipeline import prepare

        prep = prepare("zoo:nmt", model_args={"size": "paper", "layers": 8}, profile=False)
    except Exception as exc:  # the capture layer is optional for this benchmark
        print(f"skipping the zoo graph: prepare('zoo:nmt', size=paper, layers=8) failed: {type(exc).__name__}: {exc}")
        return None
    return "zoo:nmt paper, 8 layers", prep.captured.graph, group_graph(prep.captured.graph, max_groups=256)


def measure_host_overheads(sizes: tuple[int, ...] = (1, 16, 64, 128), repeats: int = 400) -> dict[str, float]:
    """Fit the host costs of :class:`envs.sim.cost_model.HostOverheads` here (module doc)."""
    import statistics

    import torch
    import torch.fx as fx

    from envs.runtime.transfers import to_device

    torch.set_num_threads(1)

    class Chain(torch.nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k

        def forward(self, x):
            for _ in range(self.k):
                x = x + 1.0
            return x

    def median_time(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def copies(k: int) -> fx.GraphModule:
        g = fx.Graph()
        y = g.placeholder("x")
        for _ in range(k):
            y = g.call_function(to_device, (y, "cpu"), {"non_blocking": False})
        g.output(y)
        return fx.GraphModule(torch.nn.Module(), g)

    fwd, both, copy = [], [], []
    for k in sizes:
        gm = fx.symbolic_trace(Chain(k))
        x = torch.ones(4, requires_grad=True)
        fwd.append(median_time(lambda: gm(x)))

        def step():
            gm(x).sum().backward()

        both.append(median_time(step))
        cm, xc = copies(k), torch.ones(4)
        copy.append(median_time(lambda: cm(xc)))
    k = np.asarray(sizes, dtype=float)

    def line(y):
        # The slope from every size; the fixed part from the smallest graph (a fitted intercept
        # is the difference of two large numbers, lost in the noise of a loaded machine).
        slope = float(np.polyfit(k, np.asarray(y), 1)[0])
        return slope, float(y[0] - slope * k[0])

    per_op, call = line(fwd)
    per_copy, _ = line(copy)
    per_step, fixed_step = line(both)
    return {"dispatch_per_op_s": per_op, "graph_module_call_s": call, "copy_s": per_copy,
            "backward_per_node_s": per_step - per_op, "backward_call_s": fixed_step - call,
            "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--cluster", default="4xV100-nvlink")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--reference", type=int, default=20, help="placements the reference simulates")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-zoo", action="store_true")
    parser.add_argument("--nmt-batch", type=int, default=256, help="largest batch on the NMT graph")
    parser.add_argument("--numpy-batch", type=int, default=64, help="largest numpy batch on the layered DAG")
    parser.add_argument("--zoo-only", action="store_true", help="only the NMT graphs")
    parser.add_argument("--backends", nargs="+", default=["numba", "numpy"], choices=["numba", "numpy"])
    parser.add_argument("--output", type=Path, help="also write the table as markdown here")
    parser.add_argument("--calibrate", action="store_true", help="measure the host overheads instead (module doc)")
    args = parser.parse_args(argv)
    if args.calibrate:
        for key, value in measure_host_overheads().items():
            print(f"{key}: {value * 1e6:.2f} us" if key.endswith("_s") else f"{key}: {value:.2f}")
        return 0

    rows = []
    backends = tuple(args.backends)
    if not args.zoo_only:
        rows += bench_graph("layered DAG", layered_dag(args.nodes), args.cluster, args.batches, args.reference,
                            args.repeats, numpy_batch=args.numpy_batch, backends=backends)
    if not args.no_zoo:
        zoo = zoo_graph()
        if zoo is not None:
            label, graph, grouping = zoo
            ref = max(1, args.reference // 10)
            nmt_batches = [min(b, args.nmt_batch) for b in args.batches[:1]]
            rows += bench_graph(f"{label} (op graph)", graph, args.cluster, nmt_batches, ref, args.repeats,
                                numpy_batch=4, backends=backends)
            rows += bench_graph(f"{label}, 256 groups", graph, args.cluster, nmt_batches, ref, args.repeats,
                                grouping=grouping, numpy_batch=4, backends=backends)

    threads = str(numba_threads()) if HAS_NUMBA else "n/a"
    load = os.getloadavg()
    header = (
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, numba threads {threads}, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, python {platform.python_version()}, "
        f"numpy {np.__version__}" + (f", numba {version('numba')}" if HAS_NUMBA else ", numba not installed")
    )
    table = ["| graph | ops | groups | devices | path | batch | placements/s (wall) | × reference | "
             "placements per CPU-second | CPU ns per op | certified | load average |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cert = "" if np.isnan(r["certified"]) else f"{r['certified']:.0%}"
        per_op = 1e9 / (r["cpu_rate"] * r["nodes"])  # CPU time per simulated op, all threads
        table.append(f"| {r['graph']} | {r['nodes']} | {r['groups']} | {r['devices']} | {r['path']} | {r['batch']} | "
                     f"{r['rate']:,.1f} | {r['vs_reference']:,.0f} | {r['cpu_rate']:,.1f} | {per_op:,.0f} | {cert} | "
                     f"{r['load']:.1f} |")
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
