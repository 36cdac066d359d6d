"""What every measurer is: the :class:`Measurer` protocol, its result, and its one cache.

A measurer runs placements for real and reports their step times. Two implement the
protocol: :class:`envs.runtime.measure.SingleProcessMeasurer` (one worker process placing
ops on this machine's devices, ``cpu,cuda:0``) and
:class:`envs.runtime.distributed.measure.DistributedMeasurer` (one worker per rank,
``cpu:0,cpu:1``). The reward models (:mod:`envs.gym.measured_rewards`) and ``placer``
call them only through the protocol.

Protocol, as every implementation keeps it:

* ``measure(placements)`` → one :class:`MeasureResult` per placement, in order; it never
  raises for a run that fails (out of memory, a crash, a time-out): that is an invalid
  result with its ``reason``. It raises :class:`MeasureError` (a
  :class:`~graphs.errors.PlacerError`) for a bad request only.
* Results are cached (:class:`MeasureCache`): a placement measured once is not run again
  while the model, the devices and the protocol settings stay the same; a repeat comes
  back with ``cached=True``.
* ``close()`` stops whatever processes the measurer keeps; a measurer is a context manager.
* Optionally ``ignored_nodes``: the nodes whose device does not change the program the
  measurer runs (the distributed runtime holds the model inputs on every rank). Two
  placements that differ only there are one program: :func:`program_key` says so, and the
  cache, the hybrid rounds and the final confirmation measure it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Protocol, runtime_checkable

from graphs.errors import PlacerError

__all__ = ["Measurer", "MeasureResult", "MeasureError", "MeasureCache", "placement_hash", "program_key",
           "check_timing"]


class MeasureError(PlacerError):
    """The model cannot be measured at all (its file does not load or capture), or a bad request."""


@dataclass(frozen=True)
class MeasureResult:
    """The measured step time of one placement.

    Attributes:
        step_time: median of ``times`` in seconds; ``inf`` when invalid.
        times: the timed (post-warm-up) steps, seconds.
        valid: False when the run went out of memory, crashed, failed or timed out.
        reason: why it is invalid ("" when valid).
        source: always ``"measured"`` (the simulator says ``"simulated"``).
        note: caveats, e.g. virtual devices sharing one real device (no parallelism).
        parallel: False when several placed devices are one real device.
        peak_memory: peak CUDA bytes allocated per real device (empty on CPU).
        placement_hash: the cache key.
        cached: True when this result came from the cache.
        budget_cut: the run was cut short, or never started, because the caller's deadline
            (its time budget) came first: it says nothing about the placement, so it is
            not cached.
    """

    step_time: float
    times: tuple[float, ...] = ()
    valid: bool = True
    reason: str = ""
    source: str = "measured"
    note: str = ""
    parallel: bool = True
    peak_memory: Mapping[str, int] = field(default_factory=dict)
    placement_hash: str = ""
    cached: bool = False
    budget_cut: bool = False


def placement_hash(assignment: Mapping[str, str], fingerprint: str,
                   extra: Mapping[str, object] | None = None) -> str:
    """A stable SHA-256 of the sorted assignment, the model fingerprint and ``extra`` settings."""
    doc = {"fingerprint": fingerprint, "assignment": sorted(assignment.items()), "extra": extra or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def check_timing(warmup: int, repeats: int, min_timed_s: float, max_repeats: int) -> None:
    """Refuse a measurer's step-timing settings that cannot run, saying what was expected.

    Raises:
        MeasureError: ``warmup < 0``, ``repeats < 1``, ``min_timed_s < 0`` (or NaN) or
            ``max_repeats < repeats``.
    """
    if warmup < 0 or repeats < 1:
        raise MeasureError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if not min_timed_s >= 0 or max_repeats < repeats:
        raise MeasureError(f"need min_timed_s >= 0 and max_repeats >= repeats, got min_timed_s={min_timed_s}, "
                           f"max_repeats={max_repeats}, repeats={repeats}")


def program_key(measurer: object, placement: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What decides the program ``measurer`` runs for ``placement``: the placement without the
    measurer's ``ignored_nodes`` (none when it has no such attribute), as a sorted tuple.

    Placements with equal keys run the same program, so one measurement stands for all.
    On two ranks, placements that move only the ``labels`` input were measured apart at
    805 and 1,180 ms (a disturbed run, 2026-12-06) and 778.9 and 779.1 ms (a quiet one),
    the simulator giving each pair one time: a round of four spent two runs on twins.

    >>> class Ranks:
    ...     ignored_nodes = frozenset({"x"})
    >>> program_key(Ranks(), {"x": "cpu:1", "fc": "cpu:0"}) == program_key(Ranks(), {"x": "cpu:0", "fc": "cpu:0"})
    True
    """
    ignored = getattr(measurer, "ignored_nodes", frozenset())
    return tuple(sorted((str(n), str(d)) for n, d in placement.items() if n not in ignored))


