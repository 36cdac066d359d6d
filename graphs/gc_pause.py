"""Pausing Python's cyclic garbage collector around bulk work on large graphs.

Deep-copying, applying and running a graph of tens of thousands of fx nodes allocates
millions of container objects. The collector runs every 700 net allocations and walks
the young generation, and from time to time everything: with the ~1.2 M objects an
``optimize`` run holds, the numerical check of a 50,000-op graph spent 3.7-9.6 s in 520+
collections against 0.2-0.5 s paused (``benchmarks/bench_check_gc.py``; issue 18 reported
197 s of a 314 s run on its machine). Reference counting still frees everything that is
not in a cycle; cycles made meanwhile are collected once the collector is back.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused_gc"]


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
