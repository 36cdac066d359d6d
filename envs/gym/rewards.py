"""The placement reward, and the reward models behind the environments' reward modes.

**Reward.** A valid placement with step time ``t`` earns ``-sqrt(t / t_ref)``, where
``t_ref`` is the step time of a reference placement (by default the fastest single-device
placement that fits): the reference itself earns -1, twice as fast earns -0.71. An invalid
placement (out of memory, failed or timed-out run, non-finite time) earns the fixed
``invalid_penalty``. Valid rewards are clipped at ``invalid_penalty + INVALID_MARGIN`` so
that every invalid placement scores strictly below every valid one, whatever the times.

The default penalty is ``-sqrt(max(t_serial / t_ref_sim, 4)) - INVALID_MARGIN``, where
``t_serial`` (:func:`serial_time_bound`) runs every op on its slowest device and every
transfer over the slowest link one after the other and ``t_ref_sim`` is the reference's
simulated time: no simulated schedule is slower than ``t_serial``, so in simulated mode the
clip never bites and the penalty sits just below the worst possible valid reward.
(Measured and calibrated times can exceed the bound; those are clipped.)

**Modes** (:func:`envs.gym.reward_modes.make_reward_model`):

* ``simulated``: :func:`envs.sim.simulator.simulate_batch`, one call per batch of placements.
* ``measured``: every placement is run for real through a *measurer* (an object with
  ``measure(placement dict) -> result(step_time, valid, reason)``), the reference too.
* ``hybrid``: simulated, with the best candidates measured now and then and the simulator
  recalibrated from the measurements.

The last two live in :mod:`envs.gym.measured_rewards`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.gym.config import EnvConfigError
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError

#: Gap between the invalid penalty and the lowest valid reward.
INVALID_MARGIN = 0.5

#: The default penalty leaves room for valid placements at least this many times slower
#: than the reference (reward -2) even when the serial bound is tighter.
MIN_WORST_RATIO = 4.0


# --------------------------------------------------------------------------- pure parts


def serial_time_bound(problem: PlacementProblem) -> float:
    """Seconds of a fully serial step: every op on its slowest device, every forward and
    gradient transfer over the slowest link, nothing overlapping. An upper bound on the
    simulated step time of any placement."""
    ops = problem.ops
    assert ops is not None  # PlacementProblem.__post_init__ always builds the op arrays
    host = ops.host  # the step's fixed host costs (envs.sim.cost_model.HostOverheads)
    compute = float((problem.fwd_time + problem.bwd_time).max(axis=1).sum())
    compute += host.loss_s + host.backward_call_s + host.step_s
    d = problem.num_devices
    if d < 2 or problem.num_edges == 0:
        return compute
    off = ~np.eye(d, dtype=bool)
    worst_latency = float(problem.latency[off].max())
    worst_bandwidth = float(problem.bandwidth[off].min())
    copies = 1.0 + problem.grad_edge.astype(np.float64)  # forward copy + gradient back
    transfers = float((copies * (host.copy_s + worst_latency + problem.edge_bytes / worst_bandwidth)).sum())
    return compute + transfers


def normalised_reward(step_time: np.ndarray, valid: np.ndarray, reference_time: float,
                      invalid_penalty: float) -> np.ndarray:
    """[B] rewards: ``-sqrt(t / t_ref)`` clipped at ``invalid_penalty + INVALID_MARGIN``
    for valid placements with a finite time, ``invalid_penalty`` for the rest."""
    t = np.asarray(step_time, dtype=np.float64)
    ok = np.asarray(valid, dtype=bool) & np.isfinite(t) & (t >= 0)
    raw = -np.sqrt(np.where(ok, t, 0.0) / reference_time)
    return np.where(ok, np.maximum(raw, invalid_penalty + INVALID_MARGIN), invalid_penalty)


@dataclass(frozen=True)
class Evaluation:
    """Rewards and figures of a batch of B placements.

    Attributes:
        placements: [B, N] int64 device index rows.
        step_time: [B] seconds (``inf`` for a failed measurement).
        peak_memory: [B, D] bytes (simulated estimate, also in measured mode).
        over_memory: [B, D] bytes over capacity (simulated), 0 where within.
        fits: [B] the placement fits in memory (simulated mode: the simulator says so;
            measured mode: the run did not fail).
        valid: [B] the reward is a time, not the invalid penalty.
        reward: [B].
        source: "simulated" or "measured" per placement.
        reason: why each invalid placement is invalid ("" when valid).
    """

    placements: np.ndarray
    step_time: np.ndarray
    peak_memory: np.ndarray
    over_memory: np.ndarray
    fits: np.ndarray
    valid: np.ndarray
    reward: np.ndarray
    source: tuple[str, ...]
    reason: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.step_time.shape[0])

    def info(self, b: int, problem: PlacementProblem, reference_time: float) -> dict[str, Any]:
        """The ``info`` dict of placement ``b`` (see docs/contracts.md)."""
        over = self.over_memory[b]
        return {
            "step_time": float(self.step_time[b]),
            "peak_memory": self.peak_memory[b].copy(),
            "fits": bool(self.fits[b]),
            "valid": bool(self.valid[b]),
            "source": self.source[b],
            "placement": self.placements[b].copy(),
            "over_memory": {problem.device_names[d]: float(over[d]) for d in np.flatnonzero(over > 0)},
            "reason": self.reason[b],
            "reference_time": reference_time,
        }


def _over_memory_reason(problem: PlacementProblem, over: np.ndarray) -> str:
    worst = int(np.argmax(over))
    return (f"out of memory on {int((over > 0).sum())} device(s), worst {problem.device_names[worst]!r} "
            f"by {over[worst] / 2**20:.1f} MiB")


def simulate_rows(problem: PlacementProblem, rows: np.ndarray):
    # Imported on first use: envs is importable (for gymnasium registration) without
    # loading the simulator and its JIT.
    from envs.sim.simulator import simulate_batch

    return simulate_batch(problem, rows)


# --------------------------------------------------------------------------- reward models


class RewardModel:
    """Turns batches of placements into rewards. Subclasses set :attr:`mode`.

    Attributes:
        problem: the problem the placements refer to.
        reference_time: ``t_ref`` in seconds.
        reference_placement: [N] row of the reference placement, or None when the
            reference was given as seconds.
        invalid_penalty: reward of an invalid placement.
        evaluated: number of placements evaluated so far.
    """

    mode = ""

    def __init__(self, problem: PlacementProblem, reference: Any = "single",
                 invalid_penalty: float | None = None) -> None:
        self.problem = problem
        self.evaluated = 0
        self._reference_spec = reference
        self.reference_time, self.reference_placement = self._resolve_reference(reference)
        self.sim_reference_time = self._sim_reference_time()
        self._user_penalty = invalid_penalty
        self.invalid_penalty = self._resolve_penalty(invalid_penalty)

    # -- reference and penalty

    def _reference_time_of(self, row: np.ndarray) -> float:
        """Seconds of one reference placement in this mode (simulated by default)."""
        res = simulate_rows(self.sim_problem, row[None])
        return float(res.step_time[0]) + self.sim_overhead

    @property
    def sim_problem(self) -> PlacementProblem:
        """The problem the simulator runs (the calibrated one in hybrid mode)."""
        return self.problem

    @property
    def sim_overhead(self) -> float:
        """Seconds added to every simulated step (a calibrated overhead in hybrid mode)."""
        return 0.0

    def single_device_order(self) -> list[int]:
        """Devices ordered by the simulated time of putting everything there, fitting ones first."""
        d = self.problem.num_devices
        rows = np.repeat(np.arange(d, dtype=np.int64)[:, None], self.problem.num_nodes, axis=1)
        res = simulate_rows(self.sim_problem, rows)
        return sorted(range(d), key=lambda i: (not bool(res.fits[i]), float(res.step_time[i]), i))

    def _resolve_reference(self, reference: Any) -> tuple[float, np.ndarray | None]:
        n = self.problem.num_nodes
        if isinstance(reference, str):
            if reference != "single":
                raise EnvConfigError(
                    f"unknown reference {reference!r}; expected 'single', a step time in seconds, "
                    "or a placement (dict node -> device, or an array of device indices)"
                )
            return self._single_reference()
        if isinstance(reference, (int, float, np.floating, np.integer)) and not isinstance(reference, bool):
            t = float(reference)
            if not (math.isfinite(t) and t > 0):
                raise EnvConfigError(f"reference step time must be positive seconds, got {reference!r}")
            return t, None
        try:
            if isinstance(reference, Mapping):
                row = self.problem.placement_to_array(reference)
            else:
                row = self.problem.check_array(np.asarray(reference))
                if row.ndim != 1:
                    raise EnvConfigError(f"reference placement must be one row of {n} device indices")
        except PlacerError as exc:
            raise EnvConfigError(f"bad reference placement: {exc}") from exc
        t = self._reference_time_of(row)
        if not (math.isfinite(t) and t > 0):
            raise EnvConfigError(f"the reference placement has no usable step time ({t}); pass another reference")
        return t, row

    def _single_reference(self) -> tuple[float, np.ndarray]:
        """The fastest fitting single-device placement (the fastest of all when none fits)."""
        best = self.single_device_order()[0]
        row = np.full(self.problem.num_nodes, best, dtype=np.int64)
        t = self._reference_time_of(row)
        if not (math.isfinite(t) and t > 0):
            raise EnvConfigError(
                f"the single-device reference on {self.problem.device_names[best]!r} has no usable step "
                f"time ({t}); pass reference= a step time in seconds or a placement"
            )
        return t, row

    def _sim_reference_time(self) -> float:
        """The reference's simulated seconds, which normalise :meth:`simulate`'s rewards (in
        measured mode the reference time itself is measured)."""
        if self.reference_placement is None:
            return self.reference_time
        res = simulate_rows(self.sim_problem, self.reference_placement[None])
        t = float(res.step_time[0]) + self.sim_overhead
        return t if math.isfinite(t) and t > 0 else self.reference_time

    def _resolve_penalty(self, invalid_penalty: float | None) -> float:
        if invalid_penalty is None:
            # The bound is a simulated time: compare it with the reference's simulated time (in
            # measured mode the measured ratio t / t_ref follows the simulated one, not the bound
            # itself). At least MIN_WORST_RATIO, so a few-times-slower run is never clipped.
            ratio = (serial_time_bound(self.sim_problem) + self.sim_overhead) / self.sim_reference_time
            return -math.sqrt(max(ratio, MIN_WORST_RATIO)) - INVALID_MARGIN
        p = float(invalid_penalty)
        # The reference (-1) must stay above the clip at penalty + margin.
        if not math.isfinite(p) or p >= -1.0 - INVALID_MARGIN:
            raise EnvConfigError(
                f"invalid_penalty must be a finite number below {-1.0 - INVALID_MARGIN} (the reference "
                f"placement earns -1), got {invalid_penalty!r}"
            )
        return p

    # -- evaluation

    def rewards(self, step_time: np.ndarray, valid: np.ndarray, simulated: bool = False) -> np.ndarray:
        """Normalised rewards for given times (no simulation); ``simulated`` normalises by the
        reference's simulated time instead of its time in this mode."""
        ref = self.sim_reference_time if simulated else self.reference_time
        return normalised_reward(step_time, valid, ref, self.invalid_penalty)

    def simulate(self, placements: np.ndarray) -> Evaluation:
        """Evaluate with the (possibly calibrated) simulator, whatever the mode."""
        rows = self.problem.check_array(np.atleast_2d(placements))
        res = simulate_rows(self.sim_problem, rows)
        step = res.step_time + self.sim_overhead
        fits = np.asarray(res.fits, dtype=bool)
        valid = fits & np.isfinite(step)
        refusal = res.refusal or (None,) * rows.shape[0]
        reasons = tuple("" if valid[b] else f"refused by the runtime: {refusal[b]}" if refusal[b] is not None
                        else _over_memory_reason(self.problem, res.over_memory[b])
                        if not fits[b] else "non-finite simulated step time" for b in range(rows.shape[0]))
        return Evaluation(rows, step, res.peak_memory, res.over_memory, fits, valid,
                          self.rewards(step, valid, simulated=True), ("simulated",) * rows.shape[0], reasons)

    def evaluate(self, placements: np.ndarray) -> Evaluation:
        """Rewards and figures for a batch of placements ([B, N] or [N]) in this mode."""
        ev = self._evaluate(self.problem.check_array(np.atleast_2d(placements)))
        self.evaluated += len(ev)
        return ev

    def _evaluate(self, rows: np.ndarray) -> Evaluation:
        raise NotImplementedError


class SimulatedReward(RewardModel):
    """Rewards from the batched simulator."""

    mode = "simulated"

    def _evaluate(self, rows: np.ndarray) -> Evaluation:
        return self.simulate(rows)
