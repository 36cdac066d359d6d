"""Module scopes: the sets of groups the move policy may relocate in one move.

A model's module tree says which groups belong together: an Inception branch is a chain of
convolutions under one ``Mixed_6b.branch7x7dbl_2``, a transformer layer's attention sits under
``blocks.3.attn``, and a repeated architecture repeats the same role in every block. Moving one
of those together is a single decision for a user ("the double-3x3 branches on GPU 1") but
10-40 coordinated single moves for a search, and every single move on the way is worse: a
branch moved one convolution at a time pays a copy in and out of each. Simulated on
Inception-v3 (paper size, 4xV100-nvlink, ``envs.sim``), the best heuristic (one GPU) runs a step
in 121.33 ms, local search alone and the full search end at 120.6-120.9 ms in 6,000 placements,
and one move of every ``branch3x3dbl`` to a second GPU gives 107.69 ms; a steepest descent over
single moves and these scopes reaches 104.90 ms.

Two kinds of scope, from the module path of each group (``PlacementProblem.node_modules``):

* a **subtree**: every group under one module (``Mixed_6b``, ``Mixed_6b.branch7x7dbl_2``);
* a **role**: the groups at the same relative path in every block of the model, the block's own
  name dropped, indices written ``*`` and numbered variants (``_2``, ``_3a``) folded
  (``blocks.*.attn``; ``branch3x3dbl`` in every ``Mixed_*`` block).

Only scopes of 2 to N - 1 groups are kept, each distinct set once; each group keeps its
``per_node`` smallest scopes, so a move's choice stays small on any graph. A graph without module
paths (generated graphs) has none, and the policy then makes single moves only.

**Glue joins the module it connects.** Ops written in a model's own ``forward`` (a residual
``add``, the ``cat`` of two directions, the per-step attention of an unrolled decoder) belong to no
submodule; on the paper NMT they are 994 of its 1,244 groups. A layer moved without them pays a
copy for every time step on each side, so layer scopes that leave them behind only add transfers:
from scratch on NMT/4xK40 the policy with such scopes ended at 1.03-1.07x the best heuristic on 4
of 6 seeds, against 0.92-1.03x with no scopes. :func:`attached_modules` gives each such group the
module its producers share (the deepest common path of the producers that have one, else of all
its producers' attached paths), and failing that the module its consumers share; with them
attached, from scratch on NMT/4xK40 it ends at 0.79-0.98x on seeds 0-3
(``benchmarks/results/agent.md``). :func:`problem_scopes` builds the scopes from those paths.

>>> scopes = module_scopes(("a.x", "a.y", "b.x", "b.y", ""))
>>> sorted(tuple(int(i) for i in m) for m in scopes.members)
[(0, 1), (0, 2), (1, 3), (2, 3)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.problem import PlacementProblem

#: How many scopes (the smallest) each group may expand to.
PER_NODE = 8

_VARIANT = re.compile(r"_\d+[a-z]?$")


@dataclass(frozen=True)
class MoveScopes:
    """The scopes of a graph, in flat arrays the policy gathers from.

    Attributes:
        members: per scope, its node indices (ascending).
        is_role: [S] True for a role scope, False for a subtree.
        node_ptr, node_scope: CSR over nodes: the scopes node ``i`` may expand to are
            ``node_scope[node_ptr[i]:node_ptr[i+1]]`` (smallest first).
        member_scope, member_node: every (scope, node) membership, for sums over scopes.
        sizes: [S] groups per scope.
    """

    members: tuple[np.ndarray, ...]
    is_role: np.ndarray
    node_ptr: np.ndarray
    node_scope: np.ndarray
    member_scope: np.ndarray
    member_node: np.ndarray
    sizes: np.ndarray

    @property
    def num_scopes(self) -> int:
        return len(self.members)

    def members_on(self, row: np.ndarray, num_devices: int) -> np.ndarray:
        """[S, D] how many of each scope's members the placement ``row`` ([N] devices) puts on each device."""
        on = np.zeros((self.num_scopes, num_devices), dtype=np.int64)
        np.add.at(on, (self.member_scope, np.asarray(row, dtype=np.int64)[self.member_node]), 1)
        return on

    def of_nodes(self, nodes: np.ndarray, width: int = PER_NODE) -> np.ndarray:
        """[B, width] the scopes each of ``nodes`` may expand to, ``-1`` past its last."""
        out = np.full((len(nodes), width), -1, dtype=np.int64)
        for b, i in enumerate(np.asarray(nodes, dtype=np.int64)):
            own = self.node_scope[self.node_ptr[i]:self.node_ptr[i + 1]][:width]
            out[b, :len(own)] = own
        return out


