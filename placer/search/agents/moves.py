"""A learned move policy: which improvement moves to try around the incumbent (the ``moves`` agent).

Placeto and GiPH turn placement into a sequence of improvements and learn which one to make;
this agent does the same on the batched simulator and so competes directly with local search,
on the same budget of evaluated placements.

The policy itself (:mod:`placer.search.agents.move_policy`) proposes batches of coordinated
moves around a placement, each first move possibly taking a whole module scope of its group
with it, scored by a small network that loads on any graph; this module runs it as a search.

Training is REINFORCE on the simulator's verdict: the reward of a proposal is its relative
step-time improvement over the current placement (a placement that does not fit earns -1), the
baseline the batch mean. The improving proposals of a batch are also merged into one row where
they touch different groups (many independent gains on a large graph are taken at once); the
best becomes the current point. When several batches in a row find nothing, the best fitting
proposal is taken anyway for a short walk (an escape the policy chose), and the walk returns to
the best point when it leads nowhere. Proposals already evaluated around the current point are
learned from again but not re-evaluated, so a peaked policy does not spend the budget twice.
Two walkers share the policy: one follows the incumbent (whoever found it), the other starts
from the policy's own start (:func:`~placer.search.agents.move_start.start_row`), outside the
best seed's basin.
Every evaluated batch goes to the tracker as phase ``policy_moves``, so each improvement is
credited to the policy or to whichever phase (seeds, local search) actually found it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from envs.gym.vector_env import BatchedPlacementVecEnv
from envs.sim.device_symmetry import canonical_rows, device_classes
from envs.sim.problem import PlacementProblem
from placer.search.agents.move_features import feature_statics, move_features
from placer.search.agents.move_policy import MovePolicy, MovePolicyConfig
from placer.search.agents.move_start import start_row
from placer.search.local_search import LocalSearch
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
#: Batches in a row (of either walker) whose proposals were all evaluated before, at which the
#: search stops as "exhausted": at the highest temperature the policy then draws nothing new
#: (a few milliseconds a batch; well past the temperature's rise from 1 to MAX_TEMPERATURE).
IDLE_BATCHES = 200
#: The policy shipped with the package, trained across many graphs and clusters by
#: :mod:`placer.search.agents.pretrain` (``python scripts/train_policy.py``); a search starts
#: from it by default (``SearchConfig(pretrained=False)``, ``optimize --fresh``: fresh weights).
PRETRAINED_PATH = Path(__file__).resolve().parent / "data" / "moves_pretrained.pt"


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
        # Interchangeable devices: proposals that are twins (the same moves to another unused
        # device of a class) are evaluated once, like repeated proposals.
        self.classes = device_classes(problem)
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
        keys = _row_keys(canonical_rows(rows, agent.classes))
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
