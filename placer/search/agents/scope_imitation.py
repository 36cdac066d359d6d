"""Imitation for the scope scorer: which whole-module moves paid, at the states local search visits.

The move policy's first move may take one of its group's module scopes with it
(:mod:`placer.search.move_scopes`); a small linear scorer decides between the single move and
each scope (:func:`~placer.search.agents.move_policy.scope_scores`). The imitation that trains the
shipped move scorer (:mod:`placer.search.agents.pretrain`) only simulates single moves, so on its
own it leaves that scorer at its starting weights. Here, at each state of the same local-search
walks, a few first moves are drawn (the state's improving single moves first, then others of
groups that have scopes) and every option of each (single, or each scope of its group moved to
the same device) is simulated; the options that shortened the step become the target, each in
proportion to its gain, as for single moves. :func:`fit_scope_scorer` then fits the scorer by
cross-entropy, reading the move scorer's logits from the weights already fitted, which is what
it sees in a search.

>>> ScopeExamples().placements
0
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.agents.move_features import FeatureStatics
from placer.search.move_scopes import MoveScopes

if TYPE_CHECKING:
    from placer.search.agents.move_policy import MovePolicy

log = logging.getLogger(__name__)

#: First moves whose scope options are simulated at each state.
FIRST_MOVES = 12


@dataclass
class ScopeState:
    """One visited placement and the first moves whose options were simulated there.

    Attributes:
        scopes: the problem's scopes.  features: [N * D, F] move features at ``row``.
        row: [N] the placement.  first: [B] first moves (group * D + device).
        targets: [B, 1 + K] each option's share of the move's total gain (column 0 single).
    """

    scopes: MoveScopes
    features: np.ndarray
    row: np.ndarray
    first: np.ndarray
    targets: np.ndarray


@dataclass
class ScopeExamples:
    """The states of :func:`scope_examples` and the placements simulated to make them."""

    states: list[ScopeState] = field(default_factory=list)
    placements: int = 0


def scope_examples(problem: PlacementProblem, st: FeatureStatics, row: np.ndarray, step_time: float,
                   features: np.ndarray, improving: np.ndarray, rng: np.random.Generator,
                   out: ScopeExamples, first_moves: int = FIRST_MOVES) -> None:
    """Simulate the scope options of a few first moves at ``row`` and record those that paid.

    ``improving`` [M] are the state's improving single moves (group * D + device, best first);
    they are taken first, the rest of the ``first_moves`` drawn uniformly from the moves of
    groups that have scopes. A first move none of whose options shortens ``step_time`` (a fitting
    placement's) teaches nothing and is dropped.
    """
    from envs.sim.simulator import simulate_batch

    scopes = st.scopes
    if scopes is None:
        return
    n, d = problem.num_nodes, problem.num_devices
    has = np.diff(scopes.node_ptr) > 0
    pool = np.flatnonzero(np.repeat(has, d) & ((np.arange(n * d) % d) != np.repeat(row, d)))
    chosen = [int(m) for m in improving if has[m // d]][:first_moves]
    rest = np.setdiff1d(pool, chosen)
    if len(chosen) < first_moves and len(rest):
        chosen += rng.choice(rest, size=min(first_moves - len(chosen), len(rest)), replace=False).tolist()
    if not chosen:
        return
    first = np.array(chosen, dtype=np.int64)
    cand = scopes.of_nodes(first // d)
    rows, slots = [], []
    for b, m in enumerate(first):
        single = row.copy()
        single[m // d] = m % d
        rows.append(single)
        slots.append((b, 0))
        for k, s in enumerate(cand[b]):
            if s >= 0:
                moved = row.copy()
                moved[scopes.members[s]] = m % d
                rows.append(moved)
                slots.append((b, 1 + k))
    ev = simulate_batch(problem, np.stack(rows))
    out.placements += len(rows)
    gain = np.zeros((len(first), 1 + cand.shape[1]))
    for (b, k), t, ok in zip(slots, np.asarray(ev.step_time, dtype=np.float64), np.asarray(ev.fits, dtype=bool)):
        gain[b, k] = max(0.0, (step_time - t) / max(step_time, 1e-30)) if ok else 0.0
    keep = gain.sum(axis=1) > 0
    if keep.any():
        targets = gain[keep] / gain[keep].sum(axis=1, keepdims=True)
        out.states.append(ScopeState(scopes, features.astype(np.float32), row.copy(), first[keep],
                                     targets.astype(np.float32)))


def fit_scope_scorer(policy: MovePolicy, examples: ScopeExamples, epochs: int = 40, lr: float = 1e-2,
                     seed: int = 0) -> None:
    """Fit ``policy``'s scope scorer (in place) to the options that paid in ``examples``: the
    cross-entropy between each first move's gain shares and the scorer's softmax over its options.
    The move scorer is read, not trained: its logits are the scope features' first column."""
    import torch

    from placer.search.agents.move_policy import scope_scores

    if not examples.states:
        return
    net = policy.net
    with torch.no_grad():
        raws = [net(torch.from_numpy(s.features)) for s in examples.states]
    optim = torch.optim.Adam(net.scope.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for epoch in range(int(epochs)):
        total = 0.0
        for i in rng.permutation(len(examples.states)).tolist():
            s = examples.states[i]
            n, d = len(s.row), raws[i].numel() // len(s.row)
            score, _ = scope_scores(net, s.scopes, raws[i], s.row, s.first, n, d)
            target = torch.from_numpy(s.targets)
            loss = -(target * torch.log_softmax(score, dim=1)).sum(dim=1).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += float(loss.detach())
        log.info("scope imitation epoch %d: cross-entropy %.4f over %d states", epoch,
                 total / len(examples.states), len(examples.states))