def _role_part(component: str) -> str:
    return "*" if component.isdigit() else _VARIANT.sub("", component)


def module_scopes(node_modules: Sequence[str], per_node: int = PER_NODE) -> MoveScopes:
    """The subtree and role scopes of nodes whose module paths are ``node_modules`` (module doc)."""
    n = len(node_modules)
    found: dict[tuple[int, ...], bool] = {}
    subtrees: dict[str, list[int]] = {}
    roles: dict[tuple[str, ...], list[int]] = {}
    for i, path in enumerate(node_modules):
        parts = path.split(".") if path else []
        for k in range(1, len(parts) + 1):
            subtrees.setdefault(".".join(parts[:k]), []).append(i)
        for k in range(2, len(parts) + 1):
            roles.setdefault(tuple(_role_part(c) for c in parts[1:k]), []).append(i)
    for groups, role in [(subtrees.values(), False), (roles.values(), True)]:
        for nodes in groups:
            key = tuple(sorted(set(nodes)))
            if 1 < len(key) < n and key not in found:
                found[key] = role
    members = tuple(np.array(k, dtype=np.int64) for k in found)
    is_role = np.array(list(found.values()), dtype=bool)
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    per: list[list[int]] = [[] for _ in range(n)]
    for s in np.argsort(sizes, kind="stable"):
        for i in members[s]:
            if len(per[i]) < per_node:
                per[i].append(int(s))
    node_ptr = np.zeros(n + 1, dtype=np.int64)
    node_ptr[1:] = np.cumsum([len(p) for p in per])
    node_scope = np.array([s for p in per for s in p], dtype=np.int64)
    member_scope = np.repeat(np.arange(len(members), dtype=np.int64), sizes) if len(members) else np.zeros(0, np.int64)
    member_node = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    return MoveScopes(members, is_role, node_ptr, node_scope, member_scope, member_node, sizes)


def _common_path(paths: Sequence[str]) -> str:
    first = paths[0].split(".")
    depth = len(first)
    for path in paths[1:]:
        parts = path.split(".")
        depth = min(depth, len(parts))
        depth = next((k for k in range(depth) if parts[k] != first[k]), depth)
    return ".".join(first[:depth])


def attached_modules(node_modules: Sequence[str], edge_src: np.ndarray, edge_dst: np.ndarray) -> tuple[str, ...]:
    """Module paths with each path-less node given the module it connects (module doc).

    Edges run from lower to higher index (topological), so one pass over the nodes in order
    attaches through chains of glue from the producers' side, and one in reverse from the
    consumers' side for what is left.

    >>> attached_modules(("a.x", "", "", "b"), np.array([0, 1, 2]), np.array([1, 2, 3]))
    ('a.x', 'a.x', 'a.x', 'b')
    >>> attached_modules(("a.x", "a.y", "", "b"), np.array([0, 1, 2]), np.array([2, 2, 3]))
    ('a.x', 'a.y', 'a', 'b')
    """
    own = list(node_modules)
    attached = list(node_modules)
    n = len(own)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for s, d in zip(np.asarray(edge_src).tolist(), np.asarray(edge_dst).tolist()):
        preds[d].append(s)
        succs[s].append(d)
    for order, neighbours in ((range(n), preds), (range(n - 1, -1, -1), succs)):
        for i in order:
            if attached[i] or not neighbours[i]:
                continue
            with_module = [own[j] for j in neighbours[i] if own[j]]
            paths = with_module or [attached[j] for j in neighbours[i]]
            if all(paths):
                attached[i] = _common_path(paths)
    return tuple(attached)


def problem_scopes(problem: PlacementProblem, per_node: int = PER_NODE) -> MoveScopes | None:
    """The move scopes of ``problem`` (glue attached to its modules), or None when it has none."""
    if not problem.node_modules:
        return None
    scopes = module_scopes(attached_modules(problem.node_modules, problem.edge_src, problem.edge_dst), per_node)
    return scopes if scopes.num_scopes else None
