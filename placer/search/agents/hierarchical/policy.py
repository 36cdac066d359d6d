"""The hierarchical planner as a stable-baselines3 ``ActorCriticPolicy``.

SB3's default head for a ``MultiDiscrete`` action builds one distribution per entry (29
steps/s at 200 nodes, design.md); this policy instead wraps
:class:`~placer.search.agents.hierarchical.network.PlacementNetwork`: one batched categorical for
the grouper and a batched autoregressive decoder for the placer, with the joint
log-probability (grouper + placer) and the summed entropy returned with shape (batch,).

The same class serves the flat placer: when the action space is ``MultiDiscrete([D] *
max_nodes)`` there is no grouper and the seq2seq places every node.

Pitfalls handled (design.md): the optimizer is built after the custom heads exist; actions
from the rollout buffer arrive as float and are cast to long inside the network; the
unused default ``mlp_extractor``/``action_net``/``value_net`` are never built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule

from graphs.errors import PlacerError
from placer.search.agents.hierarchical.network import PlacementNetwork


class PolicySpaceError(PlacerError, ValueError):
    """Observation or action space that the placement policy cannot serve."""


def network_sizes(observation_space: spaces.Space, action_space: spaces.Space) -> dict[str, Any]:
    """Read (F, F_dev, M, D, G or None) from the contract's spaces, refusing anything else."""
    keys = ("node_features", "node_mask", "edge_index", "edge_mask", "device_features")
    if not isinstance(observation_space, spaces.Dict) or any(k not in observation_space.spaces for k in keys):
        raise PolicySpaceError(
            f"the placement policy needs a Dict observation with keys {list(keys)} (docs/contracts.md); "
            f"got {observation_space}"
        )
    if not isinstance(action_space, spaces.MultiDiscrete):
        raise PolicySpaceError(f"the placement policy needs a MultiDiscrete action; got {action_space}")
    m, f = observation_space["node_features"].shape
    d, f_dev = observation_space["device_features"].shape
    nvec = np.asarray(action_space.nvec).reshape(-1)
    if len(nvec) == m:
        if not np.all(nvec == d):
            raise PolicySpaceError(f"flat action must be MultiDiscrete([{d}] * {m}); got nvec {nvec[:5]}...")
        groups = None
    elif len(nvec) > m:
        groups = len(nvec) - m
        if not (np.all(nvec[:m] == groups) and np.all(nvec[m:] == d)):
            raise PolicySpaceError(
                f"hierarchical action must be MultiDiscrete([{groups}] * {m} + [{d}] * {groups}); got another nvec"
            )
    else:
        raise PolicySpaceError(f"action has {len(nvec)} entries, fewer than the {m} nodes of the observation")
    return {"node_feature_dim": int(f), "device_feature_dim": int(f_dev), "max_nodes": int(m),
            "num_devices": int(d), "num_groups": groups}


class HierarchicalPlacementPolicy(ActorCriticPolicy):
    """Grouper + seq2seq placer (+ value head) for SB3's PPO.

    Args:
        observation_space, action_space, lr_schedule: as for every SB3 policy.
        hidden: width of the network's embeddings.
        **kwargs: passed to :class:`ActorCriticPolicy` (optimizer_class, optimizer_kwargs, ...).
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule: Schedule,
                 hidden: int = 16, **kwargs: Any) -> None:
        self.sizes = network_sizes(observation_space, action_space)
        self.hidden = int(hidden)
        kwargs.pop("net_arch", None)  # the network's shape is fixed by the planner, not an MLP spec
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        self.net = PlacementNetwork(hidden=self.hidden, **self.sizes)
        self.action_net = None  # SB3's per-entry MultiDiscrete head: replaced by self.net
        self.value_net = None
        # Built last, so it sees the custom heads' parameters.
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(hidden=self.hidden)
        data.pop("net_arch", None)
        return data

    @property
    def hierarchical(self) -> bool:
        return self.net.hierarchical

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False):
        """Sample actions: ``(actions [B, A], values [B, 1], log_prob [B])``."""
        out = self.net(obs, deterministic=deterministic)
        return out.actions, out.value.unsqueeze(-1), out.log_prob

    def evaluate_actions(self, obs: dict[str, torch.Tensor], actions: torch.Tensor):
        """Re-evaluate buffer actions by teacher forcing: ``(values [B, 1], log_prob [B], entropy [B])``."""
        out = self.net(obs, actions=actions)
        return out.value.unsqueeze(-1), out.log_prob, out.entropy

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net.value(obs).unsqueeze(-1)

    def _predict(self, observation: dict[str, torch.Tensor], deterministic: bool = False) -> torch.Tensor:
        return self.net(observation, deterministic=deterministic).actions

    def get_distribution(self, obs):  # noqa: D401 - SB3 API
        """Not available: the placer's distribution is autoregressive, so there is no single
        distribution object; use :meth:`forward` to sample and :meth:`evaluate_actions` to score."""
        raise PolicySpaceError(
            "HierarchicalPlacementPolicy has no single action distribution (the placer decodes "
            "autoregressively); use forward() to sample and evaluate_actions() for log-probabilities"
        )

    def action_log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """[B] log-probability of ``actions`` (used by imitation and the tests)."""
        return self.net(obs, actions=actions).log_prob
