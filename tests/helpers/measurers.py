"""A fake measurer: "measures" a placement by simulating a problem with slower devices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from envs.runtime.measurer import MeasureCache, MeasureResult
from envs.sim.simulator import simulate_batch


@dataclass
class FakeResult:
    """A measurer's result as a third-party measurer might return it (duck-typed)."""

    step_time: float
    valid: bool = True
    reason: str = ""


class ClosableFake:
    """What a measurer owes as a context manager (``close``, ``with``), for fakes that hold nothing."""

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeMeasurer(ClosableFake):
    """An :class:`envs.runtime.measurer.Measurer` that measures by simulating a problem whose
    devices are ``slowdown`` times slower, plus an overhead; placements putting anything on
    ``broken`` fail, and a call including one on ``raise_on`` raises. Results are cached as
    the protocol asks; ``calls`` lists every placement run, ``batches`` the size of every
    call that ran something."""

    def __init__(self, problem, slowdown=(1.0,), overhead=0.0, broken=None, raise_on=None):
        k = np.resize(np.asarray(slowdown, dtype=float), problem.num_devices)
        from envs.sim.calibration import scaled_problem

        self.truth = scaled_problem(problem, k)
        self.problem, self.overhead, self.broken, self.raise_on = problem, overhead, broken, raise_on
        self.calls, self.batches = [], []
        self.cache = MeasureCache()

    def measure(self, placements):
        keys = [self.cache.key(p) for p in placements]
        return self.cache.measure(keys, lambda todo: self._run([placements[i] for i in todo]))

    def _run(self, placements):
        self.batches.append(len(placements))
        return [self._one(p) for p in placements]

    def _one(self, placement):
        self.calls.append(dict(placement))
        if self.raise_on is not None and self.raise_on in placement.values():
            raise RuntimeError("worker died")
        if self.broken is not None and self.broken in placement.values():
            return MeasureResult(math.inf, valid=False, reason=f"CUDA out of memory on {self.broken}")
        row = self.problem.placement_to_array(placement)
        return MeasureResult(float(simulate_batch(self.truth, row[None]).step_time[0]) + self.overhead)


def fixed_links(devices, threads=1, repeats=9, timeout_s=120.0):
    """What :func:`envs.runtime.distributed.launcher.measure_links` returns, without starting
    worker processes to measure it: every pair of ``devices`` at 50 us and 1 GB/s."""
    names = devices.split(",") if isinstance(devices, str) else list(devices)
    return {(a, b): (50e-6, 1e9) for i, a in enumerate(names) for b in names[i + 1:]}
