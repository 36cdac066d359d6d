"""The placement graph: a networkx DiGraph with one node per fx node and its costs.

Built from a shape-annotated ``torch.fx.GraphModule`` — either ``node.meta["tensor_meta"]``
written by ``ShapeProp`` (fx capture) or ``node.meta["val"]`` fake tensors (torch.export
capture). Node and edge attributes follow docs/contracts.md; the time dicts stay empty
until profiling fills them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import TensorMetadata

from graphs.autograd_functions import is_function_call
from graphs.flops import is_convolution, node_bytes_moved, node_flops
from graphs.ops import differentiated_regions, later_writes, transform_regions
from graphs.region_costs import region_costs


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype, size and autograd flag of one tensor a node produces."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    requires_grad: bool
    #: a sparse layout (COO, CSR, ...): ``nbytes`` is then its dense size
    sparse: bool = False


def _as_int(size: Any) -> int:
    try:
        return int(size)
    except (TypeError, ValueError, RuntimeError):  # an unbacked SymInt has no concrete value
        return 0


def _info(shape: Any, dtype: torch.dtype, requires_grad: bool, sparse: bool = False) -> TensorInfo:
    dims = tuple(_as_int(s) for s in shape)
    count = 1
    for d in dims:
        count *= d
    return TensorInfo(dims, dtype, count * dtype.itemsize, bool(requires_grad), sparse)


def _walk(value: Any) -> Iterator[TensorInfo]:
    # TensorMetadata is a NamedTuple: test it before the generic tuple case.
    if isinstance(value, TensorMetadata):
        # ShapeProp gives a sparse tensor no strides (fx/passes/shape_prop.py), a dense one one per dimension
        yield _info(value.shape, value.dtype, value.requires_grad, len(value.stride) != len(value.shape))
    elif isinstance(value, torch.Tensor):
        yield _info(value.shape, value.dtype, value.requires_grad, value.layout != torch.strided)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)


def tensor_outputs(node: fx.Node) -> list[TensorInfo]:
    """Every tensor ``node`` produces, from ShapeProp's ``tensor_meta`` or export's ``val``."""
    if "tensor_meta" in node.meta:
        return list(_walk(node.meta["tensor_meta"]))
    if "val" in node.meta:
        return list(_walk(node.meta["val"]))
    return []


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def target_text(target: Any) -> str:
    """The fx target as stable text: ``"layer1.0.conv1"``, ``"torch.add"``, ``"aten.linear.default"``."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    try:
        name = _get_qualified_name(target)
    except Exception:  # objects without a qualified name: drop memory addresses from repr
        return _ADDRESS.sub("", repr(target))
    return name.replace("_operator.", "operator.", 1) if name.startswith("_operator.") else name


def node_target_text(node: fx.Node) -> str:
    """:func:`target_text` of ``node``; a custom autograd Function recorded whole
    (:mod:`graphs.autograd_functions`) is named by its class: ``"model.GradReverse.apply"``."""
    if is_function_call(node):
        return f"{str(node.args[0]).replace(':', '.')}.apply"
    return target_text(node.target)


def owning_module(node: fx.Node) -> str:
    """Qualified path of the module ``node`` belongs to (``""`` for the top level).

    call_module nodes own themselves; other nodes take the innermost entry of
    ``nn_module_stack`` (recorded by both fx's tracer and torch.export); get_attr nodes
    outside any module call belong to their attribute's parent.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(str(path))
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def owning_module_type(node: fx.Node, gm: nn.Module) -> str:
    """Class name of the module ``node`` belongs to (``""`` when unknown or top level)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    stack = node.meta.get("nn_module_stack")
    if stack:
        kind = list(stack.values())[-1][1]
        text = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        return text.rsplit(".", 1)[-1]
    return ""


def _clean_path(path: str) -> str:
    # torch.export (strict) may spell paths as L['self'].layers[0]; keep dotted module paths.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object at dotted ``target`` under ``gm`` (a get_attr node's tensor), or None when absent."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
             torch.complex128)


