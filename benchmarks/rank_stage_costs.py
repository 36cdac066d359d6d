"""Where a rank's host thread spends a step, in one process, without gloo (rank simulator rule R3).

For the placements of an ``agreement_ranks.py`` record, every rank's share of the step is run
by the runtime's own :class:`envs.runtime.distributed.runtime.RankStep` in this process, with a
comm whose receives are already there and whose sends return at once: what is left is the
thread's own work (stage calls, hand-overs, gradient bookkeeping), with no waiting and no
network. The thread time of its parts (``GraphModule`` calls, ``torch.autograd.backward``
calls, ``_handoff``, everything else) is regressed (non-negative least squares) on what the
plan says about each rank: stage calls, values a stage reads and returns, gradient roots,
hand-overs, messages. This is how the per-stage cost of R3 was checked against "a stage call
costs per value it reads and returns": the per-value terms come out at a few microseconds,
the per-call terms at tens::

    python benchmarks/rank_stage_costs.py --record benchmarks/results/agreement_ranks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

_PARTS = ("module", "backward", "handoff")


class _Done:
    def wait(self) -> None:
        return None


def _timed(acc: dict[str, float], name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.thread_time() - start
    return wrapper


def measure_model(rec: dict[str, Any], devs: list[str], repeats: int) -> list[dict[str, float]]:
    """Per (placement, rank with work): thread seconds per part and the plan's counts."""
    import torch

    from envs.runtime.distributed import runtime
    from envs.runtime.distributed.runtime import Comm, RankStep, value_meta
    from envs.runtime.split import split_by_rank
    from graphs.pipeline import prepare

    class NoWaitComm(Comm):
        def isend(self, tensor: torch.Tensor, dst: int) -> Any:
            return _Done()

        def irecv(self, tensor: torch.Tensor, src: int) -> Any:
            tensor.zero_()
            return _Done()

    prep = prepare(f"zoo:{rec['model']}", {"size": rec["size"]}, profile=True, devices=["cpu"])
    if "placements" not in rec:
        from agreement_ranks import _expand_rows

        rec = {**rec, "placements": _expand_rows(prep, rec, devs)}
    gm, graph = prep.captured.gm, prep.captured.graph
    inputs = tuple(prep.spec.example_inputs)
    gm.train()
    meta = value_meta(gm, inputs)
    acc: dict[str, float] = defaultdict(float)
    backward = torch.autograd.backward
    handoff = RankStep._handoff
    runtime.torch.autograd.backward = _timed(acc, "backward", backward)
    RankStep._handoff = _timed(acc, "handoff", handoff)  # type: ignore[method-assign]
    rows = []
    try:
        for placement in rec["placements"]:
            plan = split_by_rank(gm, {n: devs.index(d) for n, d in placement.items()}, len(devs))
            for r in range(len(devs)):
                stages = plan.stages_of(r)
                if not stages:
                    continue
                step = RankStep(plan, r, meta, inputs, prep.spec.loss_fn, "cpu", NoWaitComm())
                calls = {st.index: st.module for st in step.stages}
                for st in step.stages:
                    st.module = _timed(acc, "module", calls[st.index])
                samples = []
                for k in range(2 + repeats):
                    for p in gm.parameters():
                        p.grad = None
                    acc.clear()
                    start = time.thread_time()
                    step.step()
                    total = time.thread_time() - start
                    if k >= 2:
                        samples.append({**{part: acc[part] for part in _PARTS}, "total": total})
                for st in step.stages:
                    st.module = calls[st.index]
                row = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
                reads = [a for st in stages for a in st.inputs if a not in plan.placeholders]
                row.update(
                    model=rec["model"], calls=float(len(stages)),
                    values_in=float(len(reads)), values_out=float(sum(len(st.outputs) for st in stages)),
                    roots=float(sum(1 for st in stages for v in st.outputs if graph.nodes[v].get("requires_grad"))),
                    handoffs=float(sum(1 for t in plan.transfers if t.src_rank == r and t.dst_rank == r)),
                    messages=float(sum(1 for t in plan.transfers if r in (t.src_rank, t.dst_rank)
                                       and t.src_rank != t.dst_rank)),
                    loss=float(r == plan.output_rank),
                    profiled_fwd=sum(graph.nodes[n]["fwd_time"]["cpu"] for st in stages for n in st.nodes),
                    profiled_bwd=sum(graph.nodes[n]["bwd_time"]["cpu"] for st in stages for n in st.nodes))
                row["rest"] = row["total"] - sum(row[p] for p in _PARTS)
                rows.append(row)
    finally:
        runtime.torch.autograd.backward = backward
        RankStep._handoff = handoff  # type: ignore[method-assign]
    return rows


def regress(rows: list[dict[str, float]], target: str, columns: list[str]) -> tuple[dict[str, float], float]:
    """Non-negative least squares of ``target`` on ``columns``; returns coefficients and the RMS residual (s)."""
    from scipy.optimize import nnls

    a = np.array([[r[c] for c in columns] for r in rows])
    y = np.array([r[target] for r in rows])
    coef, _ = nnls(a, y)
    return dict(zip(columns, coef.tolist())), float(np.sqrt(np.mean((a @ coef - y) ** 2)))


MODELS = {
    "GraphModule calls": ("module", ["profiled_fwd", "calls", "values_in", "values_out"]),
    "backward calls": ("backward", ["profiled_bwd", "calls", "roots", "values_in"]),
    "hand-overs": ("handoff", ["handoffs"]),
    "the rest of RankStep.step": ("rest", ["calls", "values_out", "handoffs", "messages", "loss"]),
}


_UNITS = {"calls": "stage call", "values_in": "value a stage reads", "values_out": "value a stage returns",
          "roots": "gradient root", "handoffs": "hand-over", "messages": "message", "loss": "loss"}


def render(rows: list[dict[str, float]]) -> str:
    """Markdown: one line per part with its fitted costs (profiled-time terms as factors)."""
    lines = ["| part of the step | fitted cost | RMS residual |", "|---|---|---:|"]
    for label, (target, columns) in MODELS.items():
        coef, rms = regress(rows, target, columns)
        terms = ", ".join(f"{v:.2f} x {c}" if c.startswith("profiled") else f"{v * 1e6:.1f} us per {_UNITS[c]}"
                          for c, v in coef.items())
        lines.append(f"| {label} | {terms} | {rms * 1e6:.0f} us |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", required=True, help="an agreement_ranks.py JSON record (its placements)")
    parser.add_argument("--models", nargs="*", help="only these models (default: all in the record)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per rank (after 2 warm-up steps)")
    args = parser.parse_args(argv)
    import os

    import torch

    torch.set_num_threads(1)  # as worker.py does for a CPU rank
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    record = json.loads(Path(args.record).read_text())
    devs = record["devices"].split(",")
    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    for rec in record["models"]:
        if args.models and rec["model"] not in args.models:
            continue
        rows += measure_model(rec, devs, args.repeats)
    print(f"{len(rows)} rank-steps in {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.2f}")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
