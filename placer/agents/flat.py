"""The flat placer (ablation): no grouper, the seq2seq places every node itself.

Same network and PPO as the hierarchical agent; only the action differs
(``MultiDiscrete([D] * N)``), which :class:`HierarchicalPlacementPolicy` detects from the
action space.
"""

from __future__ import annotations

from envs.problem import PlacementProblem
from placer.agents.common.sim_vec_env import SimulatedPlacementVecEnv


def make_flat_env(problem: PlacementProblem, num_envs: int = 256) -> SimulatedPlacementVecEnv:
    """A batched whole-graph env whose action is a device per node."""
    return SimulatedPlacementVecEnv(problem, num_envs=num_envs, num_groups=None)
