"""The rank simulator's placement-independent inputs (:mod:`envs.sim.ranks`): each op's
profiled costs per rank, the links between ranks, the optimizer's fixed cost, a placement
mapped to rank indices, and the tensors per value that make its messages.

Compiled once per graph and cluster, they stand apart from the programs built per placement
and from the event loop that runs them, so that the reference simulator, the batch simulator,
the lower bound and the calibration share one compilation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.sim.rank_costs import RankSimError

__all__ = ["value_leaves"]


@dataclass(frozen=True)
class _OpCost:
    fwd: float
    bwd: float
    opt: float
    out_bytes: float
    grad: bool
    leaves: int


def _op_costs(graph: nx.DiGraph, kinds: Sequence[str], leaves: Mapping[str, int] | None) -> dict[str, list[_OpCost]]:
    """Per node, per rank: profiled times of the rank's device kind (0 when the kind was not profiled)."""
    out: dict[str, list[_OpCost]] = {}
    for n, d in graph.nodes(data=True):
        # A value of k tensors is k messages; a non-tensor value (a size, an int) none: the
        # receiver already knows it (runtime.py: LeafMeta.const, _receive).
        nbytes = d.get("out_bytes", 0)
        k = int(leaves[n]) if leaves is not None and n in leaves else (1 if nbytes > 0 else 0)
        out[n] = [_OpCost(float(d.get("fwd_time", {}).get(kind, 0.0)), float(d.get("bwd_time", {}).get(kind, 0.0)),
                          float(d.get("opt_time", {}).get(kind, 0.0)), float(d.get("out_bytes", 0)),
                          bool(d.get("requires_grad", False)), k) for kind in kinds]
    return out


def _optimizer_fixed(graph: nx.DiGraph, kind: str) -> float:
    info = graph.graph.get("profile_info", {}).get(kind, {})
    return float(info.get("optimizer_fixed", 0.0) or 0.0)


def _links(cluster: Cluster) -> tuple[np.ndarray, np.ndarray]:
    names = cluster.device_names
    n = len(names)
    lat, bw = np.zeros((n, n)), np.full((n, n), np.inf)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                link = cluster.link(a, b)
                lat[i, j], bw[i, j] = link.latency_s, link.bandwidth_Bps
    return lat, bw


def _ranks_of(placement: Mapping[str, str | int], cluster: Cluster) -> dict[str, int]:
    names = cluster.device_names
    index = {d: i for i, d in enumerate(names)}
    out = {}
    for n, d in placement.items():
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
            if not 0 <= d < len(names):
                raise RankSimError(f"node {n!r} is placed on device index {d}; the cluster has {len(names)} devices")
            out[n] = int(d)
        elif d in index:
            out[n] = index[d]
        else:
            raise RankSimError(f"node {n!r} is placed on {d!r}, which is not one of the ranks {names}")
    return out


@dataclass(frozen=True)
class _Compiled:
    """What does not depend on the placement: op costs per rank, links, the optimizer's fixed cost."""

    graph: nx.DiGraph
    cost: dict[str, list[_OpCost]]
    lat: np.ndarray
    bw: np.ndarray
    opt_fixed: tuple[float, ...]
    cluster: Cluster
    templates: dict = field(default_factory=dict)  # placement -> (plan, programs, messages, channels)


def _compile(graph: nx.DiGraph, cluster: Cluster, leaves: Mapping[str, int] | None) -> _Compiled:
    if not isinstance(graph, nx.DiGraph):
        raise RankSimError(f"expected the placement graph (networkx.DiGraph), got {type(graph).__name__}")
    kinds = [d.kind for d in cluster.devices]
    lat, bw = _links(cluster)
    return _Compiled(graph, _op_costs(graph, kinds, leaves), lat, bw,
                     tuple(_optimizer_fixed(graph, k) for k in kinds), cluster)


def value_leaves(gm: Any) -> dict[str, int]:
    """Tensors in each node's value of a captured ``torch.fx.GraphModule`` (its shape
    metadata): the runtime sends one message per tensor and none for a constant, and the
    placement graph keeps only the total bytes. Pass it as ``leaves``."""
    from graphs.placement_graph import tensor_outputs

    return {n.name: len(tensor_outputs(n)) for n in gm.graph.nodes if n.op != "output"}
