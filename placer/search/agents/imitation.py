"""Warm start by imitation: behaviour cloning of a heuristic placement.

Users care about the result, not purity: when a heuristic already gives a good placement,
a few supervised steps that raise the policy's log-probability of that placement let the
search start from it instead of from uniform noise.  The placement is turned into an action
by the environment (``PlacementEnv.encode``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from envs.gym.vector_env import BatchedPlacementVecEnv
from placer.search.tracker import BestTracker


class ImitablePolicy(Protocol):
    """A policy that scores given actions: the SB3 placement policy, or a bare network wrapped to be one."""

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def action_log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor: ...


def behaviour_clone(policy: ImitablePolicy, obs: dict[str, np.ndarray], action: np.ndarray, steps: int = 100,
                    lr: float = 3e-3) -> list[float]:
    """Raise ``policy``'s log-probability of ``action`` for ``obs`` (one unbatched observation).

    ``policy`` has ``action_log_prob(obs_tensors, actions) -> [B]`` (the placement policies
    do).  Returns the per-entry negative log-likelihood after each step.
    """
    device = next(policy.parameters()).device
    t_obs = {k: torch.as_tensor(np.asarray(v)[None], device=device) for k, v in obs.items()}
    t_act = torch.as_tensor(np.asarray(action)[None], device=device)
    optim = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    entries = float(t_act.shape[1])
    for _ in range(int(steps)):
        loss = -policy.action_log_prob(t_obs, t_act).mean() / entries
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    return losses


def imitate_best(policy: ImitablePolicy, env: BatchedPlacementVecEnv, tracker: BestTracker, steps: int, lr: float) -> None:
    """Behaviour-clone the best placement ``tracker`` has seen (the best heuristic seed), if any.

    ``policy`` is an SB3 placement policy or anything with the same ``action_log_prob``.
    """
    if tracker.best_row is None:
        return
    obs = {k: v[0] for k, v in env.reset().items()}
    action = env.env.encode(tracker.best_row)
    behaviour_clone(policy, obs, action, steps=steps, lr=lr)
