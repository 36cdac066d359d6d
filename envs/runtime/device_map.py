"""accelerate-style ``device_map`` (module path → device) of a module-aligned placement.

Tools such as accelerate's ``dispatch_model`` and the Hugging Face Trainer read a
``device_map``/``hf_device_map``: a mapping from module paths to devices. A node-level
placement can be written that way only when it respects module boundaries; this module
decides that and collapses the placement to the coarsest module prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx
import torch.fx as fx

__all__ = ["placement_device_map"]


def _node_modules_from_gm(gm: fx.GraphModule) -> dict[str, str]:
    """Owning module path of each fx node (for GraphModules without a placement graph)."""
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.name] = str(n.target)
        elif n.op == "get_attr":
            out[n.name] = str(n.target).rpartition(".")[0]
        elif n.op in ("call_function", "call_method"):
            stack = n.meta.get("nn_module_stack")
            if stack:
                path = list(stack.values())[-1][0]
                out[n.name] = _clean_export_path(str(path))
            else:
                out[n.name] = ""
        else:
            out[n.name] = ""
    return out


def _clean_export_path(path: str) -> str:
    # export's nn_module_stack spells paths like "L['self'].layers[0]" in some versions.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    for ch in "[]":
        path = path.replace(ch, "." if ch == "[" else "")
    return path.strip(".")


def placement_device_map(
    graph: nx.DiGraph | fx.GraphModule | Mapping[str, str], placement: Mapping[str, str]
) -> dict[str, str] | None:
    """An accelerate-style ``device_map`` (module path → device) if ``placement`` is module-aligned.

    Module-aligned means every module that holds parameters of its own (a layer such as
    ``nn.Linear``, or a module with a raw ``nn.Parameter``) has all of its nodes, and its
    submodules' nodes, on one device. A module without parameters of its own (a
    container, a transformer block) may be split among its children; its own
    parameter-free ops (residual adds, reshapes) are glue that, under accelerate's hooks,
    runs wherever its inputs arrive, so a device_map does not list them. The map gives
    the coarsest uniform prefixes; ``{"": device}`` when everything is on one device.

    Args:
        graph: the placement graph (node attributes ``module``, ``param_bytes``, ``op``),
            a GraphModule, or a mapping node → module path.
        placement: node name → device.

    Returns:
        The device_map, or None when the placement is not module-aligned.
    """
    if isinstance(graph, nx.DiGraph):
        modules = {n: str(graph.nodes[n].get("module", "") or "") for n in graph.nodes}
        owning = {
            n for n, a in graph.nodes(data=True)
            if (a.get("param_bytes") or 0) > 0 or a.get("op") in ("call_module", "get_attr")
        }
    elif isinstance(graph, fx.GraphModule):
        modules = _node_modules_from_gm(graph)
        owning = {n.name for n in graph.graph.nodes if n.op in ("call_module", "get_attr")}
    else:
        modules, owning = dict(graph), set(graph)  # no op information: every node counts
    placed = {n: placement[n] for n in modules if n in placement}
    if not placed:
        return None
    if len(set(placed.values())) == 1:
        return {"": next(iter(placed.values()))}

    owns: set[str] = set()  # modules with parameter-owning nodes of their own
    subtree: dict[str, set[str]] = {}
    children: dict[str, set[str]] = {"": set()}
    for n, d in placed.items():
        m = modules[n]
        if not m:
            continue
        if n in owning:
            owns.add(m)
        parts = m.split(".")
        parent = ""
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            subtree.setdefault(prefix, set()).add(d)
            children.setdefault(parent, set()).add(prefix)
            children.setdefault(prefix, set())
            parent = prefix

    result: dict[str, str] = {}

    def visit(m: str) -> bool:
        if len(subtree[m]) == 1:
            result[m] = next(iter(subtree[m]))
            return True
        if m in owns or not children[m]:
            return False  # a layer's own parameters/ops split across devices
        return all(visit(c) for c in sorted(children[m]))

    if not children[""] or not all(visit(c) for c in sorted(children[""])):
        return None
    return result
