"""The agents' rollout engine: a stable-baselines3 ``VecEnv`` over the batched simulator.

Each of the ``num_envs`` sub-environments is a one-step episode that places the whole
graph (the ``PlacementEnv`` formulation of docs/contracts.md); a ``step`` simulates all
``num_envs`` placements in **one** :func:`envs.simulator.simulate_batch` call, which is what
makes thousands of evaluated placements per second possible.

Reward: ``-sqrt(step_time / reference_time)`` (the design's ``-sqrt`` runtime, normalised by
a reference placement so rewards sit near -1 whatever the model); a placement that does
not fit gets ``invalid_penalty`` minus the fraction of the cluster's memory it overflows
(so the policy is still pushed toward fitting when nearly every random placement overflows).
``info`` carries ``step_time``, ``peak_memory``, ``fits``, ``source`` and ``placement``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from envs.problem import PlacementProblem
from envs.simulator import simulate_batch
from graphs.errors import PlacerError
from placer.agents.common.observation import observation, observation_space


class AgentEnvError(PlacerError, ValueError):
    """The agent's environment was asked for with arguments that cannot work."""


def reference_step_time(problem: PlacementProblem) -> float:
    """Step time of the fastest single-device placement that fits (fastest overall if none fits)."""
    rows = np.repeat(np.arange(problem.num_devices)[:, None], problem.num_nodes, axis=1)
    res = simulate_batch(problem, rows)
    times = np.where(res.fits, res.step_time, np.inf)
    best = float(times.min()) if np.isfinite(times).any() else float(res.step_time.min())
    return max(best, 1e-12)


def rewards_for(
    step_time: np.ndarray, fits: np.ndarray, over_memory: np.ndarray, capacity: np.ndarray,
    reference_time: float, invalid_penalty: float,
) -> np.ndarray:
    """Rewards of a batch of simulated placements (see the module docstring)."""
    r = -np.sqrt(np.asarray(step_time, dtype=np.float64) / reference_time)
    overflow = np.asarray(over_memory).sum(-1) / max(float(np.sum(capacity)), 1.0)
    penalty = invalid_penalty - np.minimum(overflow, 1.0)
    return np.where(fits, r, penalty).astype(np.float32)


class SimulatedPlacementVecEnv(VecEnv):
    """``num_envs`` whole-graph placement episodes, simulated in one batched call per step.

    Args:
        problem: the compiled problem (an op graph or a group graph).
        num_envs: placements evaluated per step.
        num_groups: G of the hierarchical action; ``None`` for the flat action (a device per node).
        reference_time: step time the reward is normalised by; default :func:`reference_step_time`.
        invalid_penalty: reward of a placement that does not fit (before the overflow term).
    """

    def __init__(
        self,
        problem: PlacementProblem,
        num_envs: int = 256,
        num_groups: int | None = None,
        reference_time: float | None = None,
        invalid_penalty: float = -3.0,
    ) -> None:
        if int(num_envs) < 1:
            raise AgentEnvError(f"num_envs must be a positive integer, got {num_envs!r}")
        if num_groups is not None and int(num_groups) < 1:
            raise AgentEnvError(f"num_groups must be a positive integer or None (flat), got {num_groups!r}")
        self.problem = problem
        self.num_groups = None if num_groups is None else int(num_groups)
        n, d = problem.num_nodes, problem.num_devices
        obs_space = observation_space(n, max(problem.num_edges, 1), d)
        if self.num_groups is None:
            act_space = spaces.MultiDiscrete([d] * n)
        else:
            act_space = spaces.MultiDiscrete([self.num_groups] * n + [d] * self.num_groups)
        self.render_mode = None  # set before VecEnv.__init__, which warns when it is missing
        super().__init__(int(num_envs), obs_space, act_space)
        self.reference_time = float(reference_time) if reference_time else reference_step_time(problem)
        self.invalid_penalty = float(invalid_penalty)
        one = observation(problem)
        self._obs = {k: np.repeat(v[None], self.num_envs, axis=0) for k, v in one.items()}
        self._actions: np.ndarray | None = None

    # -- helpers the agents use directly -----------------------------------
    def placements_from_actions(self, actions: np.ndarray) -> np.ndarray:
        """Device per node [B, N] for env actions [B, A]."""
        a = np.asarray(actions).astype(np.int64).reshape(len(actions), -1)
        n = self.problem.num_nodes
        if self.num_groups is None:
            return a[:, :n]
        groups = np.clip(a[:, :n], 0, self.num_groups - 1)
        return np.take_along_axis(a[:, n:], groups, axis=1)

    def evaluate(self, placements: np.ndarray) -> tuple[np.ndarray, Any]:
        """Rewards and the :class:`SimResult` of placements [B, N]."""
        res = simulate_batch(self.problem, placements)
        rew = rewards_for(res.step_time, res.fits, res.over_memory, self.problem.memory_capacity,
                          self.reference_time, self.invalid_penalty)
        return rew, res

    # -- VecEnv API ---------------------------------------------------------
    def reset(self):
        return {k: v.copy() for k, v in self._obs.items()}

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        placements = self.placements_from_actions(self._actions)
        rewards, res = self.evaluate(placements)
        dones = np.ones(self.num_envs, dtype=bool)
        obs = {k: v.copy() for k, v in self._obs.items()}
        infos = [
            {
                "step_time": float(res.step_time[i]),
                "peak_memory": res.peak_memory[i],
                "fits": bool(res.fits[i]),
                "source": "simulated" if self.problem.simulated else "measured",
                "placement": placements[i],
                "terminal_observation": {k: v[i] for k, v in obs.items()},
            }
            for i in range(self.num_envs)
        ]
        return obs, rewards, dones, infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list:
        return [getattr(self, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list:
        return [getattr(self, method_name)(*args, **kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def _indices(self, indices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices
