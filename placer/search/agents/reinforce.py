"""REINFORCE with a moving-average baseline (the hierarchical planner's published trainer).

A readable CleanRL-style loop over the same :class:`PlacementNetwork` the PPO policy wraps:
sample a batch of placements, simulate them in one call, push up the log-probability of
those better than the moving average of past rewards, add an entropy bonus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from envs.gym.vector_env import BatchedPlacementVecEnv
from placer.search.agents.hierarchical.network import PlacementNetwork
from placer.search.agents.hierarchical.policy import network_sizes
from placer.search.agents.imitation import imitate_best
from placer.search.local_search import LocalSearch
from placer.search.tracker import BestTracker


@dataclass
class ReinforceConfig:
    """Hyper-parameters of REINFORCE.

    Attributes:
        learning_rate: Adam step size.
        baseline_decay: weight of the old value in the moving-average baseline.
        ent_coef: entropy bonus.
        hidden: embedding width.
        max_grad_norm: gradient clipping.
    """

    learning_rate: float = 3e-3
    baseline_decay: float = 0.9
    ent_coef: float = 1e-4
    hidden: int = 16
    max_grad_norm: float = 0.5


def make_network(env: BatchedPlacementVecEnv, config: ReinforceConfig) -> PlacementNetwork:
    """The placement network sized for ``env``'s spaces."""
    return PlacementNetwork(hidden=config.hidden, **network_sizes(env.observation_space, env.action_space))


def train_reinforce(env: BatchedPlacementVecEnv, net: PlacementNetwork, tracker: BestTracker,
                    config: ReinforceConfig | None = None, improver: LocalSearch | None = None) -> None:
    """Train until ``tracker`` raises :class:`~placer.search.tracker.StopSearch`.

    Each iteration evaluates ``env.num_envs`` placements (fewer when the evaluation budget
    has less left); an ``improver`` (:class:`placer.search.local_search.LocalSearch`) runs
    its share of evaluations after each.
    """
    config = config or ReinforceConfig()
    optim = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    full_obs = {k: torch.as_tensor(v) for k, v in env.reset().items()}
    baseline: float | None = None
    while True:
        left = tracker.remaining_placements()
        batch = env.num_envs if left is None else max(1, min(env.num_envs, left))
        obs = {k: v[:batch] for k, v in full_obs.items()}
        with torch.no_grad():
            actions = net(obs).actions
        rewards, ev = env.evaluate_actions(actions.numpy())
        rewards_t = torch.as_tensor(rewards, dtype=torch.float32)
        mean_r = float(rewards.mean())
        baseline = mean_r if baseline is None else config.baseline_decay * baseline + (1 - config.baseline_decay) * mean_r
        out = net(obs, actions=actions)
        advantage = rewards_t - baseline
        loss = -(advantage * out.log_prob).mean() - config.ent_coef * out.entropy.mean()
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
        optim.step()
        # Raises StopSearch when the budget, a plateau or the callback ends the search.
        tracker.record(ev.placements, ev.step_time, ev.valid, next_batch=1 if left is not None else batch)
        if improver is not None:
            improver.after_policy_batch(len(rewards), next_batch=1)



class _NetAsPolicy(torch.nn.Module):
    """Gives a bare :class:`PlacementNetwork` the ``action_log_prob`` of the SB3 policy (for imitation)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def action_log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        return self.net(obs, actions=actions).log_prob


class ReinforceAgent:
    """REINFORCE on the batched environment, as a :class:`~placer.search.agents.registry.SearchAgent`."""

    def __init__(self, env: BatchedPlacementVecEnv, config: ReinforceConfig | None = None) -> None:
        self.env = env
        self.config = config or ReinforceConfig()
        self.net = make_network(env, self.config)

    def resume(self, path: Path) -> None:
        """Load a state dict saved by :meth:`save`."""
        self.net.load_state_dict(torch.load(path, map_location="cpu"))

    def imitate(self, tracker: BestTracker, steps: int, lr: float) -> None:
        """Behaviour-clone the tracker's best placement into the network."""
        imitate_best(_NetAsPolicy(self.net), self.env, tracker, steps, lr)

    def learn(self, tracker: BestTracker, improver: LocalSearch | None) -> str:
        """Train until the tracker raises :class:`~placer.search.tracker.StopSearch`."""
        train_reinforce(self.env, self.net, tracker, self.config, improver=improver)
        return "finished"

    def save(self, path: Path) -> None:
        """Write the network's state dict (``torch.save``)."""
        torch.save(self.net.state_dict(), path)
