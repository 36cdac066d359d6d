"""The hierarchical planner (grouper + seq2seq placer): network and SB3 policy."""

from placer.search.agents.hierarchical.network import PlacementNetwork, PolicyOutput
from placer.search.agents.hierarchical.policy import HierarchicalPlacementPolicy, PolicySpaceError

__all__ = ["PlacementNetwork", "PolicyOutput", "HierarchicalPlacementPolicy", "PolicySpaceError"]
