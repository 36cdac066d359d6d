"""The one step timer of measurement: warm-up steps, then timed, synchronised steps.

Used by the single-process measure worker (:mod:`envs.runtime.measure_worker`) and by
every rank of a multi-process job (:mod:`envs.runtime.distributed.worker`). The caller
reports the median of the returned times (:func:`median_step_time`).

Why synchronise on both sides of a step: CUDA kernels run asynchronously, so the clock may
only be read once every device used is idle (``torch.cuda.synchronize``); across ranks a
step lasts until the slowest rank is done, so each timed step starts and ends with a
barrier and every rank reads the same interval.

Why the timed steps run under :func:`graphs.gc_pause.frozen_gc`: a collection of Python's
oldest generation walks every object of the process (130-245 ms in a rank here) and lands on
a step fixed by the start-up's allocations, the same step in every fresh job of a placement;
it is start-up, not the steady state the simulator predicts (see that function).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphs.gc_pause import frozen_gc

__all__ = ["StepTimes", "time_steps", "median_step_time"]


@dataclass(frozen=True)
class StepTimes:
    """Timed steps: wall seconds per step and this process's CPU seconds over all of them."""

    times: tuple[float, ...]
    cpu_s: float


def time_steps(step: Callable[[], object], warmup: int, repeats: int,
               sync: Callable[[], object] = lambda: None,
               on_timing: Callable[[], object] = lambda: None,
               min_timed_s: float = 0.0, max_repeats: int | None = None,
               agree: Callable[[float], float] = lambda s: s) -> StepTimes:
    """Run ``warmup`` untimed then ``repeats`` timed calls of ``step``, ``sync()`` around each.

    Args:
        step: one full training step (forward, loss, backward, optimizer step).
        sync: waits until the step's work is really done (device synchronise, barrier).
        on_timing: called once, just before the first timed step (e.g. to reset counters).
            The timed steps run with the collector's older objects frozen (module doc).
        min_timed_s: with warm-up steps, time as many steps as fill this many seconds at
            the median warm-up step (:func:`repeats_for`: ``repeats`` at least,
            ``max_repeats`` at most); 0: exactly ``repeats``.
        agree: turns this process's median warm-up step into the one every process of a
            job uses (the slowest rank's, for ranks that step in lockstep).

    Returns:
        The timed steps' wall times (seconds) and the process CPU time of the timed steps.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    warm: list[float] = []
    for _ in range(warmup):
        sync()
        start = time.perf_counter()
        step()
        sync()
        warm.append(time.perf_counter() - start)
    if min_timed_s > 0 and warm:
        repeats = repeats_for(agree(median_step_time(warm)), repeats, min_timed_s,
                              repeats if max_repeats is None else max_repeats)
    times: list[float] = []
    cpu = 0.0
    with frozen_gc():
        on_timing()
        for _ in range(repeats):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            sync()
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
    return StepTimes(tuple(times), cpu)


#: A measured placement's timed steps fill at least this many seconds (:func:`repeats_for`).
#: rnnlm's ~3 ms step on cpu:0,cpu:1, timed 5 times, measured one placement 8.4% apart in two
#: runs (median over 4 placements, 29.5% at most; optimize --reward measured, 2026-12-06);
#: timed for 0.5 s, 1.0% (2.0% at most). A late wake-up by a 4 ms scheduler tick is longer
#: than that step.
MIN_TIMED_S = 0.5
#: ... and are at most this many.
MAX_REPEATS = 200


def repeats_for(step_s: float, repeats: int, min_timed_s: float, max_repeats: int) -> int:
    """How many timed steps to run: at least ``repeats``, enough to fill ``min_timed_s`` at
    ``step_s`` per step (a warm-up step's time), at most ``max_repeats`` (never below ``repeats``).

    A fixed count times a 3 ms step over 15 ms, where one late wake-up of a sleeping rank (a
    4 ms scheduler tick) moves the median; a budget in seconds, as ``timeit``'s autorange does,
    gives every placement a comparable sample.

    >>> repeats_for(0.003, 5, 0.5, 200), repeats_for(0.8, 5, 0.5, 200), repeats_for(1e-5, 5, 0.5, 200)
    (167, 5, 200)
    """
    if not (step_s > 0 and min_timed_s > 0):
        return repeats
    return max(repeats, min(max_repeats, math.ceil(min_timed_s / step_s)))


def median_step_time(times: Sequence[float]) -> float:
    """The reported step time: the median of the timed steps (robust to one slow outlier)."""
    return float(statistics.median(times))
