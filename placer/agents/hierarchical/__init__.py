"""The hierarchical planner (grouper + seq2seq placer): network and SB3 policy."""

from placer.agents.hierarchical.network import PlacementNetwork, PolicyOutput
from placer.agents.hierarchical.policy import HierarchicalPlacementPolicy, PolicySpaceError

__all__ = ["PlacementNetwork", "PolicyOutput", "HierarchicalPlacementPolicy", "PolicySpaceError"]
