"""Module structure of a placement problem: which ``nn.Module`` path each node belongs to.

Module-aware baselines (expert, balanced, sequential) reason in modules, not ops. The path
of a node of the placement graph is the module it runs (``call_module``: its target), the
module owning the tensor it reads (``get_attr``: the target without the last name), or
the module whose ``forward`` created it (the ``module`` attribute). A node of a group
graph takes the module owning most of its members' parameters (``members`` attribute, op
attributes read from the captured op graph), or their common path when they own none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import BaselineInputs, check_graph


def op_path(attrs: dict) -> str:
    """Module path of one op node from its attributes (see the module docstring)."""
    op, target = attrs.get("op"), str(attrs.get("target", ""))
    if op == "call_module":
        return target
    if op == "get_attr":
        return target.rsplit(".", 1)[0] if "." in target else ""
    return str(attrs.get("module", "") or "")


def common_path(paths: list[str]) -> str:
    """Longest common dotted prefix of module paths (``""`` when they share none)."""
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    out: list[str] = []
    for level in zip(*parts):
        if any(x != level[0] for x in level):
            break
        out.append(level[0])
    return ".".join(out)


def group_path(member_attrs: list[dict]) -> str:
    """Module path of a group: the module owning most of its parameter bytes.

    Glue ops at module borders, or two modules merged into one group, would cut a common
    prefix short (often to the top level); the dominant parameter owner says what the
    group mostly is. Groups without parameters take their members' common path.
    """
    owned: dict[str, float] = {}
    for attrs in member_attrs:
        b = float(attrs.get("param_bytes", 0) or 0)
        if b > 0:
            p = op_path(attrs)
            owned[p] = owned.get(p, 0.0) + b
    if owned:
        return max(owned, key=lambda p: (owned[p], p))
    return common_path([op_path(a) for a in member_attrs])


def op_paths(inputs: BaselineInputs) -> list[str] | None:
    """Module paths of every op of the captured op graph (all modules, even those grouped away)."""
    op_graph = getattr(inputs.captured, "graph", None)
    if op_graph is None:
        return None
    return [op_path(op_graph.nodes[n]) for n in op_graph.nodes]


def node_paths(problem: PlacementProblem, inputs: BaselineInputs, who: str) -> list[str]:
    """Module path of every problem node, in ``problem.node_names`` order."""
    graph = check_graph(problem, inputs.graph, who)
    op_graph: nx.DiGraph | None = getattr(inputs.captured, "graph", None)
    paths = []
    for name in problem.node_names:
        attrs = graph.nodes[name]
        members = attrs.get("members")
        if members and op_graph is not None and all(m in op_graph.nodes for m in members):
            paths.append(group_path([op_graph.nodes[m] for m in members]))
        elif "op" in attrs or "module" in attrs:
            paths.append(op_path(attrs))
        else:
            paths.append("")
    return paths


@dataclass
class ModuleItem:
    """A module path with the problem nodes directly in it and its child modules.

    ``first`` is the topological index of its first node: children are ordered by it,
    which for sequential models is also the definition order accelerate walks.
    """

    path: str
    nodes: list[int] = field(default_factory=list)
    children: list["ModuleItem"] = field(default_factory=list)
    first: int = 1 << 60
    size: float = 0.0

    @property
    def all_nodes(self) -> list[int]:
        out = list(self.nodes)
        for c in self.children:
            out.extend(c.all_nodes)
        return out


def module_tree(paths: list[str], sizes: Any) -> ModuleItem:
    """Build the module tree of ``paths`` (one per node) with ``sizes`` summed per module."""
    root = ModuleItem("")
    by_path: dict[str, ModuleItem] = {"": root}
    for n, p in enumerate(paths):
        parts = p.split(".") if p else []
        item = root
        item.first = min(item.first, n)
        item.size += float(sizes[n])
        for depth in range(1, len(parts) + 1):
            sub = ".".join(parts[:depth])
            child = by_path.get(sub)
            if child is None:
                child = ModuleItem(sub)
                by_path[sub] = child
                item.children.append(child)
            child.first = min(child.first, n)
            child.size += float(sizes[n])
            item = child
        item.nodes.append(n)
    for item in by_path.values():
        item.children.sort(key=lambda c: c.first)
    return root


def split_items(item: ModuleItem, sizes: Any) -> list[ModuleItem]:
    """The items a module breaks into when it must be split: its direct nodes and children."""
    direct = [ModuleItem(item.path, [n], [], n, float(sizes[n])) for n in item.nodes]
    return sorted(direct + item.children, key=lambda c: c.first)


def is_layer(item: ModuleItem) -> bool:
    """accelerate's notion of a layer: a module without child modules (or a single node)."""
    return not item.children
