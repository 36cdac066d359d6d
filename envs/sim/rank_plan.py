"""The stages and transfers of a placement over ranks, as the multi-process runtime cuts them
(``envs/runtime/split.py:split_by_rank``), computed on the placement graph: the plan that the
rank simulator (:mod:`envs.sim.ranks`) runs, and the runtime's refusals, without importing
the runtime or torch.fx."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from envs.sim.rank_costs import RankSimError
from envs.sim.stages import cut_stages, refused_handover
from graphs.placement_graph import kept_whole_runs

__all__ = ["RankTransfer", "RankStage", "RankPlan", "rank_plan", "compute_nodes", "real_inputs"]


@dataclass(frozen=True)
class RankTransfer:
    """A value crossing ranks (as ``envs.runtime.split.Transfer``; local hand-overs included)."""

    value: str
    src_stage: int
    src_rank: int
    dst_rank: int
    dst_stage: int


@dataclass(frozen=True)
class RankStage:
    """One stage: ``rank`` runs ``nodes`` in one call; ``outputs`` are the values other stages read."""

    index: int
    rank: int
    nodes: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class RankPlan:
    """The stages and transfers of a placement over ranks (what ``split_by_rank`` builds)."""

    stages: tuple[RankStage, ...]
    transfers: tuple[RankTransfer, ...]
    output_rank: int
    world_size: int
    refusal: str | None = None  # why the runtime refuses this cut (envs.sim.stages.refused_handover)

    def stages_of(self, rank: int) -> list[RankStage]:
        """``rank``'s stages in schedule order."""
        return [s for s in self.stages if s.rank == rank]


def compute_nodes(graph: nx.DiGraph) -> tuple[list[str], str | None]:
    """The nodes the ranks compute (not placeholders, not the output), in graph order, and the output node."""
    order, out = [], None
    for n, d in graph.nodes(data=True):
        op = d.get("op")
        if op == "output":
            out = n
        elif op != "placeholder":
            order.append(n)
    return order, out


def real_inputs(graph: nx.DiGraph, n: str) -> list[str]:
    """The inputs of ``n`` that some rank computes (placeholders are on every rank)."""
    return [a for a in graph.predecessors(n) if graph.nodes[a].get("op") != "placeholder"]


def rank_plan(graph: nx.DiGraph, ranks: Mapping[str, int], world_size: int,
              output_rank: int | None = None) -> RankPlan:
    """Stages and transfers of ``graph`` placed by ``ranks`` (``{node: rank}``), as the runtime cuts them.

    Mirrors ``envs/runtime/split.py:split_by_rank`` on the placement graph (same node
    names, order and inputs as the fx graph): every compute node must be placed; the
    output is gathered on ``output_rank`` (default: the output node's rank, else 0).

    Raises:
        RankSimError: an unplaced compute node or a rank outside ``[0, world_size)``.
    """
    order, out = compute_nodes(graph)
    missing = [n for n in order if n not in ranks]
    if missing:
        raise RankSimError(f"{len(missing)} compute node(s) have no rank, e.g. {missing[:3]}; "
                           "expected every non-placeholder node of the graph placed")
    for n in order:
        r = ranks[n]
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < world_size:
            raise RankSimError(f"node {n!r} is placed on rank {r!r}; expected an integer in [0, {world_size})")
    if output_rank is None:
        output_rank = int(ranks[out]) if out is not None and out in ranks else 0
    rank = {n: int(ranks[n]) for n in order}
    shared_refusal = _settle_shared_state(graph, order, rank)
    inputs = {n: real_inputs(graph, n) for n in order}
    out_inputs = real_inputs(graph, out) if out is not None else []
    stage_of = cut_stages(order, inputs, rank, out_inputs, output_rank, kept_whole_runs(graph))
    num = max(stage_of.values(), default=-1) + 1
    members: list[list[str]] = [[] for _ in range(num)]
    for n in order:
        members[stage_of[n]].append(n)
    # split.py: first consumer stage per (value, reading rank); the output node is stage `num`.
    first_use: dict[tuple[str, int], int] = {}
    needed: set[str] = set()
    readers = [(n, stage_of[n], rank[n], inputs[n]) for n in order] + [(out, num, output_rank, out_inputs)]
    for _, s, r, ins in readers:
        for a in ins:
            if stage_of[a] == s:
                continue
            key = (a, r)
            first_use[key] = min(first_use.get(key, s), s)
            needed.add(a)
    stages = tuple(RankStage(i, rank[m[0]], tuple(m), tuple(x for x in m if x in needed))
                   for i, m in enumerate(members))
    pos = {v: (stage_of[v], stages[stage_of[v]].outputs.index(v)) for v in needed}
    transfers = sorted((RankTransfer(v, stage_of[v], rank[v], r, s) for (v, r), s in first_use.items()),
                       key=lambda t: (pos[t.value], t.dst_rank))
    updated_later = {n: str(graph.nodes[n]["updated_later"]) for n in order if "updated_later" in graph.nodes[n]}
    refusal = shared_refusal or refused_handover(
        transfers, updated_later, {n: bool(graph.nodes[n].get("requires_grad", True)) for n in updated_later})
    return RankPlan(stages, tuple(transfers), int(output_rank), int(world_size), refusal)


def _settle_shared_state(graph: nx.DiGraph, order: Sequence[str], rank: dict[str, int]) -> str | None:
    """Move state-reading nodes as ``split.py:_settle_shared_state`` does, in place on ``rank``;
    return why the runtime refuses the placement, if it does.

    A ``get_attr`` node whose tensor an op updates in place goes to that op's rank (state
    follows its update); then a ``get_attr`` of a parameter that a module owns (a tied weight,
    ``tied_param_bytes``) goes to the owner's rank, and a module's nodes, or two modules
    sharing a parameter, on two ranks are refused. The placement graph names the first node
    using a tensor as its owner; the runtime, the module: where a ``get_attr`` came first, the
    module's rank is the one that holds it.
    """
    ops = {n: graph.nodes[n].get("op") for n in order}
    for n in order:
        writer = graph.nodes[n].get("updated_later")
        if ops[n] == "get_attr" and writer in rank:
            rank[n] = rank[writer]
    for n in order:
        for owner in graph.nodes[n].get("tied_param_bytes") or {}:
            if owner not in rank:
                continue
            if ops[n] == "get_attr":
                rank[n] = rank[owner]
            elif ops[owner] == "get_attr":
                rank[owner] = rank[n]
            elif rank[owner] != rank[n]:
                return (f"node {n!r} uses a parameter or buffer on rank {rank[n]} that node {owner!r} uses on rank "
                        f"{rank[owner]}; nodes calling one module must be placed on one rank (group the graph first)")
    return None
