"""The move policy: proposals of one to a few coordinated moves around a placement, and what scores them.

:class:`MovePolicy` is what the ``moves`` agent (:mod:`placer.search.agents.moves`) samples
and trains during a search, what :mod:`placer.search.agents.pretrain` trains across graphs for
the package to ship, and whose scope scorer :mod:`placer.search.agents.scope_imitation`
trains; it lives apart from the agent's search loop so that those use it without the loop.

From a current placement it proposes a batch of *moves*: each proposal relocates one to
``max_moves`` groups, the first drawn from a softmax over every (group, device) pair, each
further one drawn from the same scores plus learned terms that couple it to the moves already
made (a neighbour of a moved group following it to its new device, or taking its old one; a
group filling the device a move freed). Local search's neighbourhood is single moves and the
moves of an edge's two ends; a proposal here can move two groups that share no edge, or three.
The first move may also take a whole **module scope** of its group with it
(:mod:`~placer.search.move_scopes`: the group's module subtree, or its role in every
block), chosen by a learned score of each scope's members' own scores for the device, the share
of them already there, its size and kind: a branch of convolutions or every layer's attention
moves as one decision, which single moves reach only through many worse placements.

The score of moving group ``g`` to device ``d`` is a small MLP over features of the current
placement that carry to any graph and cluster size
(:func:`~placer.search.agents.move_features.move_features`): the compute time of ``g`` on
``d`` against its current device, the compute load of ``d`` and of ``g``'s device, the
share of ``g``'s traffic that already lives on ``d`` or stays on its device, its transfer time
against its compute, whether ``g`` lies on the critical path (longest path with the placement's
compute and transfer times), and memory headroom. Because nothing in the network is indexed by
group or device, weights trained on one graph load on any other (:meth:`MovePolicy.load`).

:meth:`MovePolicy.update` is one REINFORCE step on the rewards the agent gives a batch of
proposals (the baseline the batch mean). Saved weights (:meth:`MovePolicy.save`) are the
network's tensors and the config's numbers, no pickled classes: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from envs.sim.problem import PlacementProblem
from placer.search.agents.move_features import NUM_FEATURES, FeatureStatics, coupling_features
from placer.search.move_scopes import MoveScopes

#: Features of a scope choice (:func:`_scope_features`), and the single move's head start.
NUM_SCOPE_FEATURES = 5
SINGLE_PRIOR = 1.5


@dataclass
class MovePolicyConfig:
    """Hyper-parameters of the move policy.

    Attributes:
        hidden: width of the scoring MLP.
        learning_rate: Adam step size.
        ent_coef: entropy bonus on the first move and the move count.
        max_moves: the most groups one proposal relocates.
        stall: batches without improvement before a walk step is taken.
        walk: the longest walk away from the incumbent before returning to it.
    """

    hidden: int = 32
    learning_rate: float = 3e-3
    ent_coef: float = 1e-3
    max_moves: int = 3
    stall: int = 3
    walk: int = 6


class MoveNetwork(torch.nn.Module):
    """Scores (group, device) moves from their features; nothing depends on the graph's size."""

    def __init__(self, hidden: int = 32, max_moves: int = 3) -> None:
        super().__init__()
        self.score = torch.nn.Sequential(
            torch.nn.Linear(NUM_FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )
        self.coupling = torch.nn.Parameter(torch.tensor([1.0, 0.5, 0.5]))
        self.count_logits = torch.nn.Parameter(torch.zeros(max_moves))
        # A scope's score (see _scope_features): its members' mean score for the device counts as
        # the group's own does; the single move starts SINGLE_PRIOR ahead, so a first proposal
        # expands to a scope about half the time with a few scopes to choose from.
        self.scope = torch.nn.Linear(NUM_SCOPE_FEATURES, 1)
        with torch.no_grad():
            self.scope.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0, SINGLE_PRIOR]]))
            self.scope.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N * D] of the moves whose features [N * D, F] are given."""
        return self.score(features).squeeze(-1)


# ---------------------------------------------------------------------------------- policy
class MovePolicy:
    """Samples proposals (one to ``max_moves`` coordinated moves) and learns from their rewards."""

    def __init__(self, config: MovePolicyConfig | None = None, seed: int = 0) -> None:
        self.config = config or MovePolicyConfig()
        gen = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.net = MoveNetwork(self.config.hidden, self.config.max_moves)
        self.optim = torch.optim.Adam(self.net.parameters(), lr=self.config.learning_rate)

    def propose(self, problem: PlacementProblem, st: FeatureStatics, row: np.ndarray, features: np.ndarray,
                batch: int, rng: np.random.Generator,
                temperature: float = 1.0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """``batch`` proposals around ``row``: rows [B, N], their log-probabilities [B] and entropy [B].

        ``temperature`` divides the move scores and the move-count logits (above 1: flatter, more
        distinct proposals)."""
        n, d = problem.num_nodes, problem.num_devices
        logits = self.net(torch.from_numpy(features)) / float(temperature)
        raw = logits
        current = torch.zeros(n * d, dtype=torch.bool)
        current[torch.from_numpy(np.arange(n) * d + row)] = True
        logits = logits.masked_fill(current, -1e9)
        k_lp = torch.log_softmax(self.net.count_logits / float(temperature), dim=0)
        k = _sample(k_lp.detach().exp().numpy().astype(np.float64), batch, rng) + 1
        logp = k_lp[torch.from_numpy(k - 1)]
        # The first move: one distribution shared by the whole batch.
        lp0 = torch.log_softmax(logits, dim=0)
        first = _sample(lp0.detach().exp().numpy().astype(np.float64), batch, rng)
        logp = logp + lp0[torch.from_numpy(first)]
        entropy = (-(k_lp.exp() * k_lp).sum() - (lp0.exp() * lp0).sum()).expand(batch)
        rows = np.repeat(row[None].astype(np.int64), batch, axis=0)
        rows[np.arange(batch), first // d] = first % d
        if st.scopes is not None and batch:
            # The first move may take a module scope of its group with it (module doc).
            s_lp, s_pick, s_ent = self._scope_choice(st.scopes, raw, row, first, n, d, temperature, rng)
            logp, entropy = logp + s_lp, entropy + s_ent
            for b in np.flatnonzero(s_pick >= 0):
                rows[b, st.scopes.members[s_pick[b]]] = first[b] % d
        # Further moves, for the proposals that make them: coupled to the moves made so far.
        moved_mask = np.zeros((batch, n * d), dtype=bool)
        coupling = torch.zeros(batch, n * d)
        w = self.net.coupling
        chosen = first
        for j in range(1, int(k.max()) if batch else 0):
            g_prev = chosen // d
            follow, swap, fill = coupling_features(st, row, g_prev, chosen % d, d)
            coupling = coupling + w[0] * torch.from_numpy(follow) + w[1] * torch.from_numpy(swap) + \
                w[2] * torch.from_numpy(fill)
            moved_mask[np.arange(batch)[:, None], g_prev[:, None] * d + np.arange(d)[None, :]] = True
            act = np.flatnonzero(k > j)
            if not len(act):
                break
            step = (logits[None, :] + coupling[act]).masked_fill(torch.from_numpy(moved_mask[act]) | current[None], -1e9)
            lp = torch.log_softmax(step, dim=1)
            pick = _sample_rows(lp.detach().exp().numpy().astype(np.float64), rng)
            gain = torch.zeros(batch)
            gain = gain.index_put((torch.from_numpy(act),), lp.gather(1, torch.from_numpy(pick)[:, None]).squeeze(1))
            logp = logp + gain
            rows[act, pick // d] = pick % d
            chosen = chosen.copy()
            chosen[act] = pick
        return rows, logp, entropy

    def _scope_choice(self, scopes: MoveScopes, raw: torch.Tensor, row: np.ndarray, first: np.ndarray, n: int,
                      d: int, temperature: float,
                      rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """For each proposal's first move (group ``first // d`` to device ``first % d``): keep it
        single or expand it to one of the group's scopes. Returns the choice's log-probability
        [B], the scope chosen [B] (-1: single) and the choice's entropy [B]."""
        score, cand = scope_scores(self.net, scopes, raw, row, first, n, d)
        lp = torch.log_softmax(score / float(temperature), dim=1)
        pick = _sample_rows(lp.detach().exp().numpy().astype(np.float64), rng)
        chosen = lp.gather(1, torch.from_numpy(pick)[:, None]).squeeze(1)
        entropy = -(lp.exp() * lp).sum(dim=1)
        scope = np.where(pick > 0, cand[np.arange(len(first)), np.maximum(pick - 1, 0)], -1)
        return chosen, scope, entropy

    def update(self, logp: torch.Tensor, entropy: torch.Tensor, reward: np.ndarray) -> None:
        """One REINFORCE step: advantage = reward - batch mean (scaled by the batch's spread)."""
        r = torch.as_tensor(reward, dtype=torch.float32)
        adv = r - r.mean()
        std = float(adv.std()) if len(adv) > 1 else 0.0
        if std > 1e-12:
            adv = adv / std
        loss = -(adv * logp).mean() - self.config.ent_coef * entropy.mean()
        self.optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optim.step()

    def state_dict(self) -> dict:
        """The network's weights and the config that sized it."""
        return {"config": self.config.__dict__.copy(), "net": self.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Load weights saved by :meth:`state_dict` (from any graph: nothing is sized by it).

        Weights saved before the scope scorer existed load with its starting weights."""
        missing, unexpected = self.net.load_state_dict(state["net"], strict=False)
        if unexpected or any(not k.startswith("scope.") for k in missing):
            raise RuntimeError(f"not a move policy's weights: missing {missing}, unexpected {unexpected}")

    def save(self, path: str | Path) -> None:
        """Write the policy to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path, seed: int = 0) -> MovePolicy:
        """A policy saved by :meth:`save`, for any graph and cluster."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        policy = cls(MovePolicyConfig(**state["config"]), seed=seed)
        policy.load_state_dict(state)
        return policy


def scope_scores(net: MoveNetwork, scopes: MoveScopes, raw: torch.Tensor, row: np.ndarray, first: np.ndarray,
                 n: int, d: int) -> tuple[torch.Tensor, np.ndarray]:
    """The scope scorer's logits [B, 1 + K] for first moves ``first`` ([B], group * d + device) from
    placement ``row``: column 0 keeps the move single, column 1 + k expands it to the group's k-th
    scope (``cand[b, k]``, -1 and a logit of -1e9 past its last). ``raw`` [N * D] are the move
    scorer's logits at ``row``."""
    groups, dev = first // d, first % d
    cand = scopes.of_nodes(groups)  # [B, K], -1 past the last
    valid = np.concatenate([np.ones((len(first), 1), dtype=bool), cand >= 0], axis=1)
    safe = np.where(cand >= 0, cand, 0)
    per_scope = torch.zeros(scopes.num_scopes, d).index_add_(
        0, torch.from_numpy(scopes.member_scope), raw.view(n, d)[torch.from_numpy(scopes.member_node)])
    sizes = scopes.sizes
    mean_score = per_scope / torch.from_numpy(sizes.astype(np.float32))[:, None]
    on_dev = scopes.members_on(row, d) / sizes[:, None]
    feats = _scope_features(mean_score[torch.from_numpy(safe), torch.from_numpy(dev)[:, None]],
                            raw.view(n, d)[torch.from_numpy(groups), torch.from_numpy(dev)],
                            on_dev[safe, dev[:, None]], np.log(sizes[safe]) / max(np.log(n), 1.0),
                            scopes.is_role[safe])
    return net.scope(feats).squeeze(-1).masked_fill(torch.from_numpy(~valid), -1e9), cand


