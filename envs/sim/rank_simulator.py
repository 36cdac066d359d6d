"""The batch rank simulator (:class:`RankSimulator`): step times of many placements over ranks,
op-level dicts or rows of ranks over a grouping's groups, compiled once for a graph and a rank
cluster, with a calibration's scale, drawn late wake-ups and the lower bound.

It is the entry point of the callers that score many placements (the problem's rank path,
search, baselines, reports), and stands apart from the readable single-placement reference
(:func:`envs.sim.ranks.simulate_ranks`) whose rules and engine it shares.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.sim.rank_bound import _lower_bound
from envs.sim.rank_compile import _compile, _ranks_of
from envs.sim.rank_costs import RankCosts, RankSimError
from envs.sim.rank_loop import RankScale, _simulate
from envs.sim.rank_schedule import RankSchedule, runnable_times

__all__ = ["RankSimulator"]


class RankSimulator:
    """Step times of placements over ranks, compiled once for a graph and a rank cluster.

    The entry point for callers that score many placements (search, baselines, reports):
    placements may be op-level dicts, or rows of device indices over ``groups`` (the
    group names of a grouping, in row order) expanded through ``op_to_group`` (every op
    of a group on its group's rank) without building op dicts per row.

    Args:
        graph: the op-level placement graph (profiled on the cluster's device kinds).
        cluster: the rank cluster (devices in rank order, links between them).
        costs: the runtime's constants (default :class:`RankCosts`).
        leaves: tensors per value (see :func:`simulate_ranks`).
        op_to_group: ``{op: group}`` of the grouping whose rows :meth:`step_times_rows` takes.
    """

    def __init__(self, graph: nx.DiGraph, cluster: Cluster, costs: RankCosts | None = None,
                 leaves: Mapping[str, int] | None = None, op_to_group: Mapping[str, str] | None = None) -> None:
        self._c = _compile(graph, cluster, leaves)
        self.costs = costs or RankCosts()
        self.cluster = cluster
        self._ops = [n for n, d in graph.nodes(data=True) if d.get("op") != "placeholder"]
        self._op_to_group = dict(op_to_group) if op_to_group is not None else None
        self.scale: RankScale | None = None

    def scaled(self, rank_scale: Sequence[float], latency_scale: float = 1.0,
               bandwidth_scale: float = 1.0) -> RankSimulator:
        """A copy whose ranks' op times, link latency and bandwidth are multiplied by a
        calibration's factors (one per rank, in the cluster's device order); it shares the
        compiled graph and the cached per-placement programs.

        Raises:
            RankSimError: not one factor per rank, or a factor that is not a finite positive number.
        """
        factors = tuple(float(k) for k in rank_scale)
        every = (*factors, float(latency_scale), float(bandwidth_scale))
        if len(factors) != self.cluster.num_devices or not all(math.isfinite(k) and k > 0 for k in every):
            raise RankSimError(f"expected {self.cluster.num_devices} finite positive rank scales and link scales, "
                               f"got {factors}, {latency_scale}, {bandwidth_scale}")
        out = copy.copy(self)
        out.scale = RankScale(factors, float(latency_scale), float(bandwidth_scale))
        return out

    def simulate(self, placement: Mapping[str, str | int], trace: bool = True) -> RankSchedule:
        """One placement (``{op: device name or index}``), with its trace."""
        return _simulate(self._c, _ranks_of(placement, self.cluster), self.costs, trace, scale=self.scale)

    def lower_bound(self) -> float:
        """Seconds no placement can beat with these constants (:func:`rank_lower_bound`; with a
        calibration's scale, every rank as fast as the fastest)."""
        if self.scale is None:
            return _lower_bound(self._c, self.costs)
        return _lower_bound(self._c, replace(self.costs, op_scale=self.costs.op_scale * min(self.scale.ranks)))

    def step_times(self, placements: Sequence[Mapping[str, str | int]]) -> np.ndarray:
        """Step time (s) of each op-level placement; infinite where the runtime refuses its cut."""
        return runnable_times(self.schedules(placements))

    def schedules(self, placements: Sequence[Mapping[str, str | int]]) -> list[RankSchedule]:
        """The schedule (no trace) of each op-level placement (see :meth:`schedules_rows`)."""
        return [_simulate(self._c, _ranks_of(p, self.cluster), self.costs, False, scale=self.scale)
                for p in placements]

    def step_time_samples(self, placements: Sequence[Mapping[str, str | int]], draws: int,
                          seed: int = 0) -> np.ndarray:
        """Step times (s) with the late wake-ups drawn at random, ``(len(placements), draws)``.

        Each sleeping wait is late by ``late_s`` with probability ``late_p``, independently
        (R3); the rows' median is the simulator's median step. Their mean is close to the
        expected step of :meth:`step_times` but not equal: where two ranks' delays meet in a
        max (a wait for the later of two), the mean of the max exceeds the max of the means,
        and a late wait can change which later waits sleep.

        Raises:
            RankSimError: ``draws`` < 1, or as :meth:`simulate`.
        """
        if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
            raise RankSimError(f"draws must be an integer >= 1, got {draws!r}")
        rng = np.random.default_rng(seed)
        out = np.empty((len(placements), int(draws)))
        for i, p in enumerate(placements):
            ranks = _ranks_of(p, self.cluster)
            for k in range(int(draws)):
                out[i, k] = _simulate(self._c, ranks, self.costs, False, rng, self.scale).step_time
        return out

    def placement_of_row(self, row: np.ndarray | Sequence[int], groups: Sequence[str]) -> dict[str, int]:
        """The op-level placement (``{op: rank}``) of one row of ranks over ``groups``.

        Raises:
            RankSimError: as :meth:`step_times_rows`.
        """
        arr = np.asarray(row, dtype=np.int64).reshape(1, -1)
        return dict(zip(self._ops, arr[0, self._row_index(arr, groups)].tolist()))

    def _row_index(self, arr: np.ndarray, groups: Sequence[str]) -> np.ndarray:
        if self._op_to_group is None:
            raise RankSimError("step_times_rows needs the grouping's op_to_group (pass op_to_group=...)")
        if arr.ndim != 2 or arr.shape[1] != len(groups):
            raise RankSimError(f"rows must have shape (B, {len(groups)}), got {arr.shape}")
        col = {g: j for j, g in enumerate(groups)}
        missing = [op for op in self._ops if self._op_to_group.get(op) not in col]
        if missing:
            raise RankSimError(f"{len(missing)} op(s) have no group among the row's groups, e.g. {missing[:3]}")
        W = self.cluster.num_devices
        if arr.size and (arr.min() < 0 or arr.max() >= W):
            raise RankSimError(f"rows hold ranks outside [0, {W})")
        return np.array([col[self._op_to_group[op]] for op in self._ops], dtype=np.int64)

    def step_times_rows(self, rows: np.ndarray | Sequence[Sequence[int]], groups: Sequence[str]) -> np.ndarray:
        """Step time (s) of each row of rank indices over ``groups`` (``rows[b, j]`` = rank of
        ``groups[j]``); infinite where the runtime refuses its cut.

        Raises:
            RankSimError: as :meth:`schedules_rows`.
        """
        return runnable_times(self.schedules_rows(rows, groups))

    def schedules_rows(self, rows: np.ndarray | Sequence[Sequence[int]], groups: Sequence[str]) -> list[RankSchedule]:
        """The schedule (no trace) of each row of rank indices over ``groups``: its step time
        and its plan, whose ``refusal`` says why the runtime would refuse it.

        Raises:
            RankSimError: no ``op_to_group`` was given, a row of the wrong length, or an op
                whose group is not in ``groups``.
        """
        arr = np.asarray(rows, dtype=np.int64)
        idx = self._row_index(arr, groups)
        return [_simulate(self._c, dict(zip(self._ops, row[idx].tolist())), self.costs, False, scale=self.scale)
                for row in arr]
