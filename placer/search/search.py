"""``search()``: find a fast placement for a problem with one of the learning agents.

>>> result = search(problem, agent="hierarchical", budget="20k", seed=0, out_dir="out")  # doctest: +SKIP
>>> result.best_step_time, result.stop_reason                                          # doctest: +SKIP

Agents come from the registry (:mod:`placer.search.agents.registry`): ``hierarchical``
(grouper + seq2seq placer, PPO), ``reinforce`` (same network, REINFORCE with a
moving-average baseline), ``flat`` (no grouper, PPO) and ``sequential`` (MaskablePPO on
``SequentialPlacementEnv``, one group per step). The options are one frozen
:class:`~placer.search.config.SearchConfig`; randomness comes from one
``numpy.random.Generator`` seeded by ``seed`` and handed down (numpy's global state is not
touched here; stable-baselines3 still seeds it inside its own models).

Between the policy's batches an improvement phase (:mod:`placer.search.local_search`)
polishes the best placement so far by batched local search; it shares the evaluation budget
(``local_search_share``) and the result says which phase found the best (``best_phase``).

Whatever the agent, the search keeps its best placement in memory and on disk
(``out_dir/best_placement.json``, rewritten atomically on every improvement), stops at the
budget (seconds or evaluated placements), on a plateau, or when the callback says so, and
returns its best even when interrupted with Ctrl-C.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from envs.gym.config import default_num_groups
from envs.gym.vector_env import BatchedPlacementVecEnv
from envs.sim.problem import PlacementProblem
from graphs.default_dtype import default_dtype
from placer.search.agents.base import AgentContext, SearchAgent
from placer.search.agents.registry import AgentEntry, get_agent
from placer.search.config import SearchConfig, SearchError, unreadable_policy
from placer.search.local_search import LocalSearch
from placer.search.tracker import BestTracker, ProgressCallback, SearchResult, StopSearch

log = logging.getLogger(__name__)


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
    config: SearchConfig | None = None,
    *,
    initial_placements: Sequence | np.ndarray | None = None,
    callback: ProgressCallback | None = None,
    on_improve: Callable[[np.ndarray, float, int], None] | None = None,
    **options: Any,
) -> SearchResult:
    """Search placements of ``problem`` with a learning agent; return the best found.

    Args:
        problem: the compiled problem (usually over the group graph).
        config: how to search (:class:`~placer.search.config.SearchConfig`); ``options``
            are its fields given by keyword instead (``agent="flat", budget="20k", seed=1``),
            applied on top of ``config`` when both are given.
        initial_placements: heuristic placements (rows or ``{node: device}`` dicts) evaluated
            first as candidates; the best is also imitated for ``imitation_steps`` steps.
        callback: called with a :class:`~placer.search.tracker.SearchProgress` after
            every batch; return ``False`` to stop.
        on_improve: called as ``on_improve(row, step_time, evaluated)`` whenever the best improves.

    Raises:
        SearchError: unknown agent or bad sizes.  Any error of the agent propagates after
        the best placement so far was written.
    """
    try:
        config = (config or SearchConfig()).replace(**options) if options else (config or SearchConfig())
    except TypeError as exc:  # an option SearchConfig has no field for
        raise SearchError(f"{exc}; search options are the fields of SearchConfig") from None
    entry = get_agent(config.agent)
    rows = _check_rows(problem, initial_placements)
    tracker = BestTracker(problem, config.budget, patience=config.patience, out_dir=config.out_dir,
                          callback=callback, fingerprint=config.fingerprint, expand=config.expand,
                          progress=config.progress, agent=config.agent, on_improve=on_improve,
                          metadata=config.metadata)
    left = tracker.remaining_placements()
    num_envs = config.num_envs if left is None else max(1, min(config.num_envs, left))
    save_path = config.policy_path
    # One generator for the whole search, split into independent streams: the agent's and the
    # improvement phase's draws never shift each other.
    agent_stream, local_stream = np.random.SeedSequence(int(config.seed)).spawn(2)
    reason = "finished"
    trained: SearchAgent | None = None
    # The policy's networks in float32 whatever the model file set (torch.set_default_dtype(torch.float64)
    # at its import left them in float64 against float32 features: "mat1 and mat2 must have the same dtype")
    with _torch_threads(config.threads), default_dtype(torch.float32):
        torch.manual_seed(config.seed)
        try:
            env = _make_env(problem, entry, num_envs, config)
            _watch_recalibration(env, tracker)
            improver = _make_improver(problem, env, tracker, np.random.default_rng(local_stream), config)
            if rows is not None:
                _seed_candidates(env, tracker, rows)
            agent = entry.build(AgentContext(
                problem=problem, env=env, seed=config.seed, rng=np.random.default_rng(agent_stream),
                num_envs=num_envs, env_kwargs=config.env_kwargs, tensorboard_log=config.tensorboard_log,
                ppo=config.ppo, reinforce=config.reinforce, pretrained=config.pretrained,
            ))
            if config.resume and save_path is not None and save_path.exists():
                _resume(agent, save_path)
            elif rows is not None and config.imitation_steps > 0 and entry.imitates:
                agent.imitate(tracker, config.imitation_steps, config.imitation_lr)
            trained = agent  # only now: a failed resume must not overwrite the saved policy
            reason = agent.learn(tracker, improver)
        except StopSearch as stop:
            reason = stop.reason
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            tracker.close_progress()  # an error raised here is printed on a line of its own
            if save_path is not None and trained is not None:
                _save_policy(trained, save_path)
    return tracker.result(reason)


def _save_policy(agent: SearchAgent, path: Path) -> None:
    """Save the trained policy; a full disk or a read-only directory costs the policy, not the run.

    The policy only speeds up a later ``--resume``; the placement is what the user needs, and
    its writes have their own fallback (:mod:`placer.write_failure`), so this logs and goes on.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        agent.save(path)
    except OSError as exc:
        log.warning("could not save the search policy to %s: %s; the run goes on without it",
                    path, exc.strerror or exc)


