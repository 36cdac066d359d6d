"""Pin each worker process of a multi-process CPU job to cores of its own.

Why: on this 2-core VM a gloo message between two 1-thread worker processes that the
scheduler may migrate was delivered more than 1 ms late 21-34% of the time, against
0-6.5% with each process pinned to its own core (``benchmarks/rank_wake.py``, the
ping-pong record in ``benchmarks/results/agreement_ranks.md``): a woken receiver waits,
runnable, until the scheduler moves it or the core it last ran on frees up, and those
late wake-ups make multi-process steps bimodal (the rank simulator's rule R3). Pinning is
what Intel's and PyTorch's CPU performance guides recommend for multi-process CPU
training (``numactl``/``taskset`` per rank). The worker ``l`` of a host (``LOCAL_RANK``,
else ``RANK``) with ``t`` threads gets the ``l``-th block of ``t`` of the cores this process
may run on; when the host's workers need more cores than there are, nothing is pinned
(stacking workers on a core is worse than letting the scheduler spread them).
``PLACER_PIN_WORKERS=0`` turns pinning off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)


def worker_cores(local_rank: int, local_world: int, threads: int, available: list[int]) -> tuple[int, ...] | None:
    """The cores of worker ``local_rank`` of ``local_world`` workers with ``threads`` threads
    each, out of ``available``; None when they do not all get cores of their own.

    >>> worker_cores(1, 2, 1, [0, 1])
    (1,)
    >>> worker_cores(1, 2, 2, [0, 1, 2, 3])
    (2, 3)
    >>> worker_cores(0, 4, 1, [0, 1]) is None
    True
    """
    if threads < 1 or local_world < 1 or not 0 <= local_rank < local_world:
        raise ValueError(f"worker {local_rank} of {local_world} with {threads} thread(s): expected "
                         "0 <= rank < world and threads >= 1")
    if local_world * threads > len(available):
        return None
    cores = sorted(available)
    return tuple(cores[local_rank * threads:(local_rank + 1) * threads])


def pin_worker(threads: int, environ: Mapping[str, str] | None = None) -> tuple[int, ...] | None:
    """Pin this worker process (rank from ``LOCAL_RANK``/``RANK``, host size from
    ``LOCAL_WORLD_SIZE``/``WORLD_SIZE``) to its cores (:func:`worker_cores`); returns them,
    or None when nothing was pinned (turned off, no room, or no ``sched_setaffinity``)."""
    env = os.environ if environ is None else environ
    if env.get("PLACER_PIN_WORKERS", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    rank = int(env.get("LOCAL_RANK", env.get("RANK", "0")))
    world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    cores = worker_cores(rank, world, threads, sorted(os.sched_getaffinity(0)))
    if cores is not None:
        os.sched_setaffinity(0, set(cores))
        log.debug("worker %d of %d pinned to cores %s", rank, world, cores)
    return cores