def build_placement_graph(gm: fx.GraphModule, *, name: str, method: str, fingerprint: str,
                          trust_requires_grad: bool = True) -> nx.DiGraph:
    """Turn a shape-annotated GraphModule into the placement graph of docs/contracts.md.

    ``param_bytes`` of a parameter or buffer is counted once, on the first node that uses
    it, so a module called twice (shared weights) does not double the model's memory; its
    ``bytes_moved`` still counts the parameters it reads on every call. ``frozen_bytes`` is the
    part of it that gets no gradient (buffers, parameters with ``requires_grad=False``: a
    LoRA base layer, a frozen backbone), and so no optimizer state and no all-reduce. That first node's
    ``shared_param_bytes`` (present only when > 0) says how many of its parameter bytes
    other nodes use too (a tied embedding): their gradients are summed in the backward.
    Each node reading such a parameter that another node owns gets ``tied_param_bytes``
    (``{owner node: bytes}``): a pipeline stage holding the reader but not the owner keeps its
    own copy, with its gradient and optimizer state. A node whose storage an op updates in
    place after it gets ``updated_later`` (that op's name), for the rank simulator's refusals.
    ``trust_requires_grad``: use the autograd flag recorded on the tensors (ShapeProp runs
    with autograd on); torch.export records none, so it is derived from the graph instead.
    """
    graph = nx.DiGraph(name=name, fingerprint=fingerprint, capture=method, profiled_kinds=[])
    infos: dict[fx.Node, list[TensorInfo]] = {}
    out_bytes: dict[fx.Node, int] = {}
    grad: dict[fx.Node, bool] = {}
    owned: dict[int, str] = {}  # tensor id -> the node charged with its param_bytes
    shared: dict[str, int] = {}
    reused: set[int] = set()
    tied: dict[str, dict[str, int]] = {}  # reading node -> {owner node: parameter bytes}

    def shape_of(arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, fx.Node):
            found = infos.get(arg)
            return found[0].shape if found else None
        return None

    for node in gm.graph.nodes:
        outputs = [] if node.op == "output" else tensor_outputs(node)
        infos[node] = outputs
        total = sum(t.nbytes for t in outputs)
        out_bytes[node] = total
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None

        param_bytes = 0
        frozen_bytes = 0  # of param_bytes: buffers and parameters with requires_grad=False
        params_read = 0
        tensors: list[torch.Tensor] = []
        if module is not None:
            tensors = _module_tensors(module)
            params_read = sum(t.numel() * t.element_size() for t in tensors)
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                params_read = total  # a lookup reads the rows it returns, not the table
        elif node.op == "get_attr":
            value = fetch_attr(gm, str(node.target))
            tensors = [value] if isinstance(value, torch.Tensor) else []
        for t in tensors:
            if id(t) not in owned:
                owned[id(t)] = node.name
                param_bytes += t.numel() * t.element_size()
                if not t.requires_grad:
                    frozen_bytes += t.numel() * t.element_size()
            elif t.requires_grad and owned[id(t)] != node.name:
                owner = owned[id(t)]
                reads = tied.setdefault(node.name, {})
                reads[owner] = reads.get(owner, 0) + t.numel() * t.element_size()
                if id(t) not in reused:
                    # Once per tensor: however many nodes reuse it (an unrolled cell's 50 steps),
                    # the backward sums one more gradient into its accumulated one at a time.
                    reused.add(id(t))
                    shared[owner] = shared.get(owner, 0) + t.numel() * t.element_size()

        sparse = _sparse_gradient(module, node, shape_of) if module is not None and param_bytes else None
        inputs = node.all_input_nodes
        grad[node] = _requires_grad(node, outputs, tensors, inputs, grad, trust_requires_grad)
        first = outputs[0] if outputs else None
        region = region_costs(node, gm, tensor_outputs)  # an autocast region's own ops (graphs.region_costs)
        graph.add_node(
            node.name,
            op=node.op,
            target=node_target_text(node),
            module=owning_module(node),
            module_type=owning_module_type(node, gm),
            shape=list(first.shape) if first else None,
            dtype=str(first.dtype) if first else None,
            out_bytes=int(total),
            param_bytes=int(param_bytes),
            frozen_bytes=int(frozen_bytes),
            flops=int(region.flops if region is not None
                      else node_flops(node, module, shape_of, first.shape if first else None)),
            convolution=region is None and is_convolution(node, module),
            bytes_moved=int(region.bytes_moved if region is not None
                            else node_bytes_moved(node, [out_bytes[i] for i in inputs], total, params_read)),
            requires_grad=bool(grad[node]),
            fwd_time={},
            bwd_time={},
            time={},
        )
        if region is not None:
            graph.nodes[node.name]["num_ops"] = max(1, region.ops)  # its kernel launches
        if sparse is not None:
            graph.nodes[node.name]["sparse_param_bytes"], graph.nodes[node.name]["sparse_grad_bytes"] = sparse
        if node.op != "placeholder" and any(t.sparse for t in outputs):
            graph.nodes[node.name]["sparse_output"] = True  # it stays with its consumers (graphs.grouping)
        for inp in inputs:
            graph.add_edge(inp.name, node.name, bytes=int(_edge_bytes(inp, node, infos, out_bytes)))
    for name, nbytes in shared.items():
        graph.nodes[name]["shared_param_bytes"] = int(nbytes)
    for name, reads in tied.items():
        graph.nodes[name]["tied_param_bytes"] = {owner: int(b) for owner, b in reads.items()}
    for name, writer in later_writes(gm).items():
        graph.nodes[name]["updated_later"] = writer.name
    for name, differentiated in differentiated_regions(gm).items():
        graph.nodes[name]["differentiates"] = differentiated
    for name, transformed in transform_regions(gm).items():
        graph.nodes[name]["transform_region"] = transformed
    return graph


