"""Warm start by imitation: behaviour cloning of a heuristic placement.

Users care about the result, not purity: when a heuristic already gives a good placement,
a few supervised steps that raise the policy's log-probability of that placement let the
search start from it instead of from uniform noise.
"""

from __future__ import annotations

import numpy as np
import torch

from graphs.errors import PlacerError


class ImitationError(PlacerError, ValueError):
    """A placement that cannot be turned into an action of the policy."""


def placement_to_action(row: np.ndarray, num_devices: int, num_groups: int | None, max_nodes: int | None = None) -> np.ndarray:
    """An env action that reproduces the node→device ``row`` exactly.

    Flat: the row itself (padded).  Hierarchical (needs ``num_groups >= num_devices``): the
    groups are split evenly among devices, group ``g`` going to device ``g % D``; a node on
    device ``d`` joins one of ``d``'s groups by its topological position, so consecutive nodes
    share groups (which is how a grouper would cluster them).
    """
    row = np.asarray(row, dtype=np.int64).reshape(-1)
    n = row.shape[0]
    m = n if max_nodes is None else int(max_nodes)
    if num_groups is None:
        out = np.zeros(m, dtype=np.int64)
        out[:n] = row
        return out
    g, d = int(num_groups), int(num_devices)
    if g < d:
        raise ImitationError(f"imitation needs at least as many groups as devices; got {g} groups for {d} devices")
    per_device = g // d
    slot = np.minimum((np.arange(n) * per_device) // max(n, 1), per_device - 1)
    groups = np.zeros(m, dtype=np.int64)
    groups[:n] = row + d * slot
    devices = np.arange(g, dtype=np.int64) % d
    return np.concatenate([groups, devices])


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
