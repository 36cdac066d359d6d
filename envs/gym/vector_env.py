"""``BatchedPlacementVecEnv``: n one-step placement episodes evaluated in ONE simulator call.

An SB3 :class:`~stable_baselines3.common.vec_env.VecEnv` (what SB3's PPO and our agent
take), equivalent to ``DummyVecEnv([PlacementEnv(problem, ...)] * n_envs)`` but without
the per-env Python loop: ``step(actions)`` decodes the ``[n_envs, A]`` actions into
placement rows with one numpy gather and scores them with a single
:func:`envs.sim.simulator.simulate_batch` call (through the env's reward model). Every
``PlacementEnv`` episode is one step, so every step returns ``dones`` all True and the
(static) reset observation, with the usual ``terminal_observation`` in each info.

All n_envs share one :class:`envs.gym.placement_env.PlacementEnv` (:attr:`env`) and hence one
reward model: in measured/hybrid mode that means one measurer and one measurement cache.
``get_attr``/``set_attr``/``env_method`` act on that shared env (``set_attr`` changes it for
every index).

It also serves as a rollout engine without SB3: :meth:`evaluate_actions` and
:meth:`evaluate_placements` score any batch size in one call and return rewards plus the
full :class:`envs.gym.rewards.Evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from envs.gym.config import EnvConfigError, positive_int
from envs.gym.placement_env import PlacementEnv
from envs.gym.rewards import Evaluation
from envs.sim.problem import PlacementError, PlacementProblem


class BatchedPlacementVecEnv(VecEnv):
    """``n_envs`` copies of :class:`PlacementEnv` stepped by one batched evaluation.

    Args:
        problem: the compiled problem (or pass ``env=`` an existing PlacementEnv).
        n_envs: number of parallel episodes per step.
        env: a ready PlacementEnv to share (its problem and reward model are used).
        env_kwargs: PlacementEnv arguments (num_groups, max_nodes, hierarchical,
            reward_mode, reference, invalid_penalty, measurer, seed, node_ops, ...).

    Raises:
        EnvConfigError: bad arguments (as PlacementEnv), or n_envs < 1.
    """

    def __init__(self, problem: PlacementProblem | None = None, n_envs: int = 8, env: PlacementEnv | None = None,
                 **env_kwargs: Any) -> None:
        n_envs = positive_int("n_envs", n_envs)
        if env is None:
            env = PlacementEnv(problem, **env_kwargs)  # type: ignore[arg-type]
        elif problem is not None or env_kwargs:
            raise EnvConfigError("pass either env= a PlacementEnv or problem= with PlacementEnv arguments, not both")
        self.env = env
        self._actions: np.ndarray | None = None
        super().__init__(n_envs, env.observation_space, env.action_space)
        single = env.observation()
        self._stacked = {k: np.repeat(v[None], n_envs, axis=0) for k, v in single.items()}
        self.last_evaluation: Evaluation | None = None

    # ------------------------------------------------------------------ batched evaluation

    @property
    def problem(self) -> PlacementProblem:
        return self.env.problem

    def evaluate_placements(self, placements: Any) -> tuple[np.ndarray, Evaluation]:
        """Rewards [B] and the Evaluation of placement rows [B, N], in one call."""
        ev = self.env.evaluate(placements)
        self.last_evaluation = ev
        return ev.reward, ev

    def evaluate_actions(self, actions: Any) -> tuple[np.ndarray, Evaluation]:
        """Rewards [B] and the Evaluation of a batch of actions [B, A] (any B), in one call."""
        return self.evaluate_placements(self.env.decode(actions))

    # ------------------------------------------------------------------ VecEnv API

    def _observations(self) -> dict[str, np.ndarray]:
        # Copies: callers (rollout buffers, wrappers) may keep or modify what they get.
        return {k: v.copy() for k, v in self._stacked.items()}

    def reset(self) -> dict[str, np.ndarray]:
        """Reset all episodes (applying seeds given to :meth:`seed`)."""
        seed = self._seeds[0]
        if seed is not None:
            self.env.reset(seed=seed)
        self.reset_infos = [self.env.reset_info() for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return self._observations()

    def step_async(self, actions: np.ndarray) -> None:
        """Take one action per env ([n_envs, A], or the same flattened).

        Raises:
            PlacementError: another number of actions than envs (numpy's reshape error named neither).
        """
        a = np.asarray(actions)
        width = self.env.decoder.nvec.size
        if a.size != self.num_envs * width:
            count = a.shape[0] if a.ndim == 2 else a.size / width
            raise PlacementError(f"step got {count:g} action(s) for {self.num_envs} envs; expected an array of "
                                 f"shape ({self.num_envs}, {width})")
        self._actions = a

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        actions, self._actions = self._actions, None
        rewards, ev = self.evaluate_actions(actions.reshape(self.num_envs, -1))
        dones = np.ones(self.num_envs, dtype=bool)
        return self._observations(), rewards.astype(np.float32), dones, self._infos(ev)

    def _infos(self, ev: Evaluation) -> list[dict[str, Any]]:
        """The per-env info dicts of a step: the same content as ``ev.info(b, ...)`` for every b
        (docs/contracts.md), built from whole-batch conversions — one ``ev.info`` call per env
        was a tenth of a training step at 256 envs."""
        reference = self.env.reward_model.reference_time
        terminal = self.env.observation()
        names = self.problem.device_names
        step_time, fits, valid = ev.step_time.tolist(), ev.fits.tolist(), ev.valid.tolist()
        placements, peak = ev.placements.copy(), ev.peak_memory.copy()  # rows are per-env views of one copy
        over = ev.over_memory
        over_any = np.any(over > 0, axis=1).tolist()  # python bools: indexing a list is faster per env
        infos = []
        for b in range(self.num_envs):
            infos.append({
                "step_time": float(step_time[b]),
                "peak_memory": peak[b],
                "fits": bool(fits[b]),
                "valid": bool(valid[b]),
                "source": ev.source[b],
                "placement": placements[b],
                "over_memory": {names[d]: float(over[b, d]) for d in np.flatnonzero(over[b] > 0)} if over_any[b] else {},
                "reason": ev.reason[b],
                "reference_time": reference,
                "terminal_observation": terminal,
                "TimeLimit.truncated": False,
            })
        return infos

    def close(self) -> None:
        self.env.close()

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the shared env's RNG and action space at the next reset."""
        if seed is None:  # unseeded: fresh OS entropy, not numpy's global stream
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        self._seeds = [seed + i for i in range(self.num_envs)]
        return self._seeds

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.env, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        method = getattr(self.env, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [isinstance(self.env, wrapper_class) for _ in self._indices(indices)]
