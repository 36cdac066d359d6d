"""A fake measurer: "measures" a placement by simulating a problem with slower devices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from envs.sim.simulator import simulate_batch


@dataclass
class FakeResult:
    step_time: float
    valid: bool = True
    reason: str = ""


class FakeMeasurer:
    """Measures by simulating a problem whose devices are ``slowdown`` times slower, plus an overhead;
    placements putting anything on ``broken`` device fail."""

    def __init__(self, problem, slowdown=(1.0,), overhead=0.0, broken=None, raise_on=None):
        k = np.resize(np.asarray(slowdown, dtype=float), problem.num_devices)
        from envs.sim.calibration import scaled_problem

        self.truth = scaled_problem(problem, k)
        self.problem, self.overhead, self.broken, self.raise_on = problem, overhead, broken, raise_on
        self.calls = []

    def measure(self, placement):
        self.calls.append(dict(placement))
        if self.raise_on is not None and self.raise_on in placement.values():
            raise RuntimeError("worker died")
        if self.broken is not None and self.broken in placement.values():
            return FakeResult(math.inf, False, f"CUDA out of memory on {self.broken}")
        row = self.problem.placement_to_array(placement)
        return FakeResult(float(simulate_batch(self.truth, row[None]).step_time[0]) + self.overhead)
