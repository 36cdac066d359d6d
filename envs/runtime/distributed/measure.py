"""Measured step time of placements through the multi-process runtime.

The protocol is :mod:`envs.runtime.measure`'s (warm-up steps, then the median of timed steps,
each candidate bounded by a time-out, results cached by placement hash), but a step is
a distributed one: every rank runs its stages of the split placement, and a timed step
starts and ends with a barrier, so it lasts as long as the slowest rank.

Many placements are measured in one job (start-up with the torch import is seconds per
worker). A placement whose run fails — a worker that dies, hangs or cannot connect —
gets an invalid :class:`~envs.runtime.measure.MeasureResult` with the reason; every worker of
that job is killed, and the remaining placements go to a fresh job.

Example::

    m = DistributedMeasurer("zoo:rnnlm", {"size": "small"}, "cpu:0,cpu:1")
    [r] = m.measure_many([{node: "cpu:0" for node in names}])
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from envs.hardware.rank_devices import parse_rank_devices
from envs.runtime.distributed.launcher import run_job
from envs.runtime.measure import MeasureError, MeasureResult, placement_hash

__all__ = ["DistributedMeasurer"]


class DistributedMeasurer:
    """Measures placements over rank devices (``cpu:0,cpu:1``) with real worker processes.

    Args:
        model_source: model file path or ``"zoo:<name>"`` (workers load the code from it).
        model_args: model file keyword arguments (``{"size": "small"}``).
        devices: the rank device list; placements name these devices.
        warmup, repeats: untimed and timed steps per placement.
        timeout_s: limit for one placement's steps; ``load_timeout_s`` for start-up.
        threads: torch threads per CPU worker.
        spec: an already loaded ModelSpec of the same source (its weights/inputs are shipped).
        fingerprint: the model fingerprint (workers check they captured the same model).
        captured: ``spec``'s CapturedModel, if the caller has one (else captured once, here).
    """

    def __init__(
        self,
        model_source: str,
        model_args: Mapping[str, Any] | None,
        devices: str | Sequence[str],
        warmup: int = 2,
        repeats: int = 5,
        timeout_s: float = 300.0,
        load_timeout_s: float = 300.0,
        threads: int = 1,
        spec: Any = None,
        fingerprint: str | None = None,
        captured: Any = None,
    ) -> None:
        if warmup < 0 or repeats < 1:
            raise MeasureError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
        if timeout_s <= 0 or load_timeout_s <= 0:
            raise MeasureError(f"time-outs must be positive, got timeout_s={timeout_s}, load_timeout_s={load_timeout_s}")
        if not isinstance(model_source, str):
            raise MeasureError(
                f"distributed measurement loads the model in every worker, so it needs a model file path or "
                f"'zoo:<name>', got {type(model_source).__name__}"
            )
        self.model_source, self.model_args = model_source, dict(model_args or {})
        self.devices = parse_rank_devices(devices)
        self.rank_of = {d.name: d.rank for d in self.devices}
        self.warmup, self.repeats = int(warmup), int(repeats)
        self.timeout_s, self.load_timeout_s = float(timeout_s), float(load_timeout_s)
        self.threads = int(threads)
        self._spec, self.fingerprint = spec, fingerprint
        self._captured = captured
        self._cache: dict[str, MeasureResult] = {}
        #: By placement hash: per-rank figures of the timed steps (messages and bytes sent,
        #: seconds blocked in receives) and the plan's shape — why a placement is slow.
        self.details: dict[str, dict[str, Any]] = {}
        self.jobs = 0

    @property
    def spec(self) -> Any:
        if self._spec is None:
            from graphs.pipeline import load_source

            self._spec = load_source(self.model_source, self.model_args)
        return self._spec

    @property
    def captured(self) -> Any:
        """The captured model whose tensors and value shapes every job ships."""
        if self._captured is None:
            from graphs.capture import capture

            spec = self.spec
            self._captured = capture(spec.model, spec.example_inputs, name=spec.name)
        return self._captured

    def _ranks(self, placement: Mapping[str, str]) -> dict[str, int]:
        unknown = sorted({d for d in placement.values() if d not in self.rank_of})
        if unknown:
            raise MeasureError(
                f"placement uses device(s) {unknown} that are not among the workers {list(self.rank_of)}"
            )
        return {n: self.rank_of[d] for n, d in placement.items()}

    def _key(self, placement: Mapping[str, str]) -> str:
        return placement_hash(placement, self.fingerprint or "", {
            "devices": [d.name for d in self.devices], "threads": self.threads,
            "warmup": self.warmup, "repeats": self.repeats, "runtime": "distributed"})

    def measure(self, placement: Mapping[str, str]) -> MeasureResult:
        """Measure one placement (node → device name); never raises for a failed run."""
        return self.measure_many([placement])[0]

    def measure_many(self, placements: Sequence[Mapping[str, str]]) -> list[MeasureResult]:
        """Measure several placements, in as few jobs as failures allow.

        Raises:
            MeasureError: a placement names a device that is not a worker.
        """
        items = [{str(k): str(v) for k, v in p.items()} for p in placements]
        ranks = [self._ranks(p) for p in items]
        keys = [self._key(p) for p in items]
        results: list[MeasureResult | None] = [
            MeasureResult(**{**self._cache[k].__dict__, "cached": True}) if k in self._cache else None for k in keys
        ]
        note = f"{len(self.devices)} worker processes ({self.threads} thread(s) each), torch.distributed"
        while True:
            pending = [i for i, r in enumerate(results) if r is None]
            if not pending:
                break
            tasks = [{"kind": "measure", "ranks": ranks[i], "warmup": self.warmup, "repeats": self.repeats}
                     for i in pending]
            self.jobs += 1
            out = run_job(self.spec, self.model_source, [d.name for d in self.devices], tasks,
                          model_args=self.model_args, threads=self.threads, timeout_s=self.timeout_s,
                          load_timeout_s=self.load_timeout_s, fingerprint=self.fingerprint,
                          captured=self.captured)
            for j, i in enumerate(pending):
                per_rank = out.results[j]
                if per_rank is not None:
                    # A step lasts as long as its slowest rank (the barriers make them equal).
                    times = tuple(max(r["times"][s] for r in per_rank) for s in range(self.repeats))
                    res = MeasureResult(step_time=float(statistics.median(times)), times=times,
                                        note=note, placement_hash=keys[i])
                    self.details[keys[i]] = {
                        "plan": per_rank[0].get("describe", ""),
                        **{k: [r.get(k) for r in per_rank]
                           for k in ("messages_sent", "bytes_sent", "recv_wait_s", "cpu_s")},
                    }
                elif j == out.failed_task:
                    res = MeasureResult(step_time=float("inf"), valid=False, reason=out.error,
                                        note=note, placement_hash=keys[i])
                else:
                    continue  # not reached because an earlier placement failed: next job
                results[i] = res
                self._cache[keys[i]] = res
            if out.failed_task is None and any(results[i] is None for i in pending):
                raise MeasureError("internal error: a job ended without results or a failure")  # pragma: no cover
        return [r for r in results if r is not None]