def differentiated_runs(graph: nx.DiGraph) -> list[list[str]]:
    """What each ``torch.autograd.grad`` of the graph's forward differentiates, itself included, in
    graph order: the node attribute ``differentiates`` (:func:`graphs.ops.differentiated_regions`;
    on the output node, what a loss that differentiates through the model goes through,
    :func:`mark_loss_differentiated`), which the grouping keeps in one group and the stage cut in
    one stage."""
    return [list(run) for _, run in graph.nodes(data="differentiates") if run]


def kept_whole_runs(graph: nx.DiGraph) -> list[list[str]]:
    """Runs of nodes that no process boundary may cut, each in graph order: what a
    ``torch.autograd.grad`` differentiates (:func:`differentiated_runs`) and each inlined
    ``torch.func.vmap`` region (the node attribute ``transform_region``,
    :func:`graphs.ops.transform_regions`). The grouping keeps each in one group and the stage
    cut in one stage."""
    return differentiated_runs(graph) + [list(run) for _, run in graph.nodes(data="transform_region") if run]


def mark_loss_differentiated(graph: nx.DiGraph) -> list[str]:
    """Mark the whole graph, in graph order, as the output node's ``differentiates`` run: the loss
    differentiates through the model (:func:`graphs.loss_reach.loss_differentiates_through_model`),
    so no process boundary may cut what lies behind the output, and the loss, which runs where
    the output is, reads the model inputs as its targets too (a pipeline stage holding only a
    target would hand the output to the loss across a boundary). Returns the run (empty where
    the graph has no output node).

    >>> g = nx.DiGraph([("x", "a"), ("a", "output"), ("target", "sink")])
    >>> g.nodes["output"]["op"] = "output"
    >>> mark_loss_differentiated(g)
    ['x', 'a', 'output', 'target', 'sink']
    """
    output = next((n for n, op in graph.nodes(data="op") if op == "output"), None)
    if output is None:
        return []
    run = list(graph.nodes)
    graph.nodes[output]["differentiates"] = run
    return run


def _sparse_gradient(module: nn.Module, node: fx.Node, shape_of: Any) -> tuple[int, int] | None:
    """``(weight bytes, gradient bytes)`` of an embedding with ``sparse=True``, whose weight's
    gradient is a sparse COO tensor of the rows looked up: per index, a row of values and an
    int64 index (measured: an ``EmbeddingBag(1_000_000, 64, sparse=True)`` step under SGD peaks
    at its weight plus what 4,096 lookups take, not twice the table). None for other modules."""
    if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or not module.sparse or not module.weight.requires_grad:
        return None
    shape = shape_of(node.args[0]) if node.args else None
    if shape is None:
        return None
    lookups = math.prod(shape)
    weight = module.weight
    return weight.numel() * weight.element_size(), lookups * (weight.shape[1] * weight.element_size() + 8)


def _edge_bytes(producer: fx.Node, consumer: fx.Node, infos: dict, out_bytes: dict) -> int:
    """Bytes crossing producer→consumer: the producer's output, or only the piece a getitem takes."""
    if (consumer.op == "call_function" and consumer.target is operator.getitem
            and len(infos.get(producer, ())) != 1):
        return out_bytes[consumer]
    return out_bytes[producer]


def _requires_grad(node: fx.Node, outputs: list[TensorInfo], tensors: list[torch.Tensor],
                   inputs: list[fx.Node], grad: dict[fx.Node, bool], trust: bool) -> bool:
    if not outputs:
        return False
    if trust:
        return any(t.requires_grad for t in outputs)
    if node.op == "get_attr":
        return any(t.requires_grad for t in tensors)
    if node.op == "placeholder":
        return any(t.requires_grad for t in outputs)
    if not any(t.dtype in _FLOATING for t in outputs):
        return False  # integer/bool results (argmax, comparisons) carry no gradient
    if node.op == "call_function" and "detach" in target_text(node.target):
        return False
    return any(grad.get(i, False) for i in inputs) or any(t.requires_grad for t in tensors)
