"""Whether processes are still running, for tests that kill a parent and watch its workers."""

from __future__ import annotations

import time
from collections.abc import Iterable


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids: Iterable[int], timeout_s: float) -> bool:
    """Poll until every process in ``pids`` is gone or ``timeout_s`` passes; True when all are gone."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
        time.sleep(0.1)
    return all(process_gone(p) for p in pids)
