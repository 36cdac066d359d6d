"""accelerate-style ``device_map`` (module path → device) of a module-aligned placement.

Tools such as accelerate's ``dispatch_model`` and the Hugging Face Trainer read a
``device_map``/``hf_device_map``: a mapping from module paths to devices. A node-level
placement can be written that way only when it respects module boundaries; this module
decides that and collapses the placement to the coarsest module prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx
import torch
import torch.fx as fx

__all__ = ["accelerate_device_map", "placement_device_map"]


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
    # A parameter or buffer of the model itself (``self.pos = nn.Parameter(...)``) belongs
    # to no submodule: its get_attr node is keyed by the tensor's own name, which a
    # device_map accepts as a key like any module path.
    root_tensors: dict[str, str] = {}
    if isinstance(graph, nx.DiGraph):
        modules = {n: str(graph.nodes[n].get("module", "") or "") for n in graph.nodes}
        owning = {
            n for n, a in graph.nodes(data=True)
            if (a.get("param_bytes") or 0) > 0 or a.get("op") in ("call_module", "get_attr")
        }
        root_tensors = {n: str(a.get("target")) for n, a in graph.nodes(data=True)
                        if a.get("op") == "get_attr" and not modules[n] and "." not in str(a.get("target", "."))}
    elif isinstance(graph, fx.GraphModule):
        modules = _node_modules_from_gm(graph)
        owning = {n.name for n in graph.graph.nodes if n.op in ("call_module", "get_attr")}
        root_tensors = {n.name: str(n.target) for n in graph.graph.nodes
                        if n.op == "get_attr" and "." not in str(n.target)}
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
        m = modules[n] or root_tensors.get(n, "")
        if not m:
            continue
        if n in owning and n not in root_tensors:
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


#: Devices a device_map may name that accelerate treats as storage, not as where to compute.
_OFFLOAD = frozenset({"cpu", "disk"})


def accelerate_device_map(
    graph: nx.DiGraph | fx.GraphModule | Mapping[str, str],
    placement: Mapping[str, str],
    model: torch.nn.Module | None = None,
) -> tuple[dict[str, str] | None, str]:
    """The ``device_map`` to hand ``accelerate.dispatch_model``, or None and the reason there is none.

    Three conditions, each one accelerate's:

    * real torch devices (``cuda:0``, ``cpu``), not a simulated cluster's names —
      ``dispatch_model`` refuses ``gpu0``;
    * every parameter and buffer of ``model`` covered by a key (a module path or a
      tensor name); one that forward() never reads (a buffer only saved with the model)
      goes to the main device;
    * no ``"cpu"`` next to an accelerator: ``dispatch_model`` treats ``"cpu"`` entries as
      offloaded weights that it moves to the main device and runs there, so a placement
      that computes on the CPU and a GPU is not what accelerate would run.

    Args:
        graph: as for :func:`placement_device_map`.
        placement: node → real torch device.
        model: the user's model, to check and complete coverage (optional).
    """
    unparsable = sorted({d for d in placement.values() if not _is_torch_device(d)})
    if unparsable:
        return None, (f"the placement names device(s) {unparsable}, which are not real torch devices; "
                      "give the cluster's devices a real_device so the map can name them")
    device_map = placement_device_map(graph, placement)
    if device_map is None:
        return None, "the placement splits some module's own ops across devices, which a device_map cannot express"
    devices = set(device_map.values())
    compute = sorted(devices - _OFFLOAD)
    if compute and devices & _OFFLOAD:
        return None, (f"accelerate runs a device_map's 'cpu' entries on the main device ({compute[0]}) as "
                      f"offloaded weights, so a placement that computes on the CPU and on {', '.join(compute)} "
                      "cannot be written as one")
    if model is not None:
        # fx keeps constants it made itself (_tensor_constant0) as attributes: not the model's.
        known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()} \
            | {n for n, _ in model.named_buffers()}
        device_map = {k: d for k, d in device_map.items() if k in known}
        main = compute[0] if compute else next(iter(devices))
        for name in _uncovered(model, device_map):
            device_map[name] = main
    return device_map, ""


def _is_torch_device(name: str) -> bool:
    try:
        torch.device(name)
        return True
    except (RuntimeError, TypeError):
        return False


def _uncovered(model: torch.nn.Module, device_map: Mapping[str, str]) -> list[str]:
    """Parameters and buffers of ``model`` no key of ``device_map`` covers (a key covers itself and below)."""
    if "" in device_map:
        return []
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [n for n in names
            if not any(n == k or n.startswith(k + ".") for k in device_map)]
