"""Batched local search around the best placement: the improvement phase of a search.

Learning agents and heuristics find good placements; placement tools then polish the best
one by local search (the "refinement" of graph partitioners, the moves of Baechi-style
memory-aware placers).  Here every neighbourhood is scored by the batched simulator in one
call, so a full scan of a 200-group placement on 5 devices (800 single moves plus the
edge moves and swaps, ~2,000 rows) costs a few milliseconds of simulation.

The search is an iterated local search on the incumbent (the tracker's best, whoever found
it — heuristic seed, policy sample or this phase):

* **scan**: the neighbourhood of the current point — every single-node move to another
  device, every move of both endpoints of an edge to one device (which crosses the barrier
  of a transfer that a single move cannot), and every swap of the devices of an edge's two
  ends (which keeps the load per device) — in a seeded random order, evaluated in
  chunks of ``chunk`` rows; the best improving neighbour becomes the current point
  (best-improvement within a chunk, so each chunk can move);
* **kick**: when a whole scan finds nothing better (a local optimum), restart from the
  incumbent with ``k`` random nodes moved to random devices, ``k`` growing with every
  failed kick and reset on success.

Every evaluated placement goes through the env's reward model and the tracker, so it counts
against the budget, can be the reported best (with ``phase = "local_search"``), and a seed
fixes the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.device_symmetry import device_classes, twin_targets
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError
from placer.search.move_scopes import MoveScopes
from placer.search.tracker import BestTracker, StopSearch

PHASE = "local_search"


def _scope_moves(scopes: MoveScopes, row: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """(scope [K], device [K]) of every move of a whole scope to a device not all its members are on."""
    s_idx, s_dev = np.nonzero(scopes.members_on(row, num_devices) < scopes.sizes[:, None])
    return s_idx.astype(np.int64), s_dev.astype(np.int64)


class LocalSearchError(PlacerError, ValueError):
    """Local-search settings that cannot work."""


def neighbourhood(problem: PlacementProblem, row: np.ndarray,
                  classes: Sequence[Sequence[int]] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All moves around ``row`` [N] as ``(nodes [K, 2], devices [K, 2])`` plus the edge list.

    Move k puts node ``nodes[k, 0]`` on ``devices[k, 0]`` and node ``nodes[k, 1]`` on
    ``devices[k, 1]``: a single-node move (both columns equal), a move of both ends of an edge
    to one device, or a swap of the devices of an edge's two ends.  Moves that change
    nothing, or that equal a single move, are left out; so are, with ``classes`` (of
    interchangeable devices, :func:`envs.sim.device_symmetry.device_classes`), moves to an
    unused device whose twin moves to the first unused one of its class
    (:func:`envs.sim.device_symmetry.twin_targets`).  Returns the moves and the problem's
    edges [E, 2].
    """
    n, d = problem.num_nodes, problem.num_devices
    row = np.asarray(row, dtype=np.int64)
    twin = twin_targets(row, classes, d)
    node = np.repeat(np.arange(n), d)
    dev = np.tile(np.arange(d), n)
    keep = (dev != row[node]) & ~twin[dev]
    parts_nodes = [np.stack([node[keep], node[keep]], axis=1)]
    parts_devs = [np.stack([dev[keep], dev[keep]], axis=1)]
    edges = _edges(problem)
    if len(edges):
        e_idx = np.repeat(np.arange(len(edges)), d)
        e_dev = np.tile(np.arange(d), len(edges))
        u, v = edges[e_idx, 0], edges[e_idx, 1]
        # Both ends to one device; when one end is already there it is a single move.
        keep = (row[u] != e_dev) & (row[v] != e_dev) & ~twin[e_dev]
        parts_nodes.append(np.stack([u[keep], v[keep]], axis=1))
        parts_devs.append(np.stack([e_dev[keep], e_dev[keep]], axis=1))
        # Swaps across the edges whose ends sit on different devices.
        u, v = edges[:, 0], edges[:, 1]
        keep = row[u] != row[v]
        parts_nodes.append(np.stack([u[keep], v[keep]], axis=1))
        parts_devs.append(np.stack([row[v][keep], row[u][keep]], axis=1))
    return np.concatenate(parts_nodes), np.concatenate(parts_devs), edges


def _edges(problem: PlacementProblem) -> np.ndarray:
    """[E, 2] (src, dst) node indices of the problem's edges."""
    src = np.asarray(problem.edge_src, dtype=np.int64)
    dst = np.asarray(problem.edge_dst, dtype=np.int64)
    return np.stack([src, dst], axis=1) if len(src) else np.zeros((0, 2), dtype=np.int64)


