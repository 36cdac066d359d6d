"""The one step timer of measurement: warm-up steps, then timed, synchronised steps.

Used by the single-process measure worker (:mod:`envs.runtime.measure_worker`) and by
every rank of a multi-process job (:mod:`envs.runtime.distributed.worker`). The caller
reports the median of the returned times (:func:`median_step_time`).

Why synchronise on both sides of a step: CUDA kernels run asynchronously, so the clock may
only be read once every device used is idle (``torch.cuda.synchronize``); across ranks a
step lasts until the slowest rank is done, so each timed step starts and ends with a
barrier and every rank reads the same interval.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["StepTimes", "time_steps", "median_step_time"]


@dataclass(frozen=True)
class StepTimes:
    """Timed steps: wall seconds per step and this process's CPU seconds over all of them."""

    times: tuple[float, ...]
    cpu_s: float


def time_steps(step: Callable[[], object], warmup: int, repeats: int,
               sync: Callable[[], object] = lambda: None,
               on_timing: Callable[[], object] = lambda: None) -> StepTimes:
    """Run ``warmup`` untimed then ``repeats`` timed calls of ``step``, ``sync()`` around each.

    Args:
        step: one full training step (forward, loss, backward, optimizer step).
        sync: waits until the step's work is really done (device synchronise, barrier).
        on_timing: called once, just before the first timed step (e.g. to reset counters).

    Returns:
        The ``repeats`` wall times (seconds) and the process CPU time of the timed steps.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    times: list[float] = []
    cpu = 0.0
    for i in range(warmup + repeats):
        if i == warmup:
            on_timing()
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
    return StepTimes(tuple(times), cpu)


def median_step_time(times: Sequence[float]) -> float:
    """The reported step time: the median of the timed steps (robust to one slow outlier)."""
    return float(statistics.median(times))
