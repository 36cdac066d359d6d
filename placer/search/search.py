"""``search()``: find a fast placement for a problem with one of the learning agents.

>>> result = search(problem, agent="hierarchical", budget="20k", seed=0, out_dir="out")  # doctest: +SKIP
>>> result.best_step_time, result.stop_reason                                          # doctest: +SKIP

Agents: ``hierarchical`` (grouper + seq2seq placer, PPO), ``reinforce`` (same network,
REINFORCE with a moving-average baseline), ``flat`` (no grouper, PPO) and ``sequential``
(MaskablePPO on ``SequentialPlacementEnv``, one group per step).

Between the policy's batches an improvement phase (:mod:`placer.search.local_search`)
polishes the best placement so far by batched local search; it shares the evaluation budget
(``local_search_share``) and the result says which phase found the best (``best_phase``).

Whatever the agent, the search keeps its best placement in memory and on disk
(``out_dir/best_placement.json``, rewritten atomically on every improvement), stops at the
budget (seconds or evaluated placements), on a plateau, or when the callback says so, and
returns its best even when interrupted with Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from envs.gym.config import default_num_groups
from envs.gym.vector_env import BatchedPlacementVecEnv
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError
from placer.search.agents.callbacks import TrackerCallback
from placer.search.agents.hierarchical.ppo import PPOConfig, make_ppo
from placer.search.agents.imitation import behaviour_clone
from placer.search.agents.reinforce import ReinforceConfig, make_network, train_reinforce
from placer.search.local_search import LocalSearch
from placer.search.tracker import BestTracker, ProgressCallback, SearchResult, StopSearch

AGENTS = ("hierarchical", "reinforce", "flat", "sequential")
#: Default budget: a few minutes, the issue's "minutes on an ordinary machine".
DEFAULT_BUDGET = "5m"
#: Default plateau: stop after this many evaluations without improvement.
DEFAULT_PATIENCE = 60_000


class SearchError(PlacerError, ValueError):
    """A search asked for with arguments that cannot work."""


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads: on a small shared CPU one thread avoids spin contention
    that made the policy 100x slower here."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_rows(problem: PlacementProblem, rows: Sequence | np.ndarray | None) -> np.ndarray | None:
    if rows is None:
        return None
    if isinstance(rows, dict):
        rows = [problem.placement_to_array(rows)]
    rows = [problem.placement_to_array(r) if isinstance(r, dict) else r for r in rows]
    if len(rows) == 0:
        return None
    return problem.check_array(np.asarray(rows).reshape(len(rows), -1))


def search(
    problem: PlacementProblem,
    agent: str = "hierarchical",
    budget: object = DEFAULT_BUDGET,
    seed: int = 0,
    out_dir: str | Path | None = None,
    initial_placements: Sequence | np.ndarray | None = None,
    callback: ProgressCallback | None = None,
    *,
    num_groups: int | None = None,
    num_envs: int = 256,
    patience: int | None = DEFAULT_PATIENCE,
    imitation_steps: int = 50,
    progress: bool = False,
    tensorboard_log: str | None = None,
    save_path: str | Path | None = None,
    fingerprint: str = "",
    expand: Callable[[dict[str, str]], dict[str, str]] | None = None,
    ppo_config: PPOConfig | None = None,
    reinforce_config: ReinforceConfig | None = None,
    threads: int | None = 1,
    env_kwargs: dict | None = None,
    on_improve: Callable[[np.ndarray, float, int], None] | None = None,
    resume: bool = False,
    imitation_lr: float = 3e-3,
    local_search: bool | None = None,
    local_search_share: float = 0.5,
) -> SearchResult:
    """Search placements of ``problem`` with a learning agent; return the best found.

    Args:
        problem: the compiled problem (usually over the group graph).
        agent: one of :data:`AGENTS`.
        budget: ``"5m"``, ``"20k"``, ``"5m,100k"``, an int (placements), a float (seconds)
            or a :class:`~placer.options.Budget`.
        seed: same seed and an evaluation budget give the same best placement.
        out_dir: where ``best_placement.json`` (and ``policy.zip``) are written.
        initial_placements: heuristic placements (rows or ``{node: device}`` dicts) evaluated
            first as candidates; the best is also imitated for ``imitation_steps`` steps.
        callback: called with a :class:`~placer.search.tracker.SearchProgress` after
            every batch; return ``False`` to stop.
        num_groups: G of the hierarchical action (default :func:`default_num_groups`).
        num_envs: placements evaluated per batched simulator call.
        patience: stop after this many evaluations without improvement (None: never).
        imitation_steps: behaviour-cloning steps on the best initial placement (0: none).
        progress: show a progress bar with the best step time.
        tensorboard_log: directory for TensorBoard logs (PPO agents, if tensorboard imports).
        save_path: save the trained policy there (SB3 ``.zip`` for PPO agents, a torch
            state dict for REINFORCE); default ``out_dir/policy.zip`` when out_dir is given.
        fingerprint, expand: written into / applied to the placement file (e.g. the model's
            fingerprint and ``grouping.expand`` to save op-level placements).
        ppo_config, reinforce_config: hyper-parameters.
        threads: torch intra-op threads during the search (None: leave as is).
        env_kwargs: more :class:`envs.gym.placement_env.PlacementEnv` arguments (reward_mode,
            reference, invalid_penalty, node_ops, measurer, ...).
        on_improve: called as ``on_improve(row, step_time, evaluated)`` whenever the best improves.
        resume: start from the policy saved at ``save_path`` (or ``out_dir/policy.*``) by an
            earlier search of the same problem, when there is one.
        imitation_lr: Adam step size of the imitation warm start.
        local_search: interleave the improvement phase (:mod:`placer.search.local_search`:
            batched single- and edge-moves around the best placement, with kicks) with the
            policy's batches.  ``None``: on when the reward comes from the simulator
            (``simulated``, and ``hybrid``, whose inner loop is the recalibrated simulator); off
            for ``measured`` (a neighbourhood is hundreds of evaluations, cheap only in the simulator).
        local_search_share: the fraction of evaluations the improvement phase gets.

    Raises:
        SearchError: unknown agent or bad sizes.  Any error of the agent propagates after
        the best placement so far was written.
    """
    if agent not in AGENTS:
        raise SearchError(f"unknown agent {agent!r}; expected one of {list(AGENTS)}")
    if isinstance(num_envs, bool) or int(num_envs) < 1:
        raise SearchError(f"num_envs must be a positive integer, got {num_envs!r}")
    if num_groups is not None and (isinstance(num_groups, bool) or int(num_groups) < 1):
        raise SearchError(f"num_groups must be a positive integer, got {num_groups!r}")
    rows = _check_rows(problem, initial_placements)
    tracker = BestTracker(problem, budget, patience=patience, out_dir=out_dir, callback=callback,
                          fingerprint=fingerprint, expand=expand, progress=progress, agent=agent,
                          on_improve=on_improve)
    left = tracker.remaining_placements()
    num_envs = int(num_envs) if left is None else max(1, min(int(num_envs), left))
    if save_path is None and out_dir is not None:
        save_path = Path(out_dir) / ("policy.pt" if agent == "reinforce" else "policy.zip")
    reason = "finished"
    model = None
    with _torch_threads(threads):
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            env = _make_env(problem, agent, num_envs, num_groups, seed, env_kwargs or {})
            _watch_recalibration(env, tracker)
            improver = _make_improver(problem, env, tracker, seed, local_search, local_search_share)
            if rows is not None:
                _seed_candidates(env, tracker, rows)
            if agent in ("hierarchical", "flat"):
                built = make_ppo(env, ppo_config, seed=seed, tensorboard_log=tensorboard_log)
                if resume and save_path is not None and Path(save_path).exists():
                    _resume(built, save_path)
                elif rows is not None and imitation_steps > 0:
                    _imitate(built.policy, env, tracker, imitation_steps, imitation_lr)
                model = built  # only now: a failed resume must not overwrite the saved policy
                reason = _learn_sb3(model, tracker, improver=improver)
            elif agent == "reinforce":
                cfg = reinforce_config or ReinforceConfig()
                net = make_network(env, cfg)
                if resume and save_path is not None and Path(save_path).exists():
                    _resume(net, save_path)
                elif rows is not None and imitation_steps > 0:
                    _imitate(_NetAsPolicy(net), env, tracker, imitation_steps, imitation_lr)
                model = net
                train_reinforce(env, model, tracker, cfg, improver=improver)
            else:
                from placer.search.agents.sequential import make_sequential_model

                seq = make_sequential_model(problem, seed=seed, tensorboard_log=tensorboard_log,
                                            num_envs=min(num_envs, 8), env_kwargs=env_kwargs)
                if resume and save_path is not None and Path(save_path).exists():
                    _resume(seq, save_path)
                model = seq
                reason = _learn_sb3(model, tracker, steps_per_placement=problem.num_nodes, improver=improver)
        except StopSearch as stop:
            reason = stop.reason
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            if save_path is not None and model is not None:
                _save(model, save_path)
    return tracker.result(reason)


class _NetAsPolicy(torch.nn.Module):
    """Gives a bare :class:`PlacementNetwork` the ``action_log_prob`` of the SB3 policy."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def action_log_prob(self, obs, actions):
        return self.net(obs, actions=actions).log_prob


