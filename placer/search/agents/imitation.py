"""Warm start by imitation: behaviour cloning of a heuristic placement.

Users care about the result, not purity: when a heuristic already gives a good placement,
a few supervised steps that raise the policy's log-probability of that placement let the
search start from it instead of from uniform noise.  The placement is turned into an action
by the environment (``PlacementEnv.encode``).
"""

from __future__ import annotations

import numpy as np
import torch


def behaviour_clone(policy, obs: dict[str, np.ndarray], action: np.ndarray, steps: int = 100,
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
