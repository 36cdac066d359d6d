"""One rank of a pipeline or DDP job (``envs.runtime.pipeline.worker.run_rank``, unchanged)
under ``torch.profiler(profile_memory=True)``, for ``benchmarks/bench_memory_ranks.py``.

The optimizer the worker builds is wrapped so that each step's window is marked from just
after ``zero_grad`` to just after ``step``: the window of
:func:`graphs.saved_activations.measure_step_peak`. The allocator's events are replayed in
time order; the level counts every byte allocated since profiling began and not yet freed.
Writes ``JOB_DIR/memory-<rank>.json``: the last step's peak level ("in step") and the
process's peak over the whole job ("whole run": loading the job, the boundary probe, the
result).

Usage (as a rank, with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set):
``python benchmarks/memory_rank_worker.py JOB_DIR``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import envs.runtime.pipeline.worker as rank_worker

_build_optimizer = rank_worker.make_optimizer


def _marked_optimizer(spec: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    opt = _build_optimizer(spec, params)
    if opt is None:  # nothing to update on this rank: no step to mark
        return None
    zero_grad, step = opt.zero_grad, opt.step
    count = [0]

    def marked_zero_grad(set_to_none: bool = True) -> None:
        zero_grad(set_to_none=set_to_none)
        with record_function(f"STEP_BEGIN_{count[0]}"):
            pass

    def marked_step(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        with record_function(f"STEP_END_{count[0]}"):
            pass
        count[0] += 1
        return out

    opt.zero_grad, opt.step = marked_zero_grad, marked_step  # type: ignore[method-assign]
    return opt


def replay(events: list[tuple[int, int, str]]) -> dict[str, float]:
    """``(time ns, bytes, marker)`` events (bytes < 0 frees; a marker has 0 bytes) -> the last
    step's peak level and the whole run's peak."""
    level = whole = 0
    steps: dict[int, float] = {}
    current: int | None = None
    for _, nbytes, marker in sorted(events):
        if marker.startswith("STEP_BEGIN_"):
            current = int(marker.rsplit("_", 1)[1])
            steps[current] = level
        elif marker.startswith("STEP_END_"):
            current = None
        level += nbytes
        whole = max(whole, level)
        if current is not None:
            steps[current] = max(steps[current], level)
    return {"in_step": float(steps[max(steps)]) if steps else 0.0, "whole_run": float(whole)}


def main() -> None:
    job_dir = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rank_worker.make_optimizer = _marked_optimizer  # type: ignore[assignment]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rank_worker.run_rank(job_dir, rank, world)
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            events.append((e.start_ns(), e.nbytes(), ""))
        elif e.name().startswith("STEP_"):
            events.append((e.start_ns(), 0, e.name()))
    (job_dir / f"memory-{rank}.json").write_text(json.dumps(replay(events)))


if __name__ == "__main__":
    main()
