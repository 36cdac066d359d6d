"""The multi-process runtime's constants, as the rank simulator (:mod:`envs.sim.ranks`) charges
them: host costs per stage call, message and step, the op-time scale and the wake-up rules
(R2-R3b in that module's docstring), calibrated by :mod:`envs.sim.rank_calibration`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from graphs.errors import PlacerError

__all__ = ["RankSimError", "RankCosts", "ZERO_COSTS"]


class RankSimError(PlacerError, ValueError):
    """Bad input to the rank simulator (unknown device, unplaced node, bad constant)."""


@dataclass(frozen=True)
class RankCosts:
    """The runtime's constants (seconds; ``op_scale`` a factor).

    Defaults: calibrated on this machine (2-core VM shared with other jobs, torch 2.13 CPU,
    gloo on loopback, 2026-12-05) by ``benchmarks/agreement_ranks.py`` over 6 zoo models x
    19-24 placements (fit halves), against each placement's fastest measured step
    (benchmarks/results/agreement_ranks.md): the host constants from each rank's CPU
    seconds per step (:func:`envs.sim.rank_calibration.fit_host_costs`), the op scale and wake-up from the steps.
    ``late_p`` alone comes from the quiet runs' *mean* steps (R3's expected step; the
    fastest step has no late wake-up); the quiet runs' full constant sets, per statistic,
    are in the results file. The link latency defaults to the cluster's (``latency_s=None``).
    """

    op_scale: float = 0.86
    stage_fwd_s: float = 208e-6
    stage_bwd_s: float = 208e-6
    send_s: float = 91e-6
    recv_s: float = 91e-6
    handoff_s: float = 3e-6
    loss_s: float = 164e-6
    step_s: float = 165e-6
    #: Paid by a thread that had to sleep for a message (the wait found it not yet landed):
    #: the condition-variable wake-up and the wait for a core (R3).
    wake_s: float = 1.5e-6
    #: Probability that a sleeping wait is woken ``late_s`` late (R3, late wake-ups): fitted
    #: on the mean steps of the quiet runs (0.56% on the 15-repeat run, 0.67% on three runs
    #: pooled; benchmarks/results/agreement_ranks.md), i.e. ~21 us per sleeping wait on average.
    late_p: float = 0.006
    #: How late a late wake-up is (about one scheduler tick; the quiet runs' slow-mode jump).
    late_s: float = 3.5e-3
    #: R3b: after a thread slept in a wait, its next ``cold_s`` of op time runs
    #: ``1 + cold_factor`` times slower. Fitted on the mean steps of two 40-repeat quiet runs
    #: (0.124 and 0.265, with ``cold_s`` held at the 20 ms that ``benchmarks/rank_cold.py``
    #: measures): their mean. Any value in 0.1-0.35 gave the same held-out ranking.
    cold_factor: float = 0.19
    cold_s: float = 0.02
    #: When set, the one-way latency of every link (seconds) instead of the cluster's: the
    #: median ping-pong taken while other processes hold the cores read 10x high (measured
    #: here: 51 us at load 0.9, 2.0 ms at load 2.3), so the latency is fitted with the rest.
    #: (The cluster's figure is now the fastest of the round trips, which stays at 31-134 us
    #: under that load: ``envs.runtime.distributed.worker._ping_pong``.)
    latency_s: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "latency_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise RankSimError(f"RankCosts.{f.name} must be a finite number >= 0, got {v!r}")
        if self.late_p > 1:
            raise RankSimError(f"RankCosts.late_p is a probability, expected a number in [0, 1], got {self.late_p!r}")

    @property
    def expected_wake_s(self) -> float:
        """What a sleeping wait costs on average: the wake-up plus the expected late wake-up (R3)."""
        return self.wake_s + self.late_p * self.late_s

    def to_dict(self) -> dict[str, float | None]:
        """The constants by name."""
        return {f.name: None if getattr(self, f.name) is None else float(getattr(self, f.name)) for f in fields(self)}


#: No host cost at all and op times as profiled: the baseline a fit adds constants to
#: (:func:`envs.sim.rank_calibration.fit_host_costs`), and what GPU devices pay in the pipeline simulator.
ZERO_COSTS = RankCosts(op_scale=1.0, stage_fwd_s=0.0, stage_bwd_s=0.0, send_s=0.0, recv_s=0.0, handoff_s=0.0,
                       loss_s=0.0, step_s=0.0, wake_s=0.0, late_p=0.0, cold_factor=0.0)