def _scope_features(mean_score: torch.Tensor, own_score: torch.Tensor, on_device: np.ndarray, log_size: np.ndarray,
                    is_role: np.ndarray) -> torch.Tensor:
    """[B, 1 + K, NUM_SCOPE_FEATURES]: per proposal, the single move (column 0) and each scope of its
    group: the members' mean move score for the device (the group's own score for the single
    move), the share of members already on it, log size over log N, role or subtree, single."""
    b, k = on_device.shape
    single = torch.tensor([[0.0, 0.0, 0.0, 1.0]]).expand(b, 1, 4)
    rest = torch.from_numpy(np.stack([on_device, log_size, is_role.astype(np.float64),
                                      np.zeros((b, k))], axis=2).astype(np.float32))
    scores = torch.cat([own_score[:, None], mean_score], dim=1)[:, :, None]
    return torch.cat([scores, torch.cat([single, rest], dim=1)], dim=2)


def _sample(probs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices drawn from one distribution ``probs`` [K] (inverse CDF on the search's generator)."""
    cdf = np.cumsum(probs)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right"), len(probs) - 1).astype(np.int64)


def _sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of ``probs`` [B, K] (inverse-CDF on the search's generator)."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cdf[:, -1]
    out = (cdf < u[:, None]).sum(axis=1)
    return np.minimum(out, probs.shape[1] - 1).astype(np.int64)

