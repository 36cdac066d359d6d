"""Grouping: thousands of ops become a few hundred groups the placer assigns to devices.

Steps (design "Grouping"), each keeping "every op in exactly one group":

1. **Mandatory co-location** (union-find over ops):
   - a module called more than once (several ``call_module`` nodes with one target) and a
     parameter read more than once (several ``get_attr`` of one target): one group, since
     shared weights live on one device;
   - a parameter/buffer (``get_attr``) with all of its consumers;
   - an in-place op (``add_``, ``relu_``, ``operator.iadd``, ``inplace=True``) and a view op
     (view, reshape, transpose, getitem, split, …) with its producer — the op whose tensor
     it mutates or aliases (its first input);
   - an op whose output is a sparse tensor (``x.to_sparse()``) with its consumers: a value
     crossing ranks or a pipeline's stage boundary goes by torch.distributed's point-to-point
     send, which carries dense tensors only (4 of 20 measured placements of such a model ran
     invalid: "unsupported memory format option Contiguous"). A sparse model input is handed
     to every rank whole, so it is no such op;
   - an op whose output size depends on computed values (``torch.nonzero``, ``x[mask]``: the
     node attribute ``shape_varies``, :mod:`graphs.shape_dependence`) with its consumers: a
     process receives into a buffer of a shape fixed in advance (a top-2 mixture of experts
     over two worker processes: gloo aborted the receiving rank once the first optimizer step
     moved the routing, and 2 of 4 pipelines were refused);
   - a ``torch.autograd.grad`` in forward (a physics-informed loss, a gradient penalty) with
     every op between the tensors it differentiates by and those it differentiates: the
     backward it runs executes on those ops' devices, yet the profile times it as the grad
     op's own cost, so the simulation is true only with them on its device; and across
     processes a tensor received from another rank is a fresh leaf the grad cannot reach back
     through ("The differentiated Tensor ... appears to not have been used in the graph": 10
     of 16 measured placements of a physics-informed net before this rule).
   - an inlined ``torch.func.vmap`` (torch.export's ``_vmap_increment_nesting`` ...
     ``_vmap_decrement_nesting``) with every op between: its values are batched tensors of the
     process's functorch stack, which no other process can receive.
2. **Cycles**: co-location can join ops with others between them (the decoder cell shared
   by every time step, the attention in between); the group graph then has cycles. Every
   strongly connected component is merged into one group (networkx SCCs), the smallest
   change that makes it a DAG again. Documented consequence: an unrolled recurrent layer
   whose cell is shared across time is one group, with everything it feeds back through.
3. **Tiny ops** (cost under ``tiny_op_seconds``) merge into a neighbour: the producer along
   the heaviest edge when that is safe, else another producer, else a consumer; a merge is
   made only when it cannot create a cycle (:class:`graphs.group_dag.GroupDAG`).
4. **max_groups** (optional): merge until at most that many groups remain, each time the
   cheapest group with its cheapest neighbour (the cheapest adjacent pair containing the
   cheapest group), again only without cycles (falling back to two groups consecutive in
   a topological order, which is always safe). 50,406 synthetic ops → 256 groups: ~5 s.

Costs: the profiled ``time`` of ``device_kind`` (default: the first profiled kind). An
unprofiled graph has no times, so nothing is known to be tiny: it is grouped by structure
only — the mandatory rules, plus the ops that do no work at all (inputs, the output,
shape plumbing: zero FLOPs and zero bytes moved). For ``max_groups`` a crude
one-thread-CPU estimate (10 GFLOP/s and 10 GB/s over ``flops`` and ``bytes_moved``)
then ranks which pair is cheapest.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch.fx as fx

from graphs.errors import GraphError
from graphs.gc_pause import paused_gc
from graphs.group_dag import GroupDAG, UnionFind, collapse_cycles
from graphs.ops import INPLACE_OPERATOR_NAMES, STAYS_WITH_INPUT_OPS, op_name
from graphs.placement_graph import kept_whole_runs

# Unprofiled estimate: one CPU thread does about this much per second.
EST_FLOPS_PER_S = 1e10
EST_BYTES_PER_S = 1e10
_TIME_KEYS = ("fwd_time", "bwd_time", "opt_time", "time")
_NOT_SUMMED = frozenset({"op", "target", "module", "shape", "dtype", "requires_grad", "members",
                         "out_bytes", "act_bytes", "size"}) | set(_TIME_KEYS)


@dataclass
class Grouping:
    """The result of :func:`group_graph`: the group graph and the mapping from ops to groups."""

    graph: nx.DiGraph
    op_to_group: dict[str, str]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def expand(self, group_placement: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
        """Op placement from a group placement: ``{group: device}`` or a sequence in g0..gK order."""
        if isinstance(group_placement, Mapping):
            mapping = dict(group_placement)
        else:
            try:
                items = list(group_placement)
            except TypeError:
                raise GraphError(f"a group placement must be a dict group -> device or a sequence, "
                                 f"got {type(group_placement).__name__}") from None
            if len(items) != len(self.groups):
                raise GraphError(f"a group placement sequence needs one device per group "
                                 f"({len(self.groups)}), got {len(items)}")
            mapping = {f"g{i}": d for i, d in enumerate(items)}
        unknown = sorted(set(mapping) - set(self.groups))
        if unknown:
            raise GraphError(f"unknown group(s) {unknown[:5]} in the placement; expected names "
                             f"g0..g{len(self.groups) - 1}")
        missing = sorted(set(self.groups) - set(mapping), key=lambda g: int(g[1:]))
        if missing:
            raise GraphError(f"the group placement leaves {len(missing)} group(s) without a device "
                             f"(e.g. {missing[:5]}); expected a device for every group")
        return {op: mapping[group] for op, group in self.op_to_group.items()}


def is_view(attrs: Mapping[str, Any]) -> bool:
    """Whether the node stays with its first input's producer: a view, a shape query or ``contiguous``.

    ``contiguous`` copies only when its input is not packed (see :mod:`graphs.ops`); either way it
    belongs with the tensor it repacks.
    """
    return (attrs.get("op") in ("call_function", "call_method")
            and op_name(str(attrs.get("target", ""))) in STAYS_WITH_INPUT_OPS)


def is_inplace(attrs: Mapping[str, Any], inplace_kwarg: bool = False) -> bool:
    """Whether the node mutates its first input: ``add_``, ``operator.iadd``, ``__iadd__``, ``inplace=True``."""
    if inplace_kwarg or attrs.get("inplace") is True:
        return True
    if attrs.get("op") not in ("call_function", "call_method"):
        return False
    target = str(attrs.get("target", ""))
    name = op_name(target)
    if name.startswith("__") and name.endswith("__"):
        return name[2:-2] in INPLACE_OPERATOR_NAMES
    if target.startswith(("operator.", "_operator.", "graphs.ops.")) and name in INPLACE_OPERATOR_NAMES:
        return True
    return name.endswith("_") and name.strip("_") != ""


def _gm_inplace(gm: fx.GraphModule | None) -> set[str]:
    """Names of fx nodes called with ``inplace=True`` or of modules with ``.inplace`` set."""
    found: set[str] = set()
    if gm is None:
        return found
    for node in gm.graph.nodes:
        if node.kwargs.get("inplace") is True:
            found.add(node.name)
        elif node.op == "call_module":
            try:
                module = gm.get_submodule(str(node.target))
            except AttributeError:
                continue
            if getattr(module, "inplace", False) is True:
                found.add(node.name)
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _profiled_kinds(graph: nx.DiGraph) -> list[str]:
    kinds = list(graph.graph.get("profiled_kinds") or [])
    if kinds:
        return kinds
    for _, attrs in graph.nodes(data=True):
        if attrs.get("time"):
            return list(attrs["time"])
    return []


def node_cost(attrs: Mapping[str, Any], kind: str | None) -> float:
    """Seconds the node costs on ``kind`` (profiled), or the unprofiled estimate when ``kind`` is None."""
    if kind is not None:
        return float((attrs.get("time") or {}).get(kind, 0.0))
    return float(attrs.get("flops") or 0) / EST_FLOPS_PER_S + float(attrs.get("bytes_moved") or 0) / EST_BYTES_PER_S


def _requires_grad(attrs: Mapping[str, Any]) -> bool:
    # Same default as the simulator: everything but inputs and the output takes part in autograd.
    if "requires_grad" in attrs:
        return bool(attrs["requires_grad"])
    return attrs.get("op") not in ("placeholder", "output")


def _check_arguments(graph: Any, max_groups: Any, tiny_op_seconds: Any, device_kind: Any) -> str | None:
    if not isinstance(graph, nx.DiGraph) or graph.number_of_nodes() == 0:
        raise GraphError("group_graph needs a non-empty networkx.DiGraph placement graph, "
                         f"got {type(graph).__name__}")
    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int)
                                   or max_groups < 1):
        raise GraphError(f"max_groups must be a positive integer or None, got {max_groups!r}")
    if not _is_number(tiny_op_seconds) or tiny_op_seconds < 0:
        raise GraphError(f"tiny_op_seconds must be a number of seconds >= 0, got {tiny_op_seconds!r}")
    kinds = _profiled_kinds(graph)
    if device_kind is None:
        return kinds[0] if kinds else None
    if device_kind not in kinds:
        raise GraphError(f"device kind {device_kind!r} was not profiled on this graph; profiled kinds: "
                         f"{kinds or 'none (profile the graph first, or pass device_kind=None)'}")
    return str(device_kind)


def mandatory_unions(graph: nx.DiGraph, index: Mapping[str, int], uf: UnionFind, gm: fx.GraphModule | None = None) -> None:
    """Apply the co-location rules of the module doc to ``uf`` (sets of op indices)."""
    by_module: dict[str, list[int]] = {}
    by_attr: dict[str, list[int]] = {}
    kwarg_inplace = _gm_inplace(gm)
    shared = _shared_tensor_users(graph, index, gm)
    # A tied weight's get_attr stays with the module that owns the tensor; its consumers
    # get the weight over a cut edge (autograd sends the gradient back to the one tensor).
    # Joining them too would fuse the embedding with the head and every op in between.
    tied_attrs = {i for members in shared for i in members}
    for name, attrs in graph.nodes(data=True):
        i = index[name]
        op = attrs.get("op")
        if op == "call_module":
            by_module.setdefault(str(attrs.get("target")), []).append(i)
        elif op == "get_attr":
            by_attr.setdefault(str(attrs.get("target")), []).append(i)
        if (op == "get_attr" and i not in tied_attrs) or attrs.get("sparse_output") or attrs.get("shape_varies"):
            for consumer in graph.successors(name):
                uf.union(i, index[consumer])
        if (is_view(attrs) and not _gathers(graph, name, attrs)) or is_inplace(attrs, name in kwarg_inplace):
            # networkx keeps predecessors in insertion order = the fx node's argument order,
            # so the first predecessor is the tensor the op aliases or mutates.
            producer = next(iter(graph.predecessors(name)), None)
            if producer is not None:
                uf.union(i, index[producer])
    for members in list(by_module.values()) + list(by_attr.values()) + shared + _kept_whole(graph, index):
        if len(members) > 1:
            uf.union_all(members)


def _gathers(graph: nx.DiGraph, name: str, attrs: Mapping[str, Any]) -> bool:
    """Whether a ``getitem`` indexes with a tensor (``x[rows]``, ``x[mask]``): advanced indexing
    copies the rows it picks (PyTorch's indexing semantics), so nothing aliases the indexed tensor
    and the op need not stay with it (a top-2 mixture of experts picks each expert's tokens so:
    under the view rule every expert joined the layer's input, one group per layer). A slice whose
    bound is a size read off a tensor is still a view: its other inputs are not tensors."""
    if op_name(str(attrs.get("target", ""))) != "getitem":
        return False
    index_inputs = list(graph.predecessors(name))[1:]
    return any(graph.nodes[p].get("shape") is not None for p in index_inputs)


def _kept_whole(graph: nx.DiGraph, index: Mapping[str, int]) -> list[list[int]]:
    """:func:`graphs.placement_graph.kept_whole_runs` (module doc) as op indices."""
    return [[index[name] for name in run if name in index] for run in kept_whole_runs(graph)]


def _shared_tensor_users(graph: nx.DiGraph, index: Mapping[str, int], gm: fx.GraphModule | None = None) -> list[list[int]]:
    """Nodes that hold the same parameter or buffer, each set a list of op indices.

    Tied weights (a language-model head reusing the embedding matrix) reach the graph as
    two nodes with different targets: a ``call_module`` of the embedding and a
    ``get_attr`` of ``wte.weight``, or two modules sharing one tensor. Autograd
    accumulates one gradient per tensor, so every holder must sit on one device. With the
    GraphModule the tensors are compared by identity; without it, a ``get_attr`` joins the
    ``call_module`` node of the module path its target starts with.
    """
    holders: dict[int, list[int]] = {}
    module_nodes: dict[str, list[int]] = {}
    for name, attrs in graph.nodes(data=True):
        if attrs.get("op") == "call_module":
            module_nodes.setdefault(str(attrs.get("target")), []).append(index[name])
    if gm is not None:
        for name, attrs in graph.nodes(data=True):
            op, target = attrs.get("op"), str(attrs.get("target"))
            tensors: list[Any] = []
            try:
                if op == "call_module":
                    sub = gm.get_submodule(target)
                    tensors = list(sub.parameters()) + list(sub.buffers())
                elif op == "get_attr":
                    owner, _, leaf = target.rpartition(".")
                    tensors = [getattr(gm.get_submodule(owner) if owner else gm, leaf)]
            except AttributeError:
                continue  # a target the gm does not hold (e.g. a graph loaded from disk)
            for t in tensors:
                if hasattr(t, "data_ptr"):
                    holders.setdefault(id(t), []).append(index[name])
        return [m for m in holders.values() if len(set(m)) > 1]
    groups: list[list[int]] = []
    for name, attrs in graph.nodes(data=True):
        if attrs.get("op") != "get_attr":
            continue
        parts = str(attrs.get("target")).split(".")
        for cut in range(len(parts) - 1, 0, -1):
            owners = module_nodes.get(".".join(parts[:cut]))
            if owners:
                groups.append([index[name], *owners])
                break
    return groups


def merge_tiny(dag: GroupDAG, threshold: float, inclusive: bool = False) -> int:
    """Merge every group cheaper than ``threshold`` into a neighbour where that is acyclic.

    ``inclusive``: also merge groups costing exactly ``threshold`` (``threshold=0,
    inclusive=True`` merges the groups that do no work).
    """
    merges = 0
    for _ in range(3):  # a merge can make a neighbour's merge possible: a few passes
        changed = False
        for r in dag.ordered_roots():
            if r not in dag.roots or dag.cost[r] > threshold or (dag.cost[r] == threshold and not inclusive):
                continue
            preds = sorted(dag.pred[r].items(), key=lambda kv: (-kv[1], dag.pos[kv[0]]))
            target = next((p for p, _ in preds if dag.can_merge(p, r)), None)
            if target is None:
                succs = sorted(dag.succ[r].items(), key=lambda kv: (-kv[1], dag.pos[kv[0]]))
                target = next((s for s, _ in succs if dag.can_merge(r, s)), None)
            if target is not None:
                dag.merge(r, target)
                merges += 1
                changed = True
        if not changed:
            break
    return merges


def reduce_groups(dag: GroupDAG, max_groups: int) -> None:
    """Merge until ``max_groups`` remain: the cheapest group with its cheapest neighbour each time.

    That is the cheapest adjacent pair that contains the cheapest group — close to the
    globally cheapest pair, and each merge touches one heap entry instead of refreshing
    every edge of a growing group. Merges that would close a cycle are skipped; when no
    group has a safe neighbour, two groups consecutive in a topological order merge (always
    acyclic, and it also joins disconnected parts).
    """
    heap = [(dag.cost[r], dag.pos[r], r) for r in dag.roots]
    heapq.heapify(heap)
    blocked: list[int] = []
    while len(dag.roots) > max_groups:
        if not heap:
            keep = dag.merge_consecutive()
            heap = [(dag.cost[r], dag.pos[r], r) for r in dag.roots]
            heapq.heapify(heap)
            blocked = []
            continue
        cost, _, r = heapq.heappop(heap)
        if r not in dag.roots:
            continue
        if cost != dag.cost[r]:  # stale: the group grew since it was pushed
            heapq.heappush(heap, (dag.cost[r], dag.pos[r], r))
            continue
        options = [(dag.cost[s], -w, dag.pos[s], r, s) for s, w in dag.succ[r].items()]
        options += [(dag.cost[p], -w, dag.pos[p], p, r) for p, w in dag.pred[r].items()]
        options.sort()
        pair = next(((u, v) for _, _, _, u, v in options if dag.can_merge(u, v)), None)
        if pair is None:
            blocked.append(r)
            continue
        keep = dag.merge(*pair)
        heapq.heappush(heap, (dag.cost[keep], dag.pos[keep], keep))
        for b in blocked:  # a merge may have removed the path that blocked them
            if b in dag.roots:
                heapq.heappush(heap, (dag.cost[b], dag.pos[b], b))
        blocked = []


def group_graph(graph: nx.DiGraph, max_groups: int | None = None, tiny_op_seconds: float = 20e-6,
                device_kind: str | None = None, *, gm: fx.GraphModule | None = None) -> Grouping:
    """Group the ops of a placement graph (see the module doc); returns a :class:`Grouping`.

    The group graph has nodes ``g0..gK`` in a topological order, with the members'
    numeric attributes summed (``flops``, ``param_bytes``, ``param_tensors``, ``bytes_moved``),
    ``time``, ``fwd_time``, ``bwd_time`` and ``opt_time`` summed per kind (``opt_time`` leaves
    out a kind on which a parameter-owning member has no optimizer time), ``out_bytes`` = bytes of the tensors
    that leave the group, ``act_bytes`` = activations its members keep for backward,
    ``members`` (ops in topological order), ``op="group"``, ``target`` of its costliest
    member, ``module`` = the members' common module path. Edge ``bytes`` sums, per
    producer op, the tensor it sends to the other group once. Graph attributes are copied,
    plus ``op_to_group``. ``gm`` (optional, the capture's GraphModule) lets the rules see
    ``inplace=True`` arguments and modules, which the placement graph does not record.
    """
    kind = _check_arguments(graph, max_groups, tiny_op_seconds, device_kind)
    # Grouping allocates hundreds of thousands of small dicts and tuples that all stay alive;
    # the cyclic collector would rescan them over and over (a third of the time at 50k ops).
    with paused_gc():
        return _group(graph, max_groups, float(tiny_op_seconds), kind, gm)


def _topological_names(graph: nx.DiGraph) -> list[str]:
    try:
        return list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(graph)
        raise GraphError(f"the placement graph has a cycle ({' -> '.join(str(u) for u, _ in cycle[:5])} ...); "
                         "expected a DAG as captured from a forward pass") from None


def _group(graph: nx.DiGraph, max_groups: int | None, tiny_op_seconds: float, kind: str | None,
           gm: fx.GraphModule | None) -> Grouping:
    names = _topological_names(graph)
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    attrs = [graph.nodes[name] for name in names]
    costs = [node_cost(a, kind) for a in attrs]
    int_edges = [(index[u], index[v], float(d.get("bytes") or 0)) for u, v, d in graph.edges(data=True)]

    uf = UnionFind(n)
    mandatory_unions(graph, index, uf, gm)
    collapse_cycles(n, ((u, v) for u, v, _ in int_edges), uf)
    dag = GroupDAG(n, uf, int_edges, costs)
    if kind is None:
        merge_tiny(dag, 0.0, inclusive=True)  # unprofiled: only ops that do no work (module doc)
    elif tiny_op_seconds > 0:
        merge_tiny(dag, float(tiny_op_seconds))
    if max_groups is not None and len(dag) > max_groups:
        reduce_groups(dag, max_groups)

    order = dag.topological_roots()
    group_of_root = {r: f"g{k}" for k, r in enumerate(order)}
    op_to_group = {name: group_of_root[uf.find(i)] for i, name in enumerate(names)}
    groups: dict[str, list[str]] = {group_of_root[r]: [] for r in order}
    for name in names:
        groups[op_to_group[name]].append(name)
    ggraph = build_group_graph(graph, groups, op_to_group, dict(zip(names, costs)))
    ggraph.graph["grouping"] = {"max_groups": max_groups, "tiny_op_seconds": float(tiny_op_seconds),
                                "device_kind": kind, "ops": n}
    return Grouping(graph=ggraph, op_to_group=op_to_group, groups=groups)


def _common_module(paths: list[str]) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    common = split[0]
    for parts in split[1:]:
        k = 0
        while k < min(len(common), len(parts)) and common[k] == parts[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def build_group_graph(graph: nx.DiGraph, groups: Mapping[str, list[str]], op_to_group: Mapping[str, str],
                      costs: Mapping[str, float] | None = None) -> nx.DiGraph:
    """The quotient of ``graph`` by ``groups`` with the attributes described in :func:`group_graph`."""
    ggraph = nx.DiGraph(**dict(graph.graph))
    ggraph.graph["op_to_group"] = dict(op_to_group)
    cost_of = costs.__getitem__ if costs is not None else None
    leaves = {u for u, v in graph.edges if op_to_group[u] != op_to_group[v]}
    for group, members in groups.items():
        data: dict[str, Any] = {"op": "group", "members": list(members), "size": len(members)}
        sums: dict[str, float] = {}
        times: dict[str, dict[str, float]] = {key: {} for key in _TIME_KEYS}
        untimed: set[str] = set()
        act = 0
        leaving = 0
        grad = False
        for m in members:
            a = graph.nodes[m]
            for key, value in a.items():
                if key not in _NOT_SUMMED and _is_number(value):
                    sums[key] = sums.get(key, 0) + value
            for key in _TIME_KEYS:
                for k, v in (a.get(key) or {}).items():
                    times[key][k] = times[key].get(k, 0.0) + float(v)
            if a.get("param_tensors"):
                # A member whose update was not timed on a kind: the group's update on that
                # kind is then estimated as a whole (the cost model's roofline), not half-summed.
                untimed.update(k for k in (a.get("fwd_time") or {}) if k not in (a.get("opt_time") or {}))
            rg = _requires_grad(a)
            grad = grad or rg
            out = int(a.get("out_bytes") or 0)
            if "act_bytes" in a:  # measured at capture (graphs.saved_activations)
                act += int(a.get("act_bytes") or 0)
            elif rg and a.get("op") not in ("get_attr", "output"):
                act += out  # graphs captured before: compile_problem's fallback estimate
            if m in leaves:
                leaving += out
        heaviest = max(members, key=cost_of) if cost_of else members[-1]
        # The group's "output" tensor: the largest one that leaves it (else its last member's).
        leavers = [m for m in members if m in leaves]
        shown = max(leavers, key=lambda m: int(graph.nodes[m].get("out_bytes") or 0)) if leavers else members[-1]
        for kind in untimed:
            times["opt_time"].pop(kind, None)
        data.update(sums)
        data.update(times)
        data.update(target=str(graph.nodes[heaviest].get("target", "")),
                    module=_common_module([str(graph.nodes[m].get("module") or "") for m in members]),
                    shape=graph.nodes[shown].get("shape"), dtype=graph.nodes[shown].get("dtype"),
                    out_bytes=int(leaving), act_bytes=int(act), requires_grad=bool(grad))
        ggraph.add_node(group, **data)
    # Edge bytes: a producer's tensor crosses to a given other group once, however many of
    # that group's ops read it (the largest piece, when different consumers read slices).
    sent: dict[tuple[str, str], float] = {}
    for u in graph.nodes:
        gu = op_to_group[u]
        per_dest: dict[str, float] = {}
        for v, d in graph.succ[u].items():
            gv = op_to_group[v]
            if gv != gu:
                per_dest[gv] = max(per_dest.get(gv, 0.0), float(d.get("bytes") or 0))
        for gv, b in per_dest.items():
            sent[(gu, gv)] = sent.get((gu, gv), 0.0) + b
    for (gu, gv), b in sent.items():
        ggraph.add_edge(gu, gv, bytes=int(b))
    return ggraph
