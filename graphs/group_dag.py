"""A DAG of groups that can merge two groups without ever creating a cycle.

Grouping (:mod:`graphs.grouping`) starts from one group per op and merges; this module
holds the mechanics: a union-find over the ops, and adjacency dicts between the current
groups (edge weight = bytes) that are rewired on every merge in time proportional to the
smaller group's degree.

Why merging can create a cycle: contracting the edge ``a → b`` closes a cycle exactly when
another path ``a → x → … → b`` exists. :meth:`GroupDAG.can_merge` answers that in O(1) in
the common cases (``a`` has one successor, or ``b`` one predecessor — then no other path
exists) and otherwise with a depth-first search bounded by a visit budget; when the budget
runs out the answer is a conservative "no". Two groups that are consecutive in a
topological order can always be merged (no path can pass between them), which
:meth:`GroupDAG.merge_consecutive` uses when no edge may be contracted.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import networkx as nx

SEARCH_BUDGET = 2000


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        """Join the sets of ``a`` and ``b``; returns the root of the joined set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra

    def attach(self, child: int, parent: int) -> None:
        """Join the set of ``child`` into the set of ``parent``, keeping ``parent``'s root."""
        rc, rp = self.find(child), self.find(parent)
        if rc != rp:
            self.parent[rc] = rp
            self.size[rp] += self.size[rc]

    def union_all(self, items: Iterable[int]) -> None:
        """Put every item of ``items`` in one set."""
        it = iter(items)
        first = next(it, None)
        if first is None:
            return
        for other in it:
            self.union(first, other)


def collapse_cycles(n: int, edges: Iterable[tuple[int, int]], uf: UnionFind) -> int:
    """Merge every strongly connected component of the quotient graph (groups = ``uf`` sets).

    Mandatory co-location can join ops that lie on one path with other ops between them
    (a shared LSTM cell at every time step): the groups then depend on each other both ways.
    Merging each strongly connected component of the group graph is the smallest change
    that makes it a DAG again. Returns the number of merges made.
    """
    quotient = nx.DiGraph()
    quotient.add_nodes_from({uf.find(i) for i in range(n)})
    quotient.add_edges_from((ra, rb) for ra, rb in ((uf.find(u), uf.find(v)) for u, v in edges) if ra != rb)
    merges = 0
    for component in nx.strongly_connected_components(quotient):
        if len(component) > 1:
            uf.union_all(component)
            merges += len(component) - 1
    return merges


class GroupDAG:
    """The current groups (roots of a :class:`UnionFind`) with weighted edges between them.

    ``cost`` is the quantity merged groups add up (seconds); ``pos`` a position consistent
    with the op graph's topological order, used only to make choices deterministic.
    """

    def __init__(self, n: int, uf: UnionFind, edges: Iterable[tuple[int, int, float]],
                 costs: list[float]) -> None:
        self.uf = uf
        self.last_neighbours: list[int] = []  # neighbours of the group removed by the last merge
        self.roots: set[int] = {uf.find(i) for i in range(n)}
        self.succ: dict[int, dict[int, float]] = {r: {} for r in self.roots}
        self.pred: dict[int, dict[int, float]] = {r: {} for r in self.roots}
        self.cost: dict[int, float] = {r: 0.0 for r in self.roots}
        self.pos: dict[int, int] = {}
        for i in range(n):
            r = uf.find(i)
            self.cost[r] += costs[i]
            self.pos[r] = min(self.pos.get(r, i), i)
        for u, v, w in edges:
            ru, rv = uf.find(u), uf.find(v)
            if ru != rv:
                self.succ[ru][rv] = self.succ[ru].get(rv, 0.0) + w
                self.pred[rv][ru] = self.pred[rv].get(ru, 0.0) + w

    def __len__(self) -> int:
        return len(self.roots)

    def ordered_roots(self) -> list[int]:
        """Current groups by position (a topological order of the op graph restricted to leaders)."""
        return sorted(self.roots, key=self.pos.__getitem__)

    def can_merge(self, a: int, b: int, budget: int = SEARCH_BUDGET) -> bool:
        """Whether contracting the edge ``a → b`` keeps the graph acyclic (conservative).

        Another path ``a → x → … → b`` is searched from the side with fewer neighbours:
        forward from ``a``'s other successors, or backward from ``b``'s other predecessors.
        """
        if len(self.succ[a]) == 1 or len(self.pred[b]) == 1:
            return True
        if len(self.succ[a]) <= len(self.pred[b]):
            start, goal, step = a, b, self.succ
        else:
            start, goal, step = b, a, self.pred
        seen: set[int] = set()
        stack = [x for x in step[start] if x != goal]
        while stack:
            x = stack.pop()
            if x == goal:
                return False
            if x in seen:
                continue
            seen.add(x)
            if len(seen) > budget:
                return False
            stack.extend(step[x])
        return True

    def merge(self, a: int, b: int) -> int:
        """Merge groups ``a`` and ``b`` (the caller checked it is safe); returns the surviving root.

        The group with more edges survives, so rewiring costs the smaller degree.
        """
        if len(self.succ[a]) + len(self.pred[a]) >= len(self.succ[b]) + len(self.pred[b]):
            keep, gone = a, b
        else:
            keep, gone = b, a
        self.uf.attach(gone, keep)
        self.last_neighbours = list(self.pred[gone]) + list(self.succ[gone])
        for x, w in self.pred.pop(gone).items():
            del self.succ[x][gone]
            if x != keep:
                self.succ[x][keep] = self.succ[x].get(keep, 0.0) + w
                self.pred[keep][x] = self.pred[keep].get(x, 0.0) + w
        for y, w in self.succ.pop(gone).items():
            del self.pred[y][gone]
            if y != keep:
                self.pred[y][keep] = self.pred[y].get(keep, 0.0) + w
                self.succ[keep][y] = self.succ[keep].get(y, 0.0) + w
        self.cost[keep] += self.cost.pop(gone)
        self.pos[keep] = min(self.pos[keep], self.pos.pop(gone))
        self.roots.discard(gone)
        return keep

    def topological_roots(self) -> list[int]:
        """A topological order of the current groups (ties by position)."""
        indeg = {r: len(self.pred[r]) for r in self.roots}
        ready = [(self.pos[r], r) for r, d in indeg.items() if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, r = heapq.heappop(ready)
            order.append(r)
            for y in self.succ[r]:
                indeg[y] -= 1
                if indeg[y] == 0:
                    heapq.heappush(ready, (self.pos[y], y))
        if len(order) != len(self.roots):  # pragma: no cover - would be a bug in merge safety
            raise AssertionError("group graph has a cycle")
        return order

    def merge_consecutive(self) -> int:
        """Merge the cheapest pair of groups adjacent in a topological order (always acyclic)."""
        order = self.topological_roots()
        best = min(range(len(order) - 1), key=lambda i: (self.cost[order[i]] + self.cost[order[i + 1]], i))
        return self.merge(order[best], order[best + 1])

    def edges(self) -> Iterator[tuple[int, int, float]]:
        for u, targets in self.succ.items():
            for v, w in targets.items():
                yield u, v, w
