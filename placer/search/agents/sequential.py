"""The sequential agent (ablation): sb3-contrib's MaskablePPO on ``SequentialPlacementEnv``.

One node (group) is placed per step in topological order (the Placeto formulation); the
env's action mask keeps devices that would surely run out of memory out of reach.  An
episode is one complete placement, so a budget of P placements is P episodes of N steps.
"""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.vec_env import DummyVecEnv

from envs.gym.sequential_env import SequentialPlacementEnv
from envs.sim.problem import PlacementProblem
from placer.search.agents.hierarchical.ppo import tensorboard_available


def make_sequential_env(problem: PlacementProblem, num_envs: int = 4, seed: int = 0,
                        env_kwargs: dict[str, Any] | None = None) -> DummyVecEnv:
    """``num_envs`` sequential envs (seeded ``seed``, ``seed + 1``, ...) in a DummyVecEnv."""
    kwargs = dict(env_kwargs or {})

    def factory(i: int):
        return lambda: SequentialPlacementEnv(problem, seed=seed + i, **kwargs)

    return DummyVecEnv([factory(i) for i in range(int(num_envs))])


def make_sequential_model(problem: PlacementProblem, seed: int = 0, tensorboard_log: str | None = None,
                          num_envs: int = 4, learning_rate: float = 1e-3, ent_coef: float = 0.01,
                          env_kwargs: dict[str, Any] | None = None):
    """A MaskablePPO (``MultiInputPolicy``) whose rollouts are whole episodes.

    ``n_steps`` is one episode per env (at least 32 steps), so each update sees complete
    placements; ``gamma = 1`` since the telescoping reward already sums to the final score.
    """
    from sb3_contrib import MaskablePPO

    env = make_sequential_env(problem, num_envs=num_envs, seed=seed, env_kwargs=env_kwargs)
    n_steps = max(problem.num_nodes, 32)
    batch = min(256, n_steps * env.num_envs)
    return MaskablePPO(
        "MultiInputPolicy",
        env,
        learning_rate=learning_rate,
        n_steps=n_steps,
        batch_size=batch,
        n_epochs=4,
        gamma=1.0,
        gae_lambda=0.95,
        ent_coef=ent_coef,
        seed=seed,
        device="cpu",
        verbose=0,
        tensorboard_log=tensorboard_log if tensorboard_log and tensorboard_available() else None,
    )
