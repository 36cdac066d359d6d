"""The one interface every search agent has (:class:`SearchAgent`) and what it is built from.

The registry (:mod:`placer.search.agents.registry`) maps names to factories
``AgentContext -> SearchAgent``; :func:`placer.search.search.search` drives whatever it gets
through this interface only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from envs.gym.vector_env import BatchedPlacementVecEnv
    from envs.sim.problem import PlacementProblem
    from placer.search.agents.hierarchical.ppo import PPOConfig
    from placer.search.agents.reinforce import ReinforceConfig
    from placer.search.local_search import LocalSearch
    from placer.search.tracker import BestTracker


class SearchAgent(Protocol):
    """What :func:`~placer.search.search.search` needs of an agent, whatever it learns with."""

    def resume(self, path: Path) -> None:
        """Load the weights an earlier search of the same problem saved at ``path``."""

    def imitate(self, tracker: BestTracker, steps: int, lr: float) -> None:
        """Behaviour-clone the tracker's best placement so far (the best heuristic seed)."""

    def learn(self, tracker: BestTracker, improver: LocalSearch | None) -> str:
        """Propose placements until ``tracker`` stops the search; return the stop reason."""

    def save(self, path: Path) -> None:
        """Write the trained weights to ``path``."""


@dataclass(frozen=True)
class AgentContext:
    """What a factory builds an agent from.

    Attributes:
        problem: the problem searched.
        env: the batched environment placements are evaluated in (see
            :attr:`AgentEntry.batched` for agents that only score seeds there).
        seed: seeds the agent's network, its SB3 model and its environments.
        rng: the search's numpy generator; an agent draws its own randomness from it
            (never from numpy's global state).
        num_envs: placements per batch.
        env_kwargs: more environment arguments (reward mode, measurer, ...).
        tensorboard_log: TensorBoard directory (PPO agents, when tensorboard imports).
        ppo: PPO hyper-parameters (None: defaults).
        reinforce: REINFORCE hyper-parameters (None: defaults).
        pretrained: start from the policy shipped with the package, for an agent that has
            one (``moves``: :data:`placer.search.agents.moves.PRETRAINED_PATH`), or from the
            policy file given (True, the default); False: fresh weights.
    """

    problem: PlacementProblem
    env: BatchedPlacementVecEnv
    seed: int
    rng: np.random.Generator
    num_envs: int
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tensorboard_log: str | None = None
    ppo: PPOConfig | None = None
    reinforce: ReinforceConfig | None = None
    pretrained: bool | Path = True
