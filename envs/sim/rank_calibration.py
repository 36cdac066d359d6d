"""Calibrating the rank simulator (:mod:`envs.sim.ranks`) from measured multi-process steps.

Two fits, used in turn by ``benchmarks/agreement_ranks.py``: :func:`fit_host_costs` regresses
the host thread's constants on each rank's measured CPU seconds per step (what a rank's thread
*does*, unaffected by waiting), then :func:`fit_rank_costs` / :func:`fit_rank_costs_many` fit
the rest (op-time scale, link latency, wake-ups) on the measured step times themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.sim.rank_compile import _compile, _ranks_of
from envs.sim.rank_costs import ZERO_COSTS, RankCosts, RankSimError
from envs.sim.rank_loop import _simulate
from envs.sim.rank_schedule import RankSchedule

__all__ = ["rank_counts", "fit_host_costs", "fit_rank_costs", "fit_rank_costs_many"]


def rank_counts(schedule: RankSchedule) -> list[dict[str, float]]:
    """Per rank, what its thread does in ``schedule`` (a traced one): profiled op seconds
    (unscaled: divide by the ``op_scale`` it ran with), stage calls (forward and backward),
    messages sent and received, whether it computes the loss."""
    out = []
    for r in range(schedule.plan.world_size):
        mine = [e for e in schedule.events if e.rank == r]
        out.append({
            "ops_s": sum(e.end - e.start for e in mine if e.kind in ("fwd", "bwd", "opt")),
            "stage_calls": float(sum(1 for e in mine if e.kind == "stage")),
            "sent": float(sum(1 for m in schedule.messages if m.src == r)),
            "received": float(sum(1 for m in schedule.messages if m.dst == r)),
            "loss": float(r == schedule.plan.output_rank),
        })
    return out


def fit_host_costs(cases: Sequence[tuple[nx.DiGraph, Sequence[Mapping[str, str | int]], Sequence[Sequence[float]],
                                         Mapping[str, int] | None]],
                   cluster: Cluster, start: RankCosts | None = None) -> RankCosts:
    """Host-thread constants from the CPU seconds each rank used per step (measured).

    A rank's CPU time per step (``time.process_time``, all its threads; the measurer
    reports it per rank) does not include waiting for a peer or for a core, so it measures
    what the rank's thread *does* even on a loaded machine. It is regressed (non-negative
    least squares, relative error) on :func:`rank_counts`:
    ``cpu = op_scale*ops + stage*calls + message*(sent + received) + loss_s*[loss] + step_s``.
    Sent and received counts are equal on a rank whenever every crossing value carries a
    gradient back (each message is answered by one the other way), so only their sum is
    identifiable: ``send_s = recv_s = message``.
    ``cases`` are ``(graph, placements, cpu seconds [placement][rank], leaves)``.
    Returns ``start`` (default :class:`RankCosts`) with those constants replaced
    (``stage_fwd_s = stage_bwd_s``: every stage makes one call of each, so they cannot be told apart).

    Raises:
        RankSimError: fewer rows than constants.
    """
    from scipy.optimize import nnls

    rows, target = [], []
    for graph, placements, cpu, leaves in cases:
        c = _compile(graph, cluster, leaves)
        for p, per_rank in zip(placements, cpu):
            sched = _simulate(c, _ranks_of(p, cluster), ZERO_COSTS, trace=True)
            for counts, seconds in zip(rank_counts(sched), per_rank):
                if seconds is None or not np.isfinite(seconds) or seconds <= 0:
                    continue
                rows.append([counts["ops_s"], counts["stage_calls"], counts["sent"] + counts["received"],
                             counts["loss"], 1.0])
                target.append(seconds)
    if len(rows) < 5:
        raise RankSimError(f"fit_host_costs needs at least 5 rank-steps with a CPU time, got {len(rows)}")
    X, y = np.array(rows), np.array(target)
    coef, _ = nnls(X / y[:, None], np.ones(len(y)))
    base = start or RankCosts()
    return replace(base, op_scale=float(coef[0]), stage_fwd_s=float(coef[1]), stage_bwd_s=float(coef[1]),
                   send_s=float(coef[2]), recv_s=float(coef[2]), loss_s=float(coef[3]), step_s=float(coef[4]))


def fit_rank_costs(graph: nx.DiGraph, placements: Sequence[Mapping[str, str | int]], measured: Sequence[float],
                   cluster: Cluster, start: RankCosts | None = None, leaves: Mapping[str, int] | None = None,
                   fixed: Sequence[str] = ("handoff_s", "late_s", "cold_s")) -> RankCosts:
    """The :class:`RankCosts` that best reproduce measured steps of ``placements`` (log least squares).

    Minimises ``sum (log simulated - log measured)^2`` plus a weak prior pulling each
    constant towards ``start`` (so a constant the placements cannot tell apart, e.g.
    ``stage_bwd_s`` when every placement has one stage, stays near its prior). The link
    latency is fitted too (``latency_s``), starting from the cluster's, at most 200 us.
    ``fixed`` names constants left at ``start`` (by default ``handoff_s``, ``late_s``, the
    measured tick, and ``cold_s``, the measured length of R3b's slowdown; ``wake_s`` and
    ``late_p`` only enter the expected step as
    ``wake_s + late_p * late_s``, so fix one of them to fit the other).

    Raises:
        RankSimError: fewer than 2 finite measurements, or lengths that differ.
    """
    return fit_rank_costs_many([(graph, placements, measured, leaves)], cluster, start, fixed)


def fit_rank_costs_many(cases: Sequence[tuple[nx.DiGraph, Sequence[Mapping[str, str | int]], Sequence[float],
                                              Mapping[str, int] | None]],
                        cluster: Cluster, start: RankCosts | None = None,
                        fixed: Sequence[str] = ("handoff_s", "late_s", "cold_s")) -> RankCosts:
    """:func:`fit_rank_costs` over several models at once: ``cases`` are ``(graph, placements,
    measured steps, leaves)``; one set of constants for all of them."""
    from scipy.optimize import least_squares

    compiled, targets = [], []
    for graph, placements, measured, leaves in cases:
        meas = np.asarray(measured, dtype=np.float64)
        if len(placements) != meas.size:
            raise RankSimError(f"got {len(placements)} placements and {meas.size} measured times; expected one each")
        ok = np.isfinite(meas) & (meas > 0)
        c = _compile(graph, cluster, leaves)
        compiled.append((c, [_ranks_of(p, cluster) for p, good in zip(placements, ok) if good]))
        targets.append(np.log(meas[ok]))
    target = np.concatenate(targets) if targets else np.zeros(0)
    if target.size < 2:
        raise RankSimError(f"calibration needs at least 2 finite measured steps, got {target.size}")
    base = start or RankCosts()
    if base.latency_s is None and "latency_s" not in fixed:
        lat = compiled[0][0].lat
        base = replace(base, latency_s=float(min(200e-6, np.min(lat[lat > 0], initial=200e-6))))
    names = [f.name for f in fields(RankCosts) if f.name not in fixed and getattr(base, f.name) is not None]
    # A late-wake-up probability or cold factor of 0 would stay 0 on the log scale: start them above it.
    x0 = np.array([max(getattr(base, n), {"late_p": 0.01, "cold_factor": 0.2}.get(n, 1e-7)) for n in names])
    prior_w = 0.1

    def costs_of(z: np.ndarray) -> RankCosts:
        got = {n: float(v) for n, v in zip(names, x0 * np.exp(z))}
        if "late_p" in got:
            got["late_p"] = min(got["late_p"], 1.0)
        return replace(base, **got)

    def residuals(z: np.ndarray) -> np.ndarray:
        k = costs_of(z)
        sim = np.array([_simulate(c, r, k, trace=False).step_time for c, rows in compiled for r in rows])
        return np.concatenate([np.log(sim) - target, prior_w * z])

    z = least_squares(residuals, np.zeros(len(names)), bounds=(-6.0, 6.0), diff_step=1e-3, max_nfev=60).x
    return costs_of(z)
