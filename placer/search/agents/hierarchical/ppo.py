"""PPO (stable-baselines3) with the hierarchical placement policy.

Every episode is one step, so each rollout of ``n_steps`` on ``num_envs`` environments is
``n_steps * num_envs`` evaluated placements; GAE then reduces to ``reward - value``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from placer.search.agents.hierarchical.policy import HierarchicalPlacementPolicy
from placer.search.agents.hierarchical.rollout_buffer import SharedObservationRolloutBuffer


@dataclass
class PPOConfig:
    """Hyper-parameters of the PPO agents (defaults tuned for speed on a small CPU).

    Speed notes (200-node graph, 60 groups, one CPU thread): every sample is learned from
    once (``n_epochs=1``; a second epoch costs a whole extra forward+backward per sample);
    minibatches of 128 keep the LSTMs' training pass in cache (its cost per sample doubles at
    512); ``hidden=16`` cuts the oneDNN LSTM backward, the largest single cost, ~3.5x
    against 32 with no loss of search quality seen on the 200-node benchmark graph.

    Attributes:
        learning_rate: float, or a schedule ``progress_remaining -> lr`` (SB3 convention).
        n_steps: vectorised steps per rollout (placements per rollout = n_steps * num_envs).
        batch_size: minibatch size of the PPO update.
        n_epochs: passes over each rollout.
        ent_coef: entropy bonus (the entropy is summed over hundreds of categoricals, so small).
        clip_range: PPO clip.
        hidden: embedding width of the network.
        max_grad_norm: gradient clipping.
        extra: more keyword arguments for :class:`stable_baselines3.PPO`.
    """

    learning_rate: float | Callable[[float], float] = 3e-3
    n_steps: int = 1
    batch_size: int = 128
    n_epochs: int = 1
    ent_coef: float = 1e-4
    clip_range: float = 0.2
    hidden: int = 16
    max_grad_norm: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


def tensorboard_available() -> bool:
    """SB3 writes TensorBoard logs only when the tensorboard package imports."""
    return importlib.util.find_spec("tensorboard") is not None


def make_ppo(env: VecEnv, config: PPOConfig | None = None, seed: int | None = 0,
             tensorboard_log: str | None = None, device: str = "cpu",
             rng: np.random.Generator | None = None) -> PPO:
    """A PPO model with :class:`HierarchicalPlacementPolicy` on ``env`` (hierarchical or flat action).

    Its rollout buffer stores the (shared) observation once
    (:class:`~placer.search.agents.hierarchical.rollout_buffer.SharedObservationRolloutBuffer`)
    and shuffles minibatches with ``rng`` (default: seeded from ``seed``);
    ``config.extra`` may override that like any other PPO argument.
    """
    config = config or PPOConfig()
    batch = min(config.batch_size, config.n_steps * env.num_envs)
    buffer: dict[str, Any] = {"rollout_buffer_class": SharedObservationRolloutBuffer}
    if "rollout_buffer_class" not in config.extra:
        buffer["rollout_buffer_kwargs"] = {"rng": rng if rng is not None else np.random.default_rng(seed)}
    return PPO(
        HierarchicalPlacementPolicy,
        env,
        learning_rate=config.learning_rate,
        n_steps=config.n_steps,
        batch_size=batch,
        n_epochs=config.n_epochs,
        gamma=1.0,
        gae_lambda=1.0,
        ent_coef=config.ent_coef,
        clip_range=config.clip_range,
        max_grad_norm=config.max_grad_norm,
        policy_kwargs={"hidden": config.hidden},
        tensorboard_log=tensorboard_log if tensorboard_log and tensorboard_available() else None,
        seed=seed,
        device=device,
        verbose=0,
        **{**buffer, **config.extra},
    )
