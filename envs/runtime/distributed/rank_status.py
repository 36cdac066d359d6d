"""What each rank is doing right now, so a hang is blamed on the rank that hung.

When one rank stops making progress (an endless loop, a stuck kernel, a stopped
process), its peers soon wait for it in a receive or a barrier, and the first to give up
reports a time-out — an innocent rank. Each rank therefore keeps a tiny status record in
``JOB_DIR/status-<rank>.bin`` (a memory-mapped file: one write per state change, no
system call): computing, waiting for a peer (which one) or in a barrier, with the task,
the step and when the state began. The launcher reads the records when a task times out
or a rank fails with a communication error, and names the rank that was computing while
the others waited (:func:`culprit`); it also watches them for progress (a record that
changed: a new step, a message received, a barrier passed), so a job is called hung only
when no rank has moved for a while, not merely when it runs long.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RankStatus", "Status", "read_status", "culprit", "STARTING", "COMPUTING", "WAITING", "BARRIER", "DONE"]

STARTING, COMPUTING, WAITING, BARRIER, DONE = range(5)
_NAMES = {STARTING: "starting (loading, capturing, connecting)", COMPUTING: "computing",
          WAITING: "waiting for a peer", BARRIER: "in a barrier", DONE: "done"}
# state, peer, task, step, since (time.monotonic: one clock for every process of the machine)
_FMT = "<iiiid"
_SIZE = struct.calcsize(_FMT)


def _path(job_dir: str | os.PathLike, rank: int) -> Path:
    return Path(job_dir) / f"status-{rank}.bin"


class RankStatus:
    """The writer, in the rank: ``status.set(COMPUTING)``, ``with status.waiting(peer): ...``."""

    def __init__(self, job_dir: str | os.PathLike, rank: int) -> None:
        path = _path(job_dir, rank)
        with open(path, "wb") as fh:
            fh.write(b"\0" * _SIZE)
        self._fh = open(path, "r+b")
        self._map = mmap.mmap(self._fh.fileno(), _SIZE)
        self.task = self.step = -1
        self.state, self.peer = STARTING, -1
        self.set(STARTING)

    def set(self, state: int, peer: int = -1) -> None:
        """Record ``state`` (and the peer waited for) from now on."""
        self.state, self.peer = state, peer
        struct.pack_into(_FMT, self._map, 0, state, peer, self.task, self.step, time.monotonic())

    def at(self, task: int, step: int) -> None:
        """Record the task and step being run (the state becomes computing)."""
        self.task, self.step = task, step
        self.set(COMPUTING)

    def waiting(self, peer: int = -1, barrier: bool = False) -> _Waiting:
        """A context in which this rank waits for ``peer`` (or all, in a barrier)."""
        return _Waiting(self, BARRIER if barrier else WAITING, peer)


class _Waiting:
    def __init__(self, status: RankStatus, state: int, peer: int) -> None:
        self.status, self.state, self.peer = status, state, peer

    def __enter__(self) -> None:
        self.before = (self.status.state, self.status.peer)
        self.status.set(self.state, self.peer)

    def __exit__(self, *exc: object) -> None:
        self.status.set(*self.before)


@dataclass(frozen=True)
class Status:
    """One rank's record as the launcher reads it."""

    rank: int
    state: int
    peer: int
    task: int
    step: int
    for_s: float
    #: When the state began (``time.monotonic()``): a record whose ``since`` changed has moved on.
    since: float = 0.0

    def progress_mark(self) -> tuple[int, int, int, int, float]:
        """What changes whenever the rank makes progress (any state change, a new step)."""
        return (self.state, self.peer, self.task, self.step, self.since)

    def describe(self) -> str:
        """E.g. ``computing (task 1, step 3) for 5.2s``."""
        what = _NAMES.get(self.state, f"state {self.state}")
        if self.state == WAITING and self.peer >= 0:
            what = f"waiting for rank {self.peer}"
        where = f" (task {self.task}, step {self.step})" if self.task >= 0 else ""
        return f"{what}{where} for {self.for_s:.1f}s"


def read_status(job_dir: str | os.PathLike, rank: int) -> Status | None:
    """The rank's latest record, or None when it has written none yet."""
    try:
        data = _path(job_dir, rank).read_bytes()
    except OSError:
        return None
    if len(data) < _SIZE:
        return None
    state, peer, task, step, since = struct.unpack_from(_FMT, data)
    if since == 0.0:
        return None
    return Status(rank, state, peer, task, step, max(0.0, time.monotonic() - since), since)


def culprit(statuses: Sequence[Status | None], alive: Sequence[bool]) -> int | None:
    """The rank a stalled job waits for, or None when the records do not tell.

    A rank that is computing (or still starting) while others wait is the one holding the
    job up; a waiting rank's own peer breaks ties; among several, the one in its state longest.
    """
    live = [s for s, a in zip(statuses, alive) if s is not None and a]
    busy = [s for s in live if s.state in (COMPUTING, STARTING)]
    if not busy:
        return None
    waited_for = {s.peer for s in live if s.state == WAITING}
    named = [s for s in busy if s.rank in waited_for]
    pool = named or busy
    return max(pool, key=lambda s: s.for_s).rank
