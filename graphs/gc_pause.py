"""Pausing Python's cyclic garbage collector around bulk work on large graphs.

Deep-copying, applying and running a graph of tens of thousands of fx nodes allocates
millions of container objects. The collector runs every 700 net allocations and walks
the young generation, and from time to time everything: with the ~1.2 M objects an
``optimize`` run holds, the numerical check of a 50,000-op graph spent 3.7-9.6 s in 520+
collections against 0.2-0.5 s paused (``benchmarks/bench_check_gc.py``; issue 18 reported
197 s of a 314 s run on its machine). Reference counting still frees everything that is
not in a cycle; cycles made meanwhile are collected once the collector is back.

Timed training steps need the other half of the same remedy (:func:`frozen_gc`): the
collector keeps running, but what existed before the timing is frozen out of its walks.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["frozen_gc", "paused_gc"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic collector, and freeze what exists, until the block ends (see the module doc).

    Nested use is safe: an inner block leaves the collector disabled when it found it so.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect once, then keep every object alive now out of the collector's walks until the block ends.

    Why the measurement needs it: a collection of the oldest generation walks every tracked
    object, and a process with torch, a captured model and torch.distributed tracks 0.3-1 M
    of them, so one takes 75-85 ms in a plain process here and 130-245 ms in a rank of a
    two-process job. It falls at a step fixed by the allocation history: in the recorded
    agreement runs, the same placement stalled 127-193 ms at the same timed step in both of
    its fresh jobs (rnnlm #22 at step 8 and moe #15 at step 23 of run 10; nmt #23, gpt2 #14 and
    moe #14 of run 11), against a 5-16 ms median step. That collection belongs to a process's
    start-up, not to its steady state (it comes when the objects made since the last one
    exceed a quarter of the old ones, which a training loop's steps rarely do), so timed steps
    freeze what exists (``gc.freeze``, after one ``gc.collect`` so no garbage is kept): the
    young generations are still collected (cycles a step makes are freed as in a training
    run, so peak memory is unchanged) and an old-generation walk covers only what the timed
    steps made (0.0 ms measured for 310 k frozen objects). ``timeit`` turns the collector off
    for the same reason.

    Example:
        >>> import gc
        >>> with frozen_gc():
        ...     gc.get_freeze_count() > 0
        True
        >>> gc.get_freeze_count()
        0
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
