"""The flat placer (ablation): no grouper, the seq2seq places every node itself.

Same network and PPO as the hierarchical agent; only the action differs
(``MultiDiscrete([D] * N)``), which :class:`HierarchicalPlacementPolicy` detects from the
action space.
"""

from __future__ import annotations

from envs.gym.vector_env import BatchedPlacementVecEnv
from envs.sim.problem import PlacementProblem


def make_flat_env(problem: PlacementProblem, num_envs: int = 256, seed: int | None = None,
                  **env_kwargs) -> BatchedPlacementVecEnv:
    """A batched whole-graph env whose action is a device per node."""
    return BatchedPlacementVecEnv(problem, n_envs=num_envs, hierarchical=False, seed=seed, **env_kwargs)