def _make_env(problem: PlacementProblem, agent: str, num_envs: int, num_groups: int | None, seed: int,
              env_kwargs: dict) -> BatchedPlacementVecEnv:
    """The batched whole-graph env the agent trains on (for ``sequential``: only to score seeds)."""
    if agent in ("flat", "sequential"):
        return BatchedPlacementVecEnv(problem, n_envs=num_envs if agent == "flat" else 1, hierarchical=False,
                                      seed=seed, **env_kwargs)
    g = num_groups or default_num_groups(problem.num_nodes, problem.num_devices)
    return BatchedPlacementVecEnv(problem, n_envs=num_envs, num_groups=g, seed=seed, **env_kwargs)


def _watch_recalibration(env: BatchedPlacementVecEnv, tracker: BestTracker) -> None:
    """Hybrid rewards recalibrate their simulator mid-search: keep the tracker's best on the new scale."""
    model = env.env.reward_model
    if not hasattr(model, "calibrations"):
        return

    def rescore(row: np.ndarray) -> tuple[float, bool]:
        ev = model.simulate(np.asarray(row)[None])
        return float(ev.step_time[0]), bool(ev.valid[0])  # what the tracker compares: time and validity

    tracker.watch_scale(lambda: int(model.calibrations), rescore)


def _seed_candidates(env: BatchedPlacementVecEnv, tracker: BestTracker, rows: np.ndarray) -> None:
    """Evaluate heuristic placements first (they count against the budget)."""
    left = tracker.remaining_placements()
    if left is not None:
        rows = rows[:left]
    _, ev = env.evaluate_placements(rows)
    tracker.record(ev.placements, ev.step_time, ev.valid, next_batch=1, phase="seeds")


