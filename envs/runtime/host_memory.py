"""Running out of host memory as an error the caller can report, not a process the kernel kills.

Linux overcommits memory: a process that allocates more than the machine has free is not
refused, it is killed by the OOM killer once the pages are touched (SIGKILL: no exception, no
message, no chance to say what was kept). Measured here: ``placer optimize zoo:nmt --size
paper --cluster 4xK40`` on this 24 GB machine profiled for 19 minutes, searched for 2, and was
killed a minute into the winner's numerical check, which trains the model and the placed copy
side by side (peak resident 24.4 GB; 2026-12-06).

:func:`host_memory_limit` lowers the process's data-size limit (``RLIMIT_DATA``: its private
writable memory, which is where malloc's heap and its large blocks live) to what it uses now
plus the memory the machine reports available (``MemAvailable``), less a margin, for the
duration of a block. An allocation past that fails in the allocating call (torch:
``RuntimeError: ... DefaultCPUAllocator: can't allocate memory``; Python: ``MemoryError``),
while the machine still has memory to report it in. :func:`is_out_of_memory` recognises both.

The limit covers private writable mappings only, so it is meant for work on CPU devices: a
CUDA context maps memory of its own, and GPU memory has its own, catchable, errors.

Example::

    with host_memory_limit() as limit:
        try:
            train_two_copies()
        except Exception as exc:
            if is_out_of_memory(exc):
                ...  # say so; the process lives on
            raise
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: Of the memory the machine reports available, the share a limited block may take: the rest
#: stays for the other processes' growth and the page cache the kernel reclaims last.
AVAILABLE_SHARE = 0.9

__all__ = ["AVAILABLE_SHARE", "host_memory_limit", "is_out_of_memory", "available_bytes", "data_bytes"]


def _field_kib(path: str, name: str) -> int | None:
    """The ``name:`` line of a /proc file in bytes (its unit is kB), or None where unreadable."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int | None:
    """Memory the machine can give without swapping (``MemAvailable`` of /proc/meminfo), or None."""
    return _field_kib("/proc/meminfo", "MemAvailable")


def data_bytes() -> int | None:
    """This process's data size (``VmData`` of /proc/self/status: what ``RLIMIT_DATA`` limits), or None."""
    return _field_kib("/proc/self/status", "VmData")


@contextlib.contextmanager
def host_memory_limit(share: float = AVAILABLE_SHARE) -> Iterator[int | None]:
    """Within the block, allocations past the process's current data size plus ``share`` of the
    memory available now fail instead of waking the OOM killer (module doc). Yields the limit in
    bytes, or None where it cannot be set (no /proc, no ``resource`` module, a limit already
    lower): then the block runs as it would without it. The previous limit is restored after."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        yield None
        return
    free, used = available_bytes(), data_bytes()
    if free is None or used is None:
        yield None
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = used + int(free * share)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield None  # the process runs under a tighter limit already
        return
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (ValueError, OSError):
        yield None
        return
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed for want of memory (Python's or torch's CPU allocator).

    >>> is_out_of_memory(MemoryError()), is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    (True, True)
    >>> is_out_of_memory(RuntimeError("shape mismatch"))
    False
    """
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text)
