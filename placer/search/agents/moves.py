"""A learned move policy: which improvement moves to try around the incumbent (the ``moves`` agent).

Placeto and GiPH turn placement into a sequence of improvements and learn which one to make;
this agent does the same on the batched simulator and so competes directly with local search,
on the same budget of evaluated placements.

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

Training is REINFORCE on the simulator's verdict: the reward of a proposal is its relative
step-time improvement over the current placement (a placement that does not fit earns -1), the
baseline the batch mean. The improving proposals of a batch are also merged into one row where
they touch different groups (many independent gains on a large graph are taken at once); the
best becomes the current point. When several batches in a row find nothing, the best fitting
proposal is taken anyway for a short walk (an escape the policy chose), and the walk returns to
the best point when it leads nowhere. Proposals already evaluated around the current point are
learned from again but not re-evaluated, so a peaked policy does not spend the budget twice.
Two walkers share the policy: one follows the incumbent (whoever found it), the other starts
from the policy's own start (:func:`start_row`), outside the best seed's basin.
Every evaluated batch goes to the tracker as phase ``policy_moves``, so each improvement is
credited to the policy or to whichever phase (seeds, local search) actually found it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from envs.gym.vector_env import BatchedPlacementVecEnv
from envs.sim.problem import PlacementProblem
from placer.search.agents.move_features import (
    NUM_FEATURES,
    FeatureStatics,
    coupling_features,
    feature_statics,
    move_features,
)
from placer.search.local_search import LocalSearch
from placer.search.move_scopes import MoveScopes
from placer.search.tracker import BestTracker, StopSearch

log = logging.getLogger(__name__)

#: The phase name of the batches this agent evaluates (see :mod:`placer.search.tracker`).
PHASE = "policy_moves"
#: The walker from the policy's own start takes every EXPLORER_EVERY-th batch ...
EXPLORER_EVERY = 3
#: ... and is retired when, after EXPLORER_TRIAL of its batches, its best is still more than
#: EXPLORER_RETIRE times the incumbent's step time (a start that far behind rarely catches up
#: on the budgets a search has: 8-layer NMT from one GPU stayed at 2x the heuristics in 6,000).
EXPLORER_TRIAL = 16
EXPLORER_RETIRE = 1.5
#: The highest sampling temperature a walker raises its scores' divisor to (see ``_Walker.temperature``).
MAX_TEMPERATURE = 16.0
#: Features of a scope choice (:func:`_scope_features`), and the single move's head start.
NUM_SCOPE_FEATURES = 5
SINGLE_PRIOR = 1.5
#: Batches in a row (of either walker) whose proposals were all evaluated before, at which the
#: search stops as "exhausted": at the highest temperature the policy then draws nothing new
#: (a few milliseconds a batch; well past the temperature's rise from 1 to MAX_TEMPERATURE).
IDLE_BATCHES = 200
#: The policy shipped with the package, trained across many graphs and clusters by
#: :mod:`placer.search.agents.pretrain` (``python scripts/train_policy.py``); a search starts
#: from it by default (``SearchConfig(pretrained=False)``, ``optimize --fresh``: fresh weights).
PRETRAINED_PATH = Path(__file__).resolve().parent / "data" / "moves_pretrained.pt"


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


# ---------------------------------------------------------------------------------- start
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


# ---------------------------------------------------------------------------------- agent
class MoveAgent:
    """The move policy as a :class:`~placer.search.agents.base.SearchAgent`."""

    def __init__(self, env: BatchedPlacementVecEnv, problem: PlacementProblem, rng: np.random.Generator,
                 batch: int, config: MovePolicyConfig | None = None, seed: int = 0) -> None:
        self.env = env
        self.problem = problem
        self.rng = rng
        self.batch = max(1, int(batch))
        self.policy = MovePolicy(config, seed=seed)
        self.static = feature_statics(problem)
        self.idle = 0  # batches in a row whose proposals were all evaluated before (IDLE_BATCHES)

    def resume(self, path: Path) -> None:
        """Load a policy saved by :meth:`save` (from this or any other graph)."""
        self.policy.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def start_pretrained(self, path: Path = PRETRAINED_PATH) -> bool:
        """Start from the shipped policy (or the policy file ``path``) when it exists (True); else keep
        fresh weights.

        An installation without the shipped file (a source tree before ``scripts/train_policy.py``
        ran) still searches, from scratch, and says so in the log; a file named by the caller must exist.
        """
        if not path.exists():
            if path != PRETRAINED_PATH:
                raise FileNotFoundError(f"no move policy at {path} (expected a file saved by MovePolicy.save)")
            log.warning("no pretrained move policy at %s; the search trains one from scratch", path)
            return False
        self.resume(path)
        return True

    def imitate(self, tracker: BestTracker, steps: int, lr: float) -> None:
        """Nothing to clone: the policy starts from the tracker's best placement itself."""

    def save(self, path: Path) -> None:
        """Write the policy (any graph can load it)."""
        self.policy.save(path)

    def _evaluate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, ev = self.env.evaluate_placements(rows)
        ok = np.asarray(ev.valid, dtype=bool) & np.asarray(ev.fits, dtype=bool)
        return np.asarray(ev.step_time, dtype=np.float64), ok, np.asarray(ev.peak_memory, dtype=np.float64)

    def learn(self, tracker: BestTracker, improver: LocalSearch | None) -> str:
        """Propose, evaluate, learn and move until the tracker raises
        :class:`~placer.search.tracker.StopSearch`.

        Two walkers share the policy: one follows the incumbent (whoever found it: seeds, local
        search, the policy); the other starts from the policy's own start (:func:`start_row`),
        keeps its own best and takes every ``EXPLORER_EVERY``-th batch, so the search is not
        confined to the basin of the best seed; it is retired when it stays far behind. Without
        seeds there is one walker, from the start.
        """
        if tracker.best_row is None:
            row = start_row(self.problem)
            t, ok, _ = self._evaluate(row[None])
            tracker.record(row[None], t, ok, next_batch=1, phase="policy")
            assert tracker.best_row is not None  # the row just recorded
            walkers = [_Walker(self, tracker.best_row, (not tracker.best_fits, tracker.best_step_time), True)]
        else:
            walkers = [_Walker(self, tracker.best_row, (not tracker.best_fits, tracker.best_step_time), True)]
            row = start_row(self.problem)
            if not np.array_equal(row, tracker.best_row):
                t, ok, _ = self._evaluate(row[None])
                tracker.record(row[None], t, ok, next_batch=1, phase="policy")
                walkers.append(_Walker(self, row, (not bool(ok[0]), float(t[0])), False))
        turn = 0
        while True:
            explorer = walkers[-1] if len(walkers) > 1 else None
            if explorer is not None and turn >= EXPLORER_TRIAL * EXPLORER_EVERY and \
                    explorer.home_key[1] > EXPLORER_RETIRE * tracker.best_step_time:
                walkers.pop()  # far behind the incumbent after its trial: its budget goes to the follower
                explorer = None
            if explorer is not None and turn % EXPLORER_EVERY == EXPLORER_EVERY - 1:
                explorer.step(tracker, improver)
            else:
                walkers[0].step(tracker, improver)
            turn += 1