def _make_improver(problem: PlacementProblem, env: BatchedPlacementVecEnv, tracker: BestTracker, seed: int,
                   enabled: bool | None, share: float) -> LocalSearch | None:
    """The interleaved local search, or None when off (by default: on where the simulator scores placements)."""
    if enabled is None:
        enabled = env.env.reward_mode in ("simulated", "hybrid")
    if not enabled:
        return None
    if isinstance(share, bool) or not 0.0 < float(share) < 1.0:
        raise SearchError(f"local_search_share must be a fraction in (0, 1), got {share!r}")

    def evaluate(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, ev = env.evaluate_placements(rows)
        return ev.step_time, ev.valid

    return LocalSearch(problem, evaluate, tracker, seed=seed, share=share)


def _imitate(policy, env: BatchedPlacementVecEnv, tracker: BestTracker, steps: int, lr: float) -> None:
    """Behaviour-clone the best placement seen so far (the best heuristic)."""
    if tracker.best_row is None:
        return
    obs = {k: v[0] for k, v in env.reset().items()}
    action = env.env.encode(tracker.best_row)
    behaviour_clone(policy, obs, action, steps=steps, lr=lr)


def _learn_sb3(model, tracker: BestTracker, steps_per_placement: int = 1, improver: LocalSearch | None = None) -> str:
    """Run ``model.learn`` until the tracker stops it; return the stop reason."""
    cb = TrackerCallback(tracker, improver=improver)
    total = tracker.remaining_placements()
    # The tracker, not SB3, ends the search; SB3 only needs a horizon (in env steps) for
    # its learning-rate schedule.
    horizon = (total * steps_per_placement + model.n_envs * model.n_steps) if total is not None else 10**12
    model.learn(total_timesteps=horizon, callback=cb, progress_bar=False)
    return cb.stop_reason or "finished"


def _resume(model, path: str | Path) -> None:
    """Load the weights an earlier search saved at ``path`` into ``model``."""
    try:
        if hasattr(model, "set_parameters"):
            model.set_parameters(str(path), device="cpu")
        else:
            model.load_state_dict(torch.load(path, map_location="cpu"))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SearchError(
            f"cannot resume from {path}: it was saved for another problem, agent or group count ({exc})"
        ) from None


def _save(model, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save"):
        model.save(str(path))
    else:
        torch.save(model.state_dict(), path)


def load_policy(path: str | Path, agent: str = "hierarchical"):
    """Load a policy saved by :func:`search` (an SB3 model for PPO agents)."""
    path = Path(path)
    if not path.exists():
        raise SearchError(f"no saved policy at {path}")
    if agent in ("hierarchical", "flat"):
        from stable_baselines3 import PPO

        return PPO.load(str(path), device="cpu")
    if agent == "sequential":
        from sb3_contrib import MaskablePPO

        return MaskablePPO.load(str(path), device="cpu")
    raise SearchError(f"load_policy handles SB3 agents (hierarchical, flat, sequential); {agent!r} saves a state dict: "
                      "use torch.load and PlacementNetwork.load_state_dict")