def apply_moves(row: np.ndarray, nodes: np.ndarray, devices: np.ndarray) -> np.ndarray:
    """Rows [K, N]: ``row`` with move k (``nodes[k]`` to ``devices[k]``) applied to row k."""
    out = np.repeat(np.asarray(row, dtype=np.int64)[None], len(devices), axis=0)
    k = np.arange(len(devices))
    out[k, nodes[:, 0]] = devices[:, 0]
    out[k, nodes[:, 1]] = devices[:, 1]
    return out


@dataclass
class LocalSearchStats:
    """What the improvement phase did (for the search result).

    Attributes:
        evaluated: placements it evaluated.
        improvements: times it lowered the incumbent's step time.
        scans: complete neighbourhood scans without an improving move (local optima met).
        kicks: perturbation restarts.
    """

    evaluated: int = 0
    improvements: int = 0
    scans: int = 0
    kicks: int = 0


class LocalSearch:
    """Iterated batched local search on a tracker's incumbent (see the module docstring).

    Args:
        problem: the problem (its edges define the pair moves).
        evaluate: ``rows [K, N] -> (step_time [K], valid [K])`` — the env's batched evaluation.
        tracker: receives every evaluated batch (budget, best, phase).
        rng: draws the scan order and the kicks (the search hands down a seeded generator).
        chunk: rows per simulator call.
        max_kick: the most nodes a kick moves (default: a tenth of the nodes, at least 2).
        share: the fraction of all evaluations this phase gets when interleaved with a policy
            (:meth:`after_policy_batch`).  It is a share of evaluations, not of time: a
            neighbour costs one simulator row, a policy sample a network pass as well.
    """

    def __init__(self, problem: PlacementProblem, evaluate, tracker: BestTracker, rng: np.random.Generator,
                 chunk: int = 1024, max_kick: int | None = None, share: float = 0.5,
                 scopes: MoveScopes | None = None) -> None:
        if not 0.0 < float(share) < 1.0:
            raise LocalSearchError(f"the local-search share of evaluations must be in (0, 1), got {share!r}")
        self.share = float(share)
        self._policy_evaluated = 0
        self.problem = problem
        self.evaluate = evaluate
        self.tracker = tracker
        self.rng = rng
        self.chunk = max(1, int(chunk))
        self.max_kick = max(2, problem.num_nodes // 10) if max_kick is None else max(1, int(max_kick))
        self.scopes = scopes if scopes is not None and scopes.num_scopes else None
        # Interchangeable devices: a move to a second unused one of a class is a twin, not scanned.
        self.classes = device_classes(problem)
        self.stats = LocalSearchStats()
        self._current: np.ndarray | None = None
        self._current_key: tuple[bool, float] = (True, np.inf)
        self._moves: tuple[np.ndarray, np.ndarray] | None = None
        self._pos = 0
        self._kick = 1
        self._pending_kick = False
        self._seen: tuple[bool, float] | None = None  # the incumbent's key when last followed

    # ------------------------------------------------------------------ driving
    def after_policy_batch(self, batch: int, next_batch: int) -> None:
        """Called after the policy evaluated ``batch`` placements: evaluate this phase's share.

        When the evaluation budget could not take another policy batch of ``next_batch``
        after this phase's share, this phase uses all that is left.  Raises
        :class:`StopSearch` like :meth:`BestTracker.record`.
        """
        self._policy_evaluated += int(batch)
        want = self.share / (1.0 - self.share) * self._policy_evaluated - self.stats.evaluated
        todo = max(int(round(want)), 0)
        left = self.tracker.remaining_placements()
        if left is not None and left - todo < next_batch:
            todo = left
        if todo > 0:
            self.run(todo, next_batch)

    def run(self, placements: int, next_batch: int = 1) -> None:
        """Evaluate ``placements`` more placements (fewer if the budget ends first).

        ``next_batch`` is what the caller evaluates next (the policy's batch): the last
        chunk passes it to the tracker so the search stops cleanly when it no longer fits.
        Raises :class:`StopSearch` like :meth:`BestTracker.record`.
        """
        todo = int(placements)
        left = self.tracker.remaining_placements()
        if left is not None:
            todo = min(todo, left)
        while todo > 0 and self.tracker.best_row is not None:
            self._follow_incumbent()
            rows = self._next_rows(min(todo, self.chunk))
            todo -= len(rows)
            self._evaluate(rows, next_batch if todo <= 0 else 1)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _key(valid: bool, step_time: float) -> tuple[bool, float]:
        """Sort key of a placement: fitting before not fitting, then faster first."""
        return (not valid, float(step_time))

    def _incumbent_key(self) -> tuple[bool, float]:
        return self._key(self.tracker.best_fits, self.tracker.best_step_time)

    def _follow_incumbent(self) -> None:
        """Recentre on the incumbent whenever it improved (whoever found it) since last seen."""
        key = self._incumbent_key()
        if self.tracker.best_row is None:
            return
        if self._seen is None or key < self._seen:
            self._seen = key
            self._set_current(self.tracker.best_row, key)
            self._kick = 1

    def _set_current(self, row: np.ndarray, key: tuple[bool, float]) -> None:
        """Make ``row`` the centre of a fresh scan (moves in a new seeded order)."""
        self._current = np.array(row, dtype=np.int64, copy=True)
        self._current_key = key
        nodes, devs, _ = neighbourhood(self.problem, self._current, self.classes)
        if self.scopes is not None:
            # Scope moves as rows past the pair moves: node -1 - s means "every member of scope s".
            s_idx, s_dev = _scope_moves(self.scopes, self._current, self.problem.num_devices)
            keep = ~twin_targets(self._current, self.classes, self.problem.num_devices)[s_dev]
            s_idx, s_dev = s_idx[keep], s_dev[keep]
            nodes = np.concatenate([nodes, np.stack([-1 - s_idx, -1 - s_idx], axis=1)])
            devs = np.concatenate([devs, np.stack([s_dev, s_dev], axis=1)])
        order = self.rng.permutation(len(devs))
        self._moves = (nodes[order], devs[order])
        self._pos = 0

    def _next_rows(self, size: int) -> np.ndarray:
        """The next chunk of the scan; when the scan is exhausted, one kicked placement."""
        assert self._moves is not None and self._current is not None
        nodes, devs = self._moves
        if self._pos >= len(devs):
            self.stats.scans += 1
            return self._kicked_row()
        end = min(self._pos + size, len(devs))
        part_nodes, part_devs = nodes[self._pos:end], devs[self._pos:end]
        scoped = part_nodes[:, 0] < 0
        rows = apply_moves(self._current, np.where(scoped[:, None], 0, part_nodes),
                           np.where(scoped[:, None], self._current[0], part_devs))
        if self.scopes is not None:
            for k in np.flatnonzero(scoped):
                rows[k, self.scopes.members[-1 - int(part_nodes[k, 0])]] = part_devs[k, 0]
        self._pos = end
        return rows

    def _kicked_row(self) -> np.ndarray:
        """The incumbent with ``k`` random nodes moved to random other devices, as [1, N]."""
        self.stats.kicks += 1
        base = np.array(self.tracker.best_row, dtype=np.int64, copy=True)
        n, d = self.problem.num_nodes, self.problem.num_devices
        k = min(self._kick, self.max_kick, n)
        nodes = self.rng.choice(n, size=k, replace=False)
        if d > 1:
            base[nodes] = (base[nodes] + self.rng.integers(1, d, size=k)) % d
        self._kick = self._kick + 1 if self._kick < self.max_kick else 1
        self._pending_kick = True
        return base[None]

    def _evaluate(self, rows: np.ndarray, next_batch: int) -> None:
        step_time, valid = self.evaluate(rows)
        step_time = np.asarray(step_time, dtype=np.float64).reshape(-1)
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        before = self._incumbent_key()
        keys = np.where(valid, step_time, np.inf)
        i = int(np.argmin(keys)) if valid.any() else int(np.argmin(step_time))
        best_key = self._key(bool(valid[i]), float(step_time[i]))
        if self._pending_kick:
            # The kicked point becomes the centre whatever its time: the descent from it is
            # what may reach a better optimum than the incumbent's.
            self._pending_kick = False
            self._set_current(rows[0], best_key)
        elif best_key < self._current_key:
            self._set_current(rows[i], best_key)  # best improvement within the chunk
        self.stats.evaluated += len(rows)
        try:
            self.tracker.record(rows, step_time, valid, next_batch=next_batch, phase=PHASE)
        finally:
            if self._incumbent_key() < before:
                self.stats.improvements += 1
                self._seen = self._incumbent_key()
                self._kick = 1


__all__ = ["LocalSearch", "LocalSearchError", "LocalSearchStats", "PHASE", "StopSearch", "apply_moves", "neighbourhood"]