class _Walker:
    """One current point of the move search and its state (see :meth:`MoveAgent.learn`)."""

    def __init__(self, agent: MoveAgent, row: np.ndarray, key: tuple[bool, float], follows: bool) -> None:
        self.agent = agent
        self.follows = follows  # recentres on the tracker's incumbent when another phase improved it
        self.home, self.home_key = np.array(row, dtype=np.int64, copy=True), key  # the best this walker saw
        self.seen_best = key
        # Proposals already evaluated around the current point: learned from again, not re-evaluated.
        self.seen: dict[int, tuple[float, bool]] = {}
        self.stall = self.walk = 0
        # Sampling temperature: raised while most proposals repeat ones already evaluated (a peaked
        # policy, e.g. the pretrained one, otherwise draws the same few moves batch after batch and
        # the search's placements per second collapse), lowered again when they are fresh.
        self.temperature = 1.0
        self.move_to(row, key, None)

    def move_to(self, row: np.ndarray, key: tuple[bool, float], peak: np.ndarray | None) -> None:
        self.current, self.key = np.array(row, dtype=np.int64, copy=True), key
        self.features = move_features(self.agent.problem, self.current, peak, self.agent.static)
        self.seen.clear()
        if key < self.home_key:
            self.home, self.home_key = self.current.copy(), key

    def step(self, tracker: BestTracker, improver: LocalSearch | None) -> None:
        """One batch of proposals around the current point: evaluate, learn, move."""
        agent, cfg = self.agent, self.agent.policy.config
        if self.follows:
            incumbent = (not tracker.best_fits, tracker.best_step_time)
            if incumbent < self.seen_best and incumbent < self.key:
                # Another phase (local search) improved the best: continue from there.
                assert tracker.best_row is not None  # an incumbent exists once a key was seen
                self.move_to(tracker.best_row, incumbent, None)
                self.walk = self.stall = 0
            self.seen_best = min(self.seen_best, incumbent)
        left = tracker.remaining_placements()
        batch = agent.batch if left is None else max(1, min(agent.batch - 1, left - 1) if left > 1 else 1)
        rows, logp, entropy = agent.policy.propose(agent.problem, agent.static, self.current, self.features, batch,
                                                   agent.rng, self.temperature)
        keys = _row_keys(rows)
        uk, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        fresh = np.array([int(k) not in self.seen for k in uk], dtype=bool)
        t_u = np.array([self.seen.get(int(k), (math.inf, False))[0] for k in uk])
        ok_u = np.array([self.seen.get(int(k), (math.inf, False))[1] for k in uk], dtype=bool)
        peak_u = np.zeros((len(uk), agent.problem.num_devices))
        new_rows = rows[first[fresh]]
        if len(new_rows) * 2 < batch:
            self.temperature = min(self.temperature * 2.0, MAX_TEMPERATURE)
        elif len(new_rows) * 10 > 9 * batch:
            self.temperature = max(self.temperature / 2.0, 1.0)
        if not len(new_rows):
            # Every proposal was evaluated before: nothing reaches the tracker's budget check,
            # so check it here. A walker that stays where nothing fits (it only moves to a
            # fitting or better placement) over a small space repeats the same proposals for
            # ever: under a time budget the search never ended (2 x Linear layers on two
            # devices too small for them, --budget 10s: still running after 90 s).
            agent.idle += 1
            tracker.check()
            if agent.idle >= IDLE_BATCHES:
                raise StopSearch("exhausted")
        else:
            agent.idle = 0
        if len(new_rows):
            t_new, ok_new, peak_new = agent._evaluate(new_rows)
            t_u[fresh], ok_u[fresh], peak_u[fresh] = t_new, ok_new, peak_new
            for k, tt, oo in zip(uk[fresh], t_new, ok_new):
                self.seen[int(k)] = (float(tt), bool(oo))
        t, ok = t_u[inverse], ok_u[inverse]
        base = self.key[1] if math.isfinite(self.key[1]) else float(np.min(np.where(ok, t, np.inf), initial=1.0))
        reward = np.where(ok, np.clip((base - t) / max(base, 1e-30), -1.0, 1.0), -1.0)
        if self.key[0] and ok.any():
            reward = np.where(ok, 1.0, -1.0)  # from a placement that does not fit, fitting is the goal
        agent.policy.update(logp, entropy, reward)
        if len(new_rows):
            tracker.record(new_rows, t_u[fresh], ok_u[fresh], next_batch=1, phase=PHASE)
            if improver is not None:
                improver.after_policy_batch(len(new_rows), next_batch=1)
        # The improving proposals' moves, merged where they touch different groups: one more row.
        better = np.flatnonzero(ok_u & (t_u < base)) if not self.key[0] else np.zeros(0, dtype=np.int64)
        best_row, best_key, best_peak = None, (True, math.inf), None
        if len(better):
            j = int(better[np.argmin(t_u[better])])
            best_row, best_key, best_peak = rows[first[j]], (False, float(t_u[j])), peak_u[j] if fresh[j] else None
        if len(better) > 1:
            merged = _merge(self.current, rows[first[better[np.argsort(t_u[better])]]])
            if merged is not None:
                tm, okm, pm = agent._evaluate(merged[None])
                tracker.record(merged[None], tm, okm, next_batch=1, phase=PHASE)
                if okm[0] and tm[0] < best_key[1]:
                    best_row, best_key, best_peak = merged, (False, float(tm[0])), pm[0]
        if best_row is None and self.key[0] and ok_u.any():
            j = int(np.argmin(np.where(ok_u, t_u, np.inf)))  # the first fitting placement
            best_row, best_key = rows[first[j]], (False, float(t_u[j]))
        if best_row is not None and best_key < self.key:
            self.move_to(best_row, best_key, best_peak)
            self.stall = 0
            return
        self.stall += 1
        if self.stall < cfg.stall or not ok_u.any():
            return
        self.stall = 0
        if self.walk >= cfg.walk:
            # The walk led nowhere: back to the best this walker knows (the incumbent for the follower).
            if self.follows and tracker.best_row is not None:
                self.move_to(tracker.best_row, (not tracker.best_fits, tracker.best_step_time), None)
            else:
                self.move_to(self.home, self.home_key, None)
            self.walk = 0
        else:
            # An escape the policy chose: its best fitting proposal, though not better.
            j = int(np.argmin(np.where(ok_u, t_u, np.inf)))
            self.move_to(rows[first[j]], (False, float(t_u[j])), None)
            self.walk += 1


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """[B] 64-bit keys of placement rows [B, N]: two wrapping dot products with fixed odd weights,
    mixed (distinct rows share a key with probability ~2^-64)."""
    n = rows.shape[1]
    w = np.random.default_rng(n).integers(1, 2**62, size=(2, n), dtype=np.int64) | 1
    with np.errstate(over="ignore"):
        keys = (rows.astype(np.int64) + 1) @ w.T
        return keys[:, 0] ^ (keys[:, 1] * np.int64(0x9E3779B97F4A7C15 - 2**64))


def _merge(current: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """``current`` with the moves of every row of ``rows`` (best first) that touches no group an earlier
    one moved; None when fewer than two could be merged."""
    out = np.array(current, copy=True)
    taken = np.zeros(len(current), dtype=bool)
    merged = 0
    for row in rows:
        changed = np.flatnonzero(row != current)
        if taken[changed].any():
            continue
        out[changed] = row[changed]
        taken[changed] = True
        merged += 1
    return out if merged > 1 else None
