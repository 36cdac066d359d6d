"""The CPU allocator of a process that profiles or trains a placement: freed memory stays in its heap.

PyTorch allocates CPU tensors with the C library's ``malloc`` (``c10::alloc_cpu``). glibc
hands large blocks out as fresh mappings (above ``M_MMAP_THRESHOLD``, which starts at 128 KiB
and rises as such blocks are freed, up to 32 MiB) and gives the top of its heap back to the
kernel once more than ``M_TRIM_THRESHOLD`` of it is free. A training step frees its gradients
(``zero_grad(set_to_none=True)``) and activations and allocates them again the next step, so
with these defaults every step can fault in zeroed pages anew, paid in kernel time.

Measured here (2026-12-06 13:20-13:45 UTC, glibc 2.36, 2 cores, 1 thread, torch 2.13, fresh
processes alternating; rerun with ``benchmarks/bench_cpu_allocator.py``):

- the second stage of ResNet-50's two-stage pipeline (layer 4 and the head, 19.5M parameters,
  micro-batch of 8): a forward and backward took 120.6 ms, 26.0 ms of it in the kernel over
  17,888 minor page faults; retaining freed memory, 98-100 ms and no fault. The op profile had
  held the user time alone, so the simulator put that stage 20% under what it cost, and the
  partitioner's split ran unevenly;
- one ResNet-50 training step (batch 32, one process): 914 / 949 / 920 ms with glibc's defaults,
  855 / 843 / 856 ms retaining; counted over steady steps only (after 3 warm-up steps), 34,000-38,000
  page faults and 52-57 ms of kernel time per step with the defaults against 850-1,700 and 2-3 ms
  retaining (918 / 920 against 870 / 904 ms in that rerun);
- GPT-2 (width 384, batch 256): 4,049 / 4,076 against 4,135 / 4,233 ms in two rounds, no change
  beyond the machine's noise; a steady-state rerun 4,407 against 3,966 ms, 41,000 against 29,000
  faults per step (what is left comes from its blocks above 32 MiB, which stay mapped per use).

:func:`retain_freed_memory` fixes both thresholds (``mallopt``), so freed blocks up to 32 MiB
stay in the heap and are reused. The process then keeps its peak heap for its lifetime, as
PyTorch's CUDA caching allocator keeps device memory; its peak resident memory did not grow
(ResNet-50 1,207 / 1,206 MiB, GPT-2 2,766 / 2,543 MiB, defaults / retaining, ``ru_maxrss``),
and the simulator's memory model (peak per device) is unchanged. Every placer process that
times ops or runs a training step calls it: the profiler
(:func:`graphs.profile.op_timing.worker_conditions`), the measurement, rank, pipeline and DDP
workers and ``placer apply``'s steps in its own process, so the profile and the run see the
same allocator; a user's own training loop can call it too (``placer.retain_freed_memory``).
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

log = logging.getLogger(__name__)

#: glibc's largest mmap threshold on 64-bit (``HEAP_MAX_SIZE / 2``); larger blocks stay mapped per use.
MMAP_THRESHOLD = 32 << 20
#: The largest value ``mallopt`` takes (a C ``int``): in effect, never trim the heap.
TRIM_THRESHOLD = 2**31 - 1
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Keep memory freed by this process in its heap for reuse (module doc); idempotent.

    Returns True where the C library is glibc and took both settings, False elsewhere (the
    process keeps its allocator's defaults).

    >>> retain_freed_memory() in (True, False)
    True
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("C library %s: the allocator keeps its defaults", platform.libc_ver()[0] or "unknown")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                    TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable (%s): the allocator keeps its defaults", exc)
        return False
    if not done:
        log.debug("mallopt refused the thresholds: the allocator keeps its defaults")
    return done