class MeasureCache:
    """Measured results by placement hash + model fingerprint + device set + protocol.

    Args:
        devices: what the placement's device names run on (sorted into the key).
        protocol: the settings that change a step time (warm-up, repeats, threads, runtime).
    """

    def __init__(self, devices: Mapping[str, str] | Sequence[str] = (),
                 protocol: Mapping[str, object] | None = None) -> None:
        self.fingerprint = ""
        self.devices = dict(devices) if isinstance(devices, Mapping) else sorted(devices)
        self.protocol = dict(protocol or {})
        self._results: dict[str, MeasureResult] = {}

    def __len__(self) -> int:
        return len(self._results)

    def set_fingerprint(self, fingerprint: str) -> None:
        """The model measured; a different model drops every result (they describe another model)."""
        if self.fingerprint and fingerprint != self.fingerprint:
            self._results.clear()
        self.fingerprint = fingerprint

    def clear(self) -> None:
        """Forget every result (e.g. to measure again on a machine whose load changed)."""
        self._results.clear()

    def key(self, placement: Mapping[str, str], **extra: object) -> str:
        """The cache key of ``placement`` (``extra``: per-call settings, e.g. the output device)."""
        return placement_hash(placement, self.fingerprint,
                              {"devices": self.devices, **self.protocol, **extra})

    def get(self, key: str) -> MeasureResult | None:
        """The cached result (marked ``cached=True``), or None."""
        hit = self._results.get(key)
        return None if hit is None else replace(hit, cached=True)

    def put(self, key: str, result: MeasureResult) -> None:
        """Keep ``result`` under ``key`` (not one cut by a deadline: it may run another time)."""
        if not result.budget_cut:
            self._results[key] = replace(result, placement_hash=key, cached=False)

    def measure(self, keys: Sequence[str],
                run: Callable[[list[int]], list[MeasureResult]]) -> list[MeasureResult]:
        """Results for ``keys``: cached ones as they are, the others from ``run(indices)``.

        ``run`` gets the indices of the first occurrence of every key not cached (a repeat
        within one call runs once) and returns their results in that order.
        """
        out: list[MeasureResult | None] = [self.get(k) for k in keys]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if out[i] is None:
                first.setdefault(k, i)
        if first:
            todo = list(first.values())
            fresh = run(todo)
            if len(fresh) != len(todo):
                raise MeasureError(f"internal error: {len(fresh)} results for {len(todo)} placements")
            for i, res in zip(todo, fresh):
                self.put(keys[i], res)
                out[i] = replace(res, placement_hash=keys[i], cached=False)
            for i, k in enumerate(keys):
                if out[i] is None:
                    out[i] = self.get(k) or out[first[k]]
        return [r for r in out if r is not None]


@runtime_checkable
class Measurer(Protocol):
    """Runs placements (``{node: device}``) for real; see the module docstring for the contract."""

    def measure(self, placements: Sequence[Mapping[str, str]]) -> list[MeasureResult]:
        """One result per placement, in order; failed runs are invalid results, never exceptions."""
        ...

    def close(self) -> None:
        """Stop the measurer's worker processes, if any."""
        ...

    def __enter__(self) -> Measurer: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
