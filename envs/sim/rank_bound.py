"""The lower bound of a step over ranks (:func:`rank_lower_bound`): seconds no placement of a
graph over a rank cluster can beat under the rules R1-R7 of :mod:`envs.sim.ranks`.

A bound is read off the compiled inputs alone (no placement, no event loop), so it stands
apart from the simulator; the search's reports and the batch simulator use it to state how
far a placement is from the best any could do.
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx

from envs.hardware.cluster import Cluster
from envs.sim.rank_compile import _compile, _Compiled, _OpCost
from envs.sim.rank_costs import RankCosts
from envs.sim.rank_plan import compute_nodes, real_inputs

__all__ = ["rank_lower_bound"]


def _grad_path_nodes(graph: nx.DiGraph, cost: Mapping[str, list[_OpCost]]) -> set[str]:
    """Compute nodes with a path of gradient-requiring tensor values to the model output: R6
    runs their backward under every placement (their stage always has an output needing a
    gradient), after the backward of their consumers on the path (a remote consumer's
    gradient is a message: a value of no tensors sends none, so it does not count)."""
    order, out = compute_nodes(graph)
    if out is None:
        return set()
    grad = {n for n in order if cost[n][0].grad and cost[n][0].leaves > 0}
    found: set[str] = set()
    todo = [a for a in real_inputs(graph, out) if a in grad]
    while todo:
        n = todo.pop()
        if n in found:
            continue
        found.add(n)
        todo.extend(a for a in real_inputs(graph, n) if a in grad and a not in found)
    return found


def _lower_bound(c: _Compiled, costs: RankCosts) -> float:
    """Seconds no placement over ``c``'s ranks can beat under rules R1-R7 (see :func:`rank_lower_bound`)."""
    graph, W = c.graph, c.cluster.num_devices
    order, out = compute_nodes(graph)
    if not order:
        return float(costs.loss_s + costs.step_s)
    k = costs.op_scale
    on_path = _grad_path_nodes(graph, c.cost)
    fwd = {n: k * min(x.fwd for x in c.cost[n]) for n in order}
    bwd = {n: k * min(x.bwd for x in c.cost[n]) if n in on_path else 0.0 for n in order}
    opt = {n: k * min(x.opt for x in c.cost[n]) for n in order}
    # A rank pays the optimizer's fixed cost if it holds an op with an update on it (R7).
    owners = any(min(x.opt for x in c.cost[n]) > 0 or graph.nodes[n].get("param_bytes", 0) > 0 for n in order)
    # Work: the step lasts as long as its busiest rank, at least the ranks' mean busy time. Every
    # op's forward and update runs once on some rank, and the backward of every op on a
    # gradient path; each rank pays step_s, the output rank the loss, some rank a stage call
    # each way and, if any rank holds parameters, the optimizer's fixed cost.
    total = sum(fwd[n] + bwd[n] + opt[n] for n in order) + costs.stage_fwd_s + costs.loss_s + W * costs.step_s
    if on_path:
        total += costs.stage_bwd_s
    if owners:
        total += min(c.opt_fixed)
    work = total / W
    # Critical path: an op's forward starts after its stage call and its tensor inputs'
    # forwards (messages only add); the loss after every tensor value the output reads; an op's backward
    # after the loss, a backward stage call and the backward of every gradient-path consumer
    # (local ones run first in reverse stage order, remote ones send their gradient after it);
    # the rank that ran it still pays step_s.
    # A value of no tensors sends no message (R3: the receiver knows it), so only tensor
    # values order a consumer after its producer across ranks.
    sent = {n for n in order if c.cost[n][0].leaves > 0}
    done: dict[str, float] = {}
    for n in order:
        done[n] = max((done[a] for a in real_inputs(graph, n) if a in sent), default=costs.stage_fwd_s) + fwd[n]
    loss_end = max((done[a] for a in real_inputs(graph, out) if a in sent), default=0.0) if out else 0.0
    loss_end += costs.loss_s
    back: dict[str, float] = {}
    for n in reversed(order):
        if n not in on_path:
            continue
        after = [back[s] for s in graph.successors(n) if s in back]
        back[n] = max(after, default=loss_end + costs.stage_bwd_s) + bwd[n]
    path = max(max(back.values(), default=loss_end), loss_end) + costs.step_s
    return float(max(work, path))


def rank_lower_bound(graph: nx.DiGraph, cluster: Cluster, costs: RankCosts | None = None,
                     leaves: Mapping[str, int] | None = None) -> float:
    """Seconds no placement of ``graph`` over ``cluster``'s ranks can beat under rules R1-R7.

    Two bounds, the larger wins (each op at its cheapest rank, messages free):

    * **work**: the step lasts until the slowest rank is done, so at least the ranks' mean
      busy time: every op's forward and optimizer update, the backward of every op with a
      gradient path to the output (R6 runs it under any placement), ``step_s`` per rank, the
      loss, one stage call each way and the optimizer's fixed cost once;
    * **critical path**: the longest forward chain to the output, the loss, then the longest
      backward chain from the output, then ``step_s``.

    The single-process bound (:mod:`envs.sim.lower_bound`) is not one for ranks: it charges
    one host thread with every op, while ranks run ops in parallel.
    """
    return _lower_bound(_compile(graph, cluster, leaves), costs or RankCosts())
