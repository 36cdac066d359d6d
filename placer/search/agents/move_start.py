"""Where the move policy starts: its own first placement of a graph, before any seed or search.

:func:`start_row` is where the ``moves`` agent's search starts without seeds and where its
second walker starts beside the incumbent (:mod:`placer.search.agents.moves`), and where
:mod:`placer.search.agents.pretrain` walks local search from; :func:`first_placement` is what
the policy's weights alone make of a graph from there (one batch of proposals, nothing
learned: ``benchmarks/bench_pretrained.py``). Kept apart from the agent, so pretraining and the
benchmarks use them without the search loop, and from the policy, which needs no start.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from envs.sim.problem import PlacementProblem
from placer.search.agents.move_features import feature_statics, move_features
from placer.search.agents.move_policy import MovePolicy


def start_row(problem: PlacementProblem) -> np.ndarray:
    """Where the policy starts without seeds: every group on the device that computes the whole
    graph fastest among those whose memory holds it; when none does, consecutive groups (in
    topological order) over the devices in proportion to their memory."""
    st = feature_statics(problem)
    n, d = problem.num_nodes, problem.num_devices
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    need = float(st.static_mem.sum())
    totals = st.cost.sum(axis=0)
    fits = np.flatnonzero(cap >= need)
    if len(fits):
        return np.full(n, int(fits[np.argmin(totals[fits])]), dtype=np.int64)
    bounds = np.cumsum(cap) / cap.sum() * need
    filled = np.cumsum(st.static_mem)
    return np.minimum(np.searchsorted(bounds, filled), d - 1).astype(np.int64)


def first_placement(policy: MovePolicy, problem: PlacementProblem,
                    evaluate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], batch: int = 256,
                    seed: int = 0) -> tuple[np.ndarray, float, bool]:
    """The policy's first placement of ``problem``, before any search: ``(row, step time, fits)``.

    One forward pass of the network scores every move from :func:`start_row`; ``batch``
    proposals drawn from those scores are evaluated in one batched call of ``evaluate``
    (rows [B, N] -> step times [B], fits [B]) and the best is returned (the start itself when
    no proposal beats it). Nothing is learned: this is what the weights know.
    """
    st = feature_statics(problem)
    row = start_row(problem)
    with torch.no_grad():
        rows, _, _ = policy.propose(problem, st, row, move_features(problem, row, static=st), int(batch),
                                    np.random.default_rng(seed))
    rows = np.concatenate([row[None], rows])
    t, ok = evaluate(rows)
    t, ok = np.asarray(t, dtype=np.float64), np.asarray(ok, dtype=bool)
    j = int(np.argmin(np.where(ok, t, np.inf))) if ok.any() else 0
    return rows[j], float(t[j]), bool(ok[j])
