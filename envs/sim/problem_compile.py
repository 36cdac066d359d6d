"""Compiling a placement graph on a cluster into a :class:`~envs.sim.problem.PlacementProblem`.

:func:`compile_problem` fixes the program order (:func:`topological_order`), costs every op
on every device with the cost model, lays the ops out as :class:`~envs.sim.op_arrays.OpArrays`
and sums them into the groups of a :class:`graphs.grouping.Grouping` (the placement unit;
without one every op is its own group). :func:`resolve_optimizer` names the optimizer a graph
is costed with. The reference simulator reads the same order and optimizer, so both live
here rather than with the problem's arrays.

Example::

    problem = compile_problem(op_graph, load_cluster("4xK40"), grouping=grouping)
    row = problem.placement_to_array({group: "gpu0" for group in problem.node_names})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from envs.hardware.rank_devices import is_distributed_cluster
from envs.sim.cost_model import CostModel, node_requires_grad, param_grad_bytes
from envs.sim.grad_accumulation import accumulate_costs
from envs.sim.memory_rules import gradient_parts, loop_held_bytes
from envs.sim.op_arrays import batch_norm_channels, op_arrays
from envs.sim.optimizer_state import (
    OPTIMIZER_FOREACH_WORK,
    OPTIMIZER_STATE_FACTOR,
    OPTIMIZER_STEP_WORK,
    known_state_kind,
)
from envs.sim.problem import PlacementError, PlacementProblem
from envs.sim.rank_simulator import RankSimulator
from graphs.errors import GraphError
from graphs.grouping import Grouping


def resolve_optimizer(graph: nx.DiGraph, optimizer: str | None) -> str:
    """The :data:`OPTIMIZER_STATE_FACTOR` key a graph is costed with: ``optimizer`` when given,
    else the one the graph was profiled with (``graph.graph["optimizer"]``), else plain SGD.

    Raises:
        PlacementError: an explicitly named optimizer that is not known.
    """
    if optimizer is None:
        profiled = graph.graph.get("optimizer") if isinstance(graph, nx.DiGraph) else None
        return known_state_kind(str(profiled).lower()) if profiled else "sgd"
    key = str(optimizer).lower()
    if key not in OPTIMIZER_STATE_FACTOR:
        raise PlacementError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZER_STATE_FACTOR)}")
    return key


def topological_order(graph: nx.DiGraph) -> list[str]:
    """The fixed topological order every simulator uses: Kahn's algorithm, ties broken by
    the order nodes were added to the graph (the fx order for a captured graph).

    Raises:
        GraphError: when the graph has a cycle.
    """
    position = {n: i for i, n in enumerate(graph.nodes)}
    try:
        return list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(graph)
        raise GraphError(
            f"graph {graph.graph.get('name', '')!r} has a cycle through {[u for u, _ in cycle][:5]}; "
            "a placement graph must be a DAG"
        ) from None


def compile_problem(
    graph: nx.DiGraph,
    cluster: Cluster | str,
    optimizer: str | None = None,
    cost_model: CostModel | None = None,
    grouping: Grouping | None = None,
    leaves: Mapping[str, int] | None = None,
) -> PlacementProblem:
    """Compile a placement graph on a cluster into a :class:`PlacementProblem` (module doc).

    Args:
        graph: the op graph (placement graph with the attributes of docs/contracts.md);
            missing numeric attributes count as 0, a missing ``requires_grad`` as True
            except for placeholders and the output. (A group graph passed here is
            simulated as if each group were one op.)
        cluster: a :class:`~envs.hardware.cluster.Cluster`, or anything :func:`~envs.hardware.loading.load_cluster` takes.
        optimizer: name in :data:`OPTIMIZER_STATE_FACTOR`: its state bytes per parameter byte
            count in memory, and the default cost model estimates its update on unprofiled
            devices. Default: the optimizer the graph was profiled with
            (``graph.graph["optimizer"]``), else plain SGD.
        cost_model: op costs; default :meth:`CostModel.for_graph` (profiles where the device
            kind was profiled, calibrated roofline elsewhere).
        grouping: the :class:`graphs.grouping.Grouping` of ``graph`` whose groups are the
            placement unit (``node_names`` = its groups in topological order). None: every
            op is its own group.
        leaves: on a rank cluster, tensors per value (:func:`envs.sim.rank_compile.value_leaves` of
            the captured module: the runtime sends one message per tensor); default 1 each.

    Raises:
        PlacementError: unknown optimizer, or a grouping that does not cover the graph's ops.
        GraphError: empty graph or a cycle.
    """
    key = resolve_optimizer(graph, optimizer)
    if not isinstance(graph, nx.DiGraph) or graph.number_of_nodes() == 0:
        raise GraphError("compile_problem needs a non-empty networkx.DiGraph placement graph")
    cluster = load_cluster(cluster)
    if cost_model is None:
        cost_model = CostModel.for_graph(graph, cluster, optimizer=key)
    order = topological_order(graph)
    index = {n: i for i, n in enumerate(order)}
    attrs = [graph.nodes[v] for v in order]

    def column(key: str) -> np.ndarray:
        return np.array([float(a.get(key) or 0) for a in attrs], dtype=np.float64)

    requires_grad = np.array([node_requires_grad(a) for a in attrs], dtype=bool)
    out_bytes = column("out_bytes")
    if all("act_bytes" in a for a in attrs):
        # Measured at capture (graphs.saved_activations: the storages autograd saves, the
        # model outputs the training loop holds); a group graph sums its members'.
        act_bytes = column("act_bytes")
    else:
        # Fallback for graph files written before act_bytes was measured: each op that
        # requires grad keeps its output (off by 0.4-1.3x on the zoo, memory.md).
        # Parameters (get_attr) are counted in param_bytes; the output node is no tensor.
        keeps = requires_grad & np.array([a.get("op") not in ("get_attr", "output") for a in attrs])
        act_bytes = np.where(keeps, out_bytes, 0.0)
    parts = np.array([gradient_parts(a) for a in attrs], dtype=np.float64).reshape(-1, 2)
    grad_bytes, shared_grad = parts.max(axis=1), parts[:, 1]
    cost = cost_model.op_costs(graph, order, cluster.devices)
    cost[~requires_grad, :, 2:] = 0.0
    fixed_host = cost_model.op_fixed_costs(graph, order, cluster.devices, cost)
    accumulate = accumulate_costs(graph, order, cluster.devices, cost_model)
    param_bytes = column("param_bytes")
    frozen_bytes = np.minimum(column("frozen_bytes"), param_bytes)
    # What the parameters' gradients take: param_bytes less frozen_bytes, a sparse gradient's rows.
    param_grads = np.array([param_grad_bytes(a) for a in attrs], dtype=np.float64)
    flops = column("flops")

    edges = sorted((index[u], index[v], float(d.get("bytes") or 0)) for u, v, d in graph.edges(data=True))
    op_src = np.array([e[0] for e in edges], dtype=np.int64)
    op_dst = np.array([e[1] for e in edges], dtype=np.int64)
    op_bytes = np.array([e[2] for e in edges], dtype=np.float64)

    names = cluster.device_names
    d = len(names)
    is_cpu = np.array([dev.kind == "cpu" for dev in cluster.devices], dtype=bool)
    latency = np.zeros((d, d))
    bandwidth = np.full((d, d), np.inf)
    for a in range(d):
        for b in range(d):
            if a != b:
                link = cluster.link(names[a], names[b])
                latency[a, b] = link.latency_s
                bandwidth[a, b] = link.bandwidth_Bps

    if grouping is None:
        group_names = tuple(order)
        op_group = np.arange(len(order), dtype=np.int64)
    else:
        group_names, op_group = _group_slots(grouping, order)
    ops = op_arrays(order, op_group, cost, requires_grad, param_bytes, act_bytes, out_bytes, flops,
                    op_src, op_dst, op_bytes, is_cpu, cost_model.host, grad_bytes, shared_grad, fixed_host,
                    accumulate, frozen_bytes, param_grads)
    ops = replace(ops, tied_reads=tuple((index[v], index[owner], float(b)) for v, a in zip(order, attrs)
                                        for owner, b in (a.get("tied_param_bytes") or {}).items() if owner in index),
                  input_bytes=float(sum(out_bytes[i] for i, a in enumerate(attrs) if a.get("op") == "placeholder")),
                  step_work=OPTIMIZER_STEP_WORK[key] * np.where(requires_grad, param_grads, 0.0),
                  foreach_work=OPTIMIZER_FOREACH_WORK[key] * np.where(requires_grad, param_grads, 0.0),
                  loop_held=np.array([loop_held_bytes(graph, v) for v in order], dtype=np.float64),
                  batch_held=np.where([a.get("op") == "placeholder" for a in attrs], out_bytes, 0.0),
                  norm_channels=np.array([batch_norm_channels(a) for a in attrs], dtype=np.float64),
                  sparse_grad=np.array([bool(a.get("sparse_grad_bytes")) for a in attrs], dtype=bool))
    rank_simulator = None
    if is_distributed_cluster(cluster):
        ops = replace(ops, one_process_per_device=True)
        # Processes exchange messages over gloo, which the one-process rules do not model.
        rank_simulator = RankSimulator(graph, cluster, leaves=leaves, op_to_group=(
            grouping.op_to_group if grouping is not None else {n: n for n in order}))
    g = len(group_names)

    def per_group(values: np.ndarray) -> np.ndarray:
        if grouping is None:
            return values.copy()
        out = np.zeros((g,) + values.shape[1:])
        np.add.at(out, op_group, values)
        return out

    fwd = cost[:, :, 0] + cost[:, :, 1]
    bwd = cost[:, :, 2:].sum(axis=2)
    if grouping is None:
        edge_src, edge_dst, edge_bytes = op_src, op_dst, op_bytes
        g_rg, g_out = requires_grad, out_bytes
    else:
        edge_src, edge_dst, edge_bytes = _group_edges(op_group, op_src, op_dst, op_bytes, g)
        g_rg = np.zeros(g, dtype=bool)
        np.logical_or.at(g_rg, op_group, requires_grad)
        gattrs = grouping.graph.nodes
        g_out = np.array([float(gattrs[v].get("out_bytes") or 0) for v in group_names], dtype=np.float64)
    node_attrs = attrs if grouping is None else [grouping.graph.nodes[v] for v in group_names]
    modules = tuple(str(a.get("module") or "") for a in node_attrs)

    return PlacementProblem(
        name=str(graph.graph.get("name", "graph")),
        node_names=tuple(group_names),
        device_names=tuple(names),
        device_kinds=tuple(dev.kind for dev in cluster.devices),
        fwd_time=per_group(fwd),
        bwd_time=per_group(bwd),
        param_bytes=per_group(param_bytes),
        frozen_bytes=per_group(frozen_bytes),
        param_grads=per_group(param_grads),
        act_bytes=per_group(act_bytes.astype(np.float64)),
        out_bytes=g_out,
        flops=per_group(flops),
        edge_src=edge_src,
        edge_dst=edge_dst,
        edge_bytes=edge_bytes,
        latency=latency,
        bandwidth=bandwidth,
        memory_capacity=np.array([dev.usable_bytes for dev in cluster.devices], dtype=np.float64),
        optimizer_state_factor=OPTIMIZER_STATE_FACTOR[key],
        simulated=cluster.simulated,
        requires_grad=g_rg,
        cluster_name=cluster.name,
        ops=ops,
        rank_simulator=rank_simulator,
        node_modules=modules if any(modules) else (),
    )


def _group_slots(grouping: Grouping, order: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(group names in the group graph's topological order, [N] group slot of each op)."""
    group_names = tuple(topological_order(grouping.graph))
    slot = {name: k for k, name in enumerate(group_names)}
    try:
        op_group = np.array([slot[grouping.op_to_group[op]] for op in order], dtype=np.int64)
    except KeyError as exc:
        raise PlacementError(f"the grouping does not cover op or group {exc.args[0]!r} of the graph; "
                             "expected the Grouping built from this op graph") from None
    if len(grouping.op_to_group) != len(order):
        raise PlacementError(f"the grouping maps {len(grouping.op_to_group)} ops, the graph has {len(order)}; "
                             "expected the Grouping built from this op graph")
    return group_names, op_group


def _group_edges(op_group: np.ndarray, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray,
                 g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group edges with :func:`graphs.grouping.build_group_graph`'s bytes rule: a producer op's
    tensor crosses to another group once (its largest edge there); summed per group pair."""
    gs, gd = op_group[src], op_group[dst]
    cut = gs != gd
    per_dest: dict[tuple[int, int], float] = {}
    for u, gv, b in zip(src[cut].tolist(), gd[cut].tolist(), nbytes[cut].tolist()):
        k = (u, gv)
        per_dest[k] = max(per_dest.get(k, 0.0), b)
    sent: dict[tuple[int, int], float] = {}
    for (u, gv), b in per_dest.items():
        k = (int(op_group[u]), gv)
        sent[k] = sent.get(k, 0.0) + b
    items = sorted(sent.items())
    return (np.array([k[0] for k, _ in items], dtype=np.int64), np.array([k[1] for k, _ in items], dtype=np.int64),
            np.array([float(int(b)) for _, b in items], dtype=np.float64))
