"""Placements written by hand for the apply, check and capture tests (no search needed)."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx


def alternating_placement(graph: nx.DiGraph, devices: Sequence[str] = ("gpu0", "gpu1")) -> dict[str, str]:
    """Every node of ``graph`` on the next of ``devices`` in turn, in the graph's node order: with
    the default two devices every edge between consecutive nodes is cut, the most transfers a
    placement over them can have (virtual device names: map them with ``real_devices``)."""
    return {n: devices[i % len(devices)] for i, n in enumerate(graph.nodes)}