def _make_env(problem: PlacementProblem, entry: AgentEntry, num_envs: int,
              config: SearchConfig) -> BatchedPlacementVecEnv:
    """The batched whole-graph env the agent trains on (for one with envs of its own: only to score seeds)."""
    kwargs = dict(config.env_kwargs)
    if not entry.hierarchical:
        return BatchedPlacementVecEnv(problem, n_envs=num_envs if entry.batched else 1, hierarchical=False,
                                      seed=config.seed, **kwargs)
    g = config.num_groups or default_num_groups(problem.num_nodes, problem.num_devices)
    return BatchedPlacementVecEnv(problem, n_envs=num_envs, num_groups=g, seed=config.seed, **kwargs)


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


def _make_improver(problem: PlacementProblem, env: BatchedPlacementVecEnv, tracker: BestTracker,
                   rng: np.random.Generator, config: SearchConfig) -> LocalSearch | None:
    """The interleaved local search, or None when off (by default: on where the simulator scores placements)."""
    enabled = config.local_search
    if enabled is None:
        enabled = env.env.reward_mode in ("simulated", "hybrid")
    if not enabled:
        return None

    def evaluate(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, ev = env.evaluate_placements(rows)
        return ev.step_time, ev.valid

    share = config.local_search_share if config.local_search_share is not None else get_agent(config.agent).local_search_share
    return LocalSearch(problem, evaluate, tracker, rng=rng, share=share)


def _resume(agent: SearchAgent, path: Path) -> None:
    """Load the weights an earlier search saved at ``path`` into ``agent``."""
    import pickle
    import zipfile

    try:
        agent.resume(path)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError):
        raise SearchError(unreadable_policy(path)) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SearchError(
            f"cannot resume from {path}: it was saved for another problem, agent or group count ({exc})"
        ) from None


def load_policy(path: str | Path, agent: str = "hierarchical") -> OnPolicyAlgorithm:
    """Load a policy saved by :func:`search` (an SB3 model for the PPO and sequential agents)."""
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

