"""The simulator's memory rule against what PyTorch really allocates in one training step.

For each zoo model and size: the old estimate (every op that requires grad keeps its
output), the bytes autograd saves for the backward (:mod:`graphs.saved_activations`, the
placement graph's ``act_bytes``), the simulated peak of the all-on-one-CPU placement
(params + grads + optimizer state + saved activations + the backward's working set, see
:mod:`envs.sim.problem`) and the peak the PyTorch CPU allocator reaches in one training
step (:func:`graphs.saved_activations.measure_step_peak`).

Usage: python3 benchmarks/bench_memory.py [--quick] [--markdown] [--fit]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import torch

from envs.hardware.loading import load_cluster
from envs.sim.optimizer_state import known_state_kind
from envs.sim.problem_compile import compile_problem
from envs.sim.simulator import simulate
from graphs.pipeline import load_source, prepare
from graphs.profile.optimizer_timing import optimizer_kind
from graphs.saved_activations import measure_step_peak

MiB = 2**20

#: (model, size, extra model arguments): the small zoo models and a few moderate sizes.
CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("rnnlm", "small", {}),
    ("nmt", "small", {}),
    ("gpt2", "small", {}),
    ("moe", "small", {}),
    ("resnet50", "small", {}),
    ("inception_v3", "small", {}),
    ("gpt2", "small", {"batch_size": 16}),
    ("resnet50", "paper", {"batch_size": 8, "image_size": 64}),
    ("rnnlm", "small", {"batch_size": 64}),
    ("nmt", "small", {"batch_size": 64}),
    ("moe", "small", {"batch_size": 64}),
    ("inception_v3", "small", {"batch_size": 16}),
    ("gpt2", "paper", {"batch_size": 1, "seq_len": 128}),
    ("gpt2", "paper", {"batch_size": 1}),  # seq 1024: ~25 CPU s and 4.5 GB of this machine's memory
)
QUICK = CASES[:6]


def one_cpu_cluster() -> Any:
    """A cluster of one CPU device (24 GiB, this machine's memory)."""
    return load_cluster({"name": "1xcpu", "devices": [
        {"name": "cpu", "kind": "cpu", "memory": "24GiB", "peak_flops": "100G", "mem_bandwidth": "20GB/s"}]})


def old_rule_bytes(graph: nx.DiGraph) -> float:
    """The estimate before saved activations were measured: each op that requires grad keeps its output."""
    stripped = graph.copy()
    for v in stripped:
        stripped.nodes[v].pop("act_bytes", None)
    return float(compile_problem(stripped, one_cpu_cluster()).ops.act_bytes.sum())


@dataclass
class Row:
    """One line of the table (bytes)."""

    model: str
    size: str
    args: dict[str, Any]
    params: float
    old_rule: float
    saved: float
    simulated: float
    measured: float
    optimizer: str


def measure_case(model: str, size: str, args: dict[str, Any]) -> Row:
    """The row of one (model, size, arguments)."""
    model_args = {"size": size, **args}
    prep = prepare(f"zoo:{model}", model_args=model_args, profile=False)
    graph = prep.captured.graph
    # A fresh model instance (same seed) so the capture's copy is not the one trained.
    spec = load_source(f"zoo:{model}", model_args)
    peak = measure_step_peak(spec.model, spec.example_inputs, spec.loss_fn, spec.optimizer_fn)
    opt_name = optimizer_kind(spec.optimizer_fn)
    problem = compile_problem(graph, one_cpu_cluster(), optimizer=known_state_kind(opt_name),
                              grouping=prep.grouping)
    result = simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64))
    return Row(model=model, size=size, args=args, params=float(problem.param_bytes.sum()),
               old_rule=old_rule_bytes(graph), saved=float(problem.act_bytes.sum()),
               simulated=float(result.peak_memory[0]), measured=peak, optimizer=opt_name)


#: Paper-size cases for the fit table (captured on fake tensors: nothing runs).
FIT_CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("rnnlm", {}), ("nmt", {}), ("gpt2", {"batch_size": 1}), ("gpt2", {}), ("gpt2", {"batch_size": 8}),
    ("moe", {}),
    ("resnet50", {}), ("inception_v3", {}),
)


def fit_rows(cases: Iterable[tuple[str, dict[str, Any]]] = FIT_CASES,
             clusters: Sequence[str] = ("4xK40", "4xV100-nvlink")) -> list[list[str]]:
    """Paper-size models all on one GPU of each cluster: peak before (out_bytes estimate, no
    working set) and now (saved activations + working set), and whether each fits."""
    lines = []
    for model, args in cases:
        prep = prepare(f"zoo:{model}", model_args={"size": "paper", **args}, profile=False)
        graph = prep.captured.graph
        for name in clusters:
            cluster = load_cluster(name)
            problem = compile_problem(graph, cluster, grouping=prep.grouping,
                                      optimizer=known_state_kind(optimizer_kind(prep.spec.optimizer_fn)))
            before = float(problem.static_memory().sum()) + old_rule_bytes(graph)
            gpu = next(i for i, kind in enumerate(problem.device_kinds) if kind != "cpu")
            now = float(simulate(problem, np.full(problem.num_nodes, gpu, dtype=np.int64)).peak_memory[gpu])
            cap = float(problem.memory_capacity[gpu])
            extra = " ".join(f"{k}={v}" for k, v in args.items())
            lines.append([model, f"paper {extra}".strip(), f"{name} ({problem.device_kinds[gpu]})",
                          f"{cap / 2**30:.1f}", f"{before / 2**30:.3f}", "yes" if before <= cap else "no",
                          f"{now / 2**30:.3f}", "yes" if now <= cap else "no"])
    return lines


def _render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def _label(row: Row) -> str:
    extra = " ".join(f"{k}={v}" for k, v in row.args.items())
    return f"{row.size} {extra}".strip()


def table(rows: list[Row], markdown: bool) -> str:
    """The result table, plain or markdown."""
    head = ["model", "size", "optimizer", "params MiB", "old rule MiB", "saved by autograd MiB",
            "simulated peak MiB", "measured peak MiB", "simulated/measured"]
    body = [[r.model, _label(r), r.optimizer, f"{r.params / MiB:.1f}", f"{r.old_rule / MiB:.1f}",
             f"{r.saved / MiB:.1f}", f"{r.simulated / MiB:.1f}", f"{r.measured / MiB:.1f}",
             f"{r.simulated / r.measured:.2f}"] for r in rows]
    return _render(head, body, markdown)


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the six small zoo models only")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--fit", action="store_true",
                        help="instead: do the paper-size models fit one K40 / V100 (simulated, nothing runs)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.process_time()
    if ns.fit:
        head = ["model", "size", "GPU", "GiB", "before: peak GiB", "fits", "now: peak GiB", "fits"]
        print(_render(head, fit_rows(), ns.markdown))
    else:
        rows = [measure_case(*case) for case in (QUICK if ns.quick else CASES)]
        print(table(rows, ns.markdown))
    print(f"\n{time.process_time() - start:.1f} CPU s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
