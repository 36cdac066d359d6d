"""The op vocabulary shared by FLOP counting and grouping: an op's name, and which ops alias or copy.

One home for what an op *is*, so that :mod:`graphs.flops` (what an op costs) and
:mod:`graphs.grouping` (what must stay on its input's device) cannot disagree. An op is
known by its bare name whether it arrives as an fx node (``F.linear``, ``aten.linear.default``,
the method ``"linear"``) or as the ``target`` text of a placement-graph node.

The sets follow what PyTorch does with memory:

* :data:`VIEW_OPS` return a tensor that shares its input's storage (``Tensor.view``,
  ``transpose``, ``getitem`` with basic indexing, ``split``…; the "view ops" of
  PyTorch's *Tensor Views* page) or only read metadata (``size``, ``dim``): no arithmetic
  and no bytes moved.
* :data:`LAYOUT_OPS` — ``contiguous`` — return the input itself when it is already
  contiguous and a packed copy otherwise (``Tensor.contiguous``), so they are not views for
  cost (counted as a copy: bytes, no FLOPs) but, like views, belong with the tensor they
  repack: grouping keeps them on their producer's device.
* :data:`COPY_OPS` move or build data without arithmetic: bytes, no FLOPs.

>>> op_name("aten.view.default"), op_name("torch.relu_"), op_name("operator.iadd")
('view', 'relu_', 'iadd')
>>> canonical_op_name("add_"), canonical_op_name("__add__"), canonical_op_name("copy_")
('add', 'add', 'copy_')
>>> "contiguous" in STAYS_WITH_INPUT_OPS and "contiguous" not in VIEW_OPS
True
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

#: Ops whose result aliases their first input, or that only query metadata: no arithmetic, no traffic.
VIEW_OPS: frozenset[str] = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "T", "mT", "H", "mH",
    "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "narrow",
    "select", "slice", "getitem", "split", "split_with_sizes", "tensor_split", "chunk", "unbind",
    "alias", "as_strided", "detach", "diagonal", "unfold", "movedim", "moveaxis", "swapaxes",
    "swapdims", "_unsafe_view", "view_as_real", "view_as_complex", "real", "imag",
    "size", "dim", "numel", "stride", "sym_size", "sym_numel", "sym_stride", "getattr",
    "_assert_tensor_metadata",
})
#: Ops that return their input unchanged when it is already contiguous, else a packed copy.
LAYOUT_OPS: frozenset[str] = frozenset({"contiguous"})
#: Ops grouping places with the op that produced their first input: views and layout ops.
STAYS_WITH_INPUT_OPS: frozenset[str] = VIEW_OPS | LAYOUT_OPS
#: Ops that copy or create data without arithmetic: bytes, no FLOPs.
COPY_OPS: frozenset[str] = frozenset({
    "contiguous", "clone", "copy", "copy_", "to", "_to_copy", "lift_fresh_copy", "cat", "concat",
    "stack", "embedding", "index", "index_select", "gather", "scatter", "pad", "constant_pad_nd",
    "repeat", "tile", "roll", "flip", "zeros", "ones", "zeros_like", "ones_like", "full",
    "full_like", "empty", "empty_like", "arange", "new_zeros", "new_ones", "new_empty",
    "new_full", "masked_fill", "where", "cpu", "cuda", "type", "type_as",
})
#: Ops that make a tensor from sizes or values alone, with no tensor input whose device they
#: follow: on their ``device=``, else on the default device, wherever their node was placed
#: (``torch.arange(n)`` in a model's forward; torch.export bakes the capture's ``device=``).
#: ``new_zeros`` and the ``*_like`` ops are not among them: they follow their input.
FACTORY_OPS: frozenset[str] = frozenset({
    "arange", "range", "zeros", "ones", "full", "empty", "empty_strided", "eye", "tensor", "as_tensor",
    "scalar_tensor", "linspace", "logspace", "tril_indices", "triu_indices", "hann_window",
    "hamming_window", "blackman_window", "bartlett_window", "kaiser_window",
})
#: Factory ops that draw random numbers: the numbers depend on the device that draws them (CPU
#: and CUDA generators differ), so moving the draw to another device changes the model's values.
RANDOM_FACTORY_OPS: frozenset[str] = frozenset({"rand", "randn", "randint", "randperm", "normal"})
#: Python operators that update their left operand (``x += y``, ``x[i] = y``), by name in :mod:`operator`.
INPLACE_OPERATOR_NAMES: frozenset[str] = frozenset({
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
    "ixor", "ilshift", "irshift", "setitem",
})


def _augmented_assignment(name: str) -> Callable[[Any, Any], Any]:
    apply = getattr(operator, name)

    def augmented(target: Any, value: Any) -> Any:
        # operator.iadd updates a tensor in place and returns it, and returns a new value
        # for an int; the caller's name for the old value is never rebound (fx's own code
        # for operator.iadd nodes, "a += b; iadd = a", rebinds it: an int read again later
        # would read the sum).
        return apply(target, value)

    augmented.__name__ = augmented.__qualname__ = name
    augmented.__doc__ = f"``target {name[1:]}= value`` as fx records it: ``operator.{name}(target, value)``."
    return augmented


#: ``x += y`` and the other augmented assignments as the functions placer's fx tracer records
#: (:class:`graphs.fx_tracer.PlacerTracer`): fx's Proxy has no ``__iadd__``, so Python fell back to
#: ``x = x + y`` and the graph computed a new tensor where the model updated one in place (a
#: view or another name of ``x`` then read the old values). Module-level names, so that a
#: GraphModule calling them pickles.
AUGMENTED_ASSIGNMENTS: dict[str, Callable[[Any, Any], Any]] = {
    name: _augmented_assignment(name) for name in sorted(INPLACE_OPERATOR_NAMES - {"setitem"})}
globals().update(AUGMENTED_ASSIGNMENTS)

#: The same operators as the functions an fx graph calls (``operator.iadd`` ..., and placer's own).
INPLACE_OPERATORS: frozenset[Callable[..., object]] = frozenset(
    [getattr(operator, name) for name in INPLACE_OPERATOR_NAMES] + list(AUGMENTED_ASSIGNMENTS.values()))


def op_name(target: fx.Node | str) -> str:
    """The bare name of an op, from an fx node or a placement graph's target text.

    ``aten.view.default`` → ``view``, ``torch.relu_`` → ``relu_`` (in-place suffixes are kept:
    see :func:`canonical_op_name`), ``operator.iadd`` → ``iadd``. A node that calls nothing
    (placeholder, get_attr, output) is named by its fx op; a ``call_module`` by its op too
    (the module type, not the name, says what it computes).
    """
    if isinstance(target, fx.Node):
        node = target
        if node.op == "call_method":
            return str(node.target)
        if node.op != "call_function":
            return node.op
        packet = getattr(node.target, "_overloadpacket", None)
        name = getattr(packet, "__name__", None) or getattr(node.target, "__name__", None)
        if name:
            return str(name)
        target = str(node.target)
    parts = str(target).split(".")
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1]
    return parts[-1]


def canonical_op_name(name: str) -> str:
    """The out-of-place name the cost tables use: ``add_`` → ``add``, ``__add__`` → ``add``, ``iadd`` → ``add``.

    Copies keep their in-place spelling (``copy_`` is its own op in :data:`COPY_OPS`).
    """
    if name.endswith("_") and not name.endswith("__") and name not in COPY_OPS:
        name = name[:-1]
    if name in INPLACE_OPERATOR_NAMES and name != "setitem":  # iadd (x += y) computes what add does
        return name[1:]
    return name.strip("_") if name.startswith("__") else name


#: aten ops that update running statistics in place without saying so in their schema
#: (argument indices of running_mean / running_var).
_BATCHNORM_ATEN = {
    "aten::batch_norm": (3, 4),
    "aten::native_batch_norm": (3, 4),
    "aten::_native_batch_norm_legit": (3, 4),
    "aten::_batch_norm_impl_index": (3, 4),
    "aten::instance_norm": (3, 4),
    "aten::cudnn_batch_norm": (3, 4),
}


#: Tensor methods named as in-place ops that change a flag, not the values: a physics-informed
#: network calls ``x.requires_grad_()`` on its input to differentiate by it; counted as a write,
#: the placed model copied its moved input back into the caller's, which the original's call
#: had made a leaf requiring grad ("a leaf Variable that requires grad is being used in an
#: in-place operation").
FLAG_METHODS = frozenset({"requires_grad_", "share_memory_"})


def method_updates_in_place(name: str) -> bool:
    """Whether the Tensor method ``name`` updates its tensor in place: ``add_``, ``relu_``, and
    the operators' own methods ``__iadd__``, ``__setitem__`` (which come as methods on a tensor
    fx did not proxy, a constant forward() made, and as ``operator.iadd`` on a Proxy); not
    :data:`FLAG_METHODS`.

    >>> [method_updates_in_place(n) for n in ("mul_", "mul", "__setitem__", "__add__", "requires_grad_")]
    [True, False, True, False, False]
    """
    if name.startswith("__"):
        return name.endswith("__") and name[2:-2] in INPLACE_OPERATOR_NAMES
    return name.endswith("_") and name not in FLAG_METHODS


#: torch.nn.functional calls that update tensors they are given: ``(position, keyword)`` of each
#: (functional's own torch-function dispatch passes some by keyword: ``F.instance_norm``'s
#: statistics), and for the embeddings only with ``max_norm``, which renormalises the rows it
#: looks up in the weight itself (``torch.embedding_renorm_``).
_FUNCTIONAL_WRITES: dict[str, tuple[tuple[int, str], ...]] = {
    "batch_norm": ((1, "running_mean"), (2, "running_var")),
    "instance_norm": ((1, "running_mean"), (2, "running_var")),
    "embedding": ((1, "weight"),),
    "embedding_bag": ((1, "weight"),),
}


def mutated_args(node: fx.Node, root: nn.Module) -> list[int | str]:
    """The arguments ``node`` updates in place: indices of ``node.args``, or keywords of
    ``node.kwargs`` where the tensor is passed by keyword (:func:`argument` reads either)."""
    if node.op == "call_method":
        return [0] if method_updates_in_place(str(node.target)) else []
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        return [0] if getattr(mod, "inplace", False) is True else []
    if node.op != "call_function":
        return []
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _wrapped_writes(node, root)
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        idx: list[int | str] = [
            i
            for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write and i < len(node.args)
        ]
        bn = _BATCHNORM_ATEN.get(schema.name)
        if bn is not None:
            idx += [i for i in bn if i < len(node.args)]
        return idx
    name = getattr(target, "__name__", "")
    if name in _FUNCTIONAL_WRITES and getattr(target, "__module__", "").startswith("torch.nn.functional"):
        if name.startswith("embedding") and node.kwargs.get("max_norm") is None:
            return []
        return [i if i < len(node.args) else key for i, key in _FUNCTIONAL_WRITES[name] if i < len(node.args)
                or key in node.kwargs]
    if node.kwargs.get("inplace") is True or (not name.startswith("__") and method_updates_in_place(name)):
        return [0]
    if target in INPLACE_OPERATORS:
        return [0]  # x += y, x[i] = y update their left operand
    return []


def _wrapped_writes(node: fx.Node, root: nn.Module) -> list[int | str]:
    """Indices of ``node.args`` that a higher-order op's subgraph updates in place.

    torch.export wraps a region it runs in another mode in one such op
    (``wrap_with_set_grad_enabled(False, submod, *operands)``, ``wrap_with_autocast``): a mean
    teacher's ``t.mul_(0.99).add_(o)`` under ``no_grad`` is inside, on the subgraph's
    placeholders, which stand for the operands after the subgraph's own argument. Missed, the
    update could run on a copy of the teacher's weights placed elsewhere, and be lost (found by
    trying over two devices).
    """
    for k, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            try:
                sub = root.get_submodule(str(arg.target))
            except AttributeError:
                continue
            if isinstance(sub, fx.GraphModule):
                placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
                written = {held for _, held in in_place_writes(sub)}
                return [k + 1 + i for i, p in enumerate(placeholders) if p in written and k + 1 + i < len(node.args)]
    return []


def view_parent(node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node``'s result may share as a view (``view``, ``transpose``,
    ``narrow``, ``getitem``, ``reshape``, ``contiguous``…: :data:`STAYS_WITH_INPUT_OPS`, those
    that may copy included); None for any other op."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0] if op_name(node) in STAYS_WITH_INPUT_OPS else None


def storage_roots(nodes: Iterable[fx.Node], root: nn.Module) -> dict[fx.Node, fx.Node]:
    """Node -> the node that made the storage its result lives in, over ``nodes`` in program
    order: followed through views (:func:`view_parent`) and through in-place ops that return
    their first argument (``x.mul_(a)`` returns ``x``); a node that makes its own storage is
    its own root."""
    roots: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        source = view_parent(n)
        if 0 in mutated_args(n, root) and isinstance(n.args[0], fx.Node):
            source = n.args[0]
        roots[n] = roots[source] if source is not None else n
    return roots


def argument(node: fx.Node, key: int | str) -> Any:
    """``node``'s argument at ``key``: a position of ``node.args`` or a keyword of ``node.kwargs``
    (None where there is none)."""
    if isinstance(key, int):
        return node.args[key] if key < len(node.args) else None
    return node.kwargs.get(key)


def written_nodes(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The nodes whose tensors ``node`` updates in place."""
    return [a for key in mutated_args(node, root) if isinstance(a := argument(node, key), fx.Node)]


def in_place_writes(gm: fx.GraphModule, roots: Mapping[fx.Node, fx.Node] | None = None) -> list[tuple[fx.Node, fx.Node]]:
    """Every in-place update in ``gm``, in graph order: ``(the node that writes, the node whose
    tensor it writes)``. The second is followed through in-place ops' results (``x.mul_(a)``
    returns ``x`` itself: ``.add_`` on its result writes ``x``) and through views (``buf[:2].add_(1)``
    writes ``buf``), so it is a ``get_attr`` node when the write reaches a parameter or buffer.
    ``roots``: :func:`storage_roots` of ``gm``'s nodes, where the caller has them already."""
    if roots is None:
        roots = storage_roots(gm.graph.nodes, gm)
    return [(n, roots[arg]) for n in gm.graph.nodes for arg in written_nodes(n, gm)]


def later_writes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Node name -> the first node after it that updates its storage in place (through the
    node itself, a view of it or the tensor it views). Nodes whose storage nothing updates
    after them are left out. A value handed to another process is a copy that such an update
    misses, and a stage input is a fresh autograd leaf that refuses it."""
    roots = storage_roots(gm.graph.nodes, gm)
    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    writers: dict[str, list[fx.Node]] = {}
    for writer, written in in_place_writes(gm, roots):
        writers.setdefault(written.name, []).append(writer)
    out: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        later = [w for w in writers.get(roots[n].name, ()) if position[w.name] > position[n.name]]
        if later:
            out[n.name] = later[0]
    return out


def differentiated_regions(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Per ``torch.autograd.grad`` call in ``gm``'s forward (a physics-informed loss, a gradient
    penalty): the ops on a path from a tensor it differentiates by (its ``inputs``) to one it
    differentiates (its ``outputs``), those tensors' nodes included, and the grad op itself, in
    graph order. The backward it runs goes through exactly these ops, so they run where one
    autograd graph joins them (the grouping and the stage cut keep them together).
    """
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    regions: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.autograd.grad:
            continue
        above = _reached(_nodes_in(argument(node, 0) if node.args else node.kwargs.get("outputs")),
                         lambda n: n.all_input_nodes)
        below = _reached(_nodes_in(argument(node, 1) if len(node.args) > 1 else node.kwargs.get("inputs")),
                         lambda n: list(n.users))
        regions[node.name] = [n.name for n in sorted((above & below) | {node}, key=position.__getitem__)]
    return regions


def transform_regions(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Per ``torch.func.vmap`` that torch.export inlined (``_vmap_increment_nesting`` ...
    ``_vmap_decrement_nesting``, the functorch predispatch calls): the nodes from the one that
    enters it to the one that leaves it, in graph order. The values in between are batched
    tensors of functorch's interpreter stack, which exist only inside that process between the
    two calls: none may be sent to another process, and a stage that ran only part of the
    region left the stack one level deep (every later backward in the process failed:
    "backward() called inside a functorch transform").

    >>> from torch.func import vmap
    >>> class Batched(torch.nn.Module):
    ...     def forward(self, w, x):
    ...         return vmap(lambda w: (w * x).relu())(w).sum(0)
    >>> gm = torch.export.export(Batched(), (torch.randn(3, 4), torch.randn(4))).module()
    >>> [(first, run[-1]) for first, run in transform_regions(gm).items()]
    [('_vmap_increment_nesting', '_vmap_decrement_nesting')]
    """
    regions: dict[str, list[str]] = {}
    open_runs: list[list[str]] = []
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name == "_vmap_increment_nesting":
            open_runs.append([])
        for run in open_runs:
            run.append(node.name)
        if name == "_vmap_decrement_nesting" and open_runs:
            run = open_runs.pop()
            regions[run[0]] = run
    return regions


def _nodes_in(value: Any) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v)]
    return []


def _reached(start: list[fx.Node], step: Any) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(start)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _torch_function_named(node: fx.Node, names: frozenset[str]) -> bool:
    # torch's own (torch.arange, aten.arange.default), not a wrapped user function of that name.
    return (node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith("torch")
            and op_name(node) in names)


def is_factory(node: fx.Node) -> bool:
    """Whether ``node`` makes a tensor without following an input's device (:data:`FACTORY_OPS`,
    :data:`RANDOM_FACTORY_OPS`). Only a ``call_function`` qualifies (``torch.arange``,
    ``aten.arange.default``): a method call has its tensor to follow."""
    return _torch_function_named(node, FACTORY_OPS | RANDOM_FACTORY_OPS)


@functools.cache
def draws_random_numbers(name: str) -> bool:
    """Whether the torch op called ``name`` draws random numbers (``bernoulli``, ``normal_``,
    ``multinomial``, ``poisson``, ``dropout``, ``_sample_dirichlet``...): aten tags each overload
    of such an op ``nondeterministic_seeded``, so the rule needs no list of names to keep.

    >>> [draws_random_numbers(n) for n in ("bernoulli", "uniform_", "multinomial", "add", "no_such_op")]
    [True, True, True, False, False]
    """
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("__") else None
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(torch.Tag.nondeterministic_seeded in getattr(packet, overload).tags for overload in packet.overloads())


def draws_random(node: fx.Node) -> bool:
    """Whether ``node`` is a factory that draws random numbers (:data:`RANDOM_FACTORY_OPS`).
    ``torch.normal(mean, std)`` with tensor arguments draws where they are; counted all the
    same, as whoever moves its result then finds it already there."""
    return _torch_function_named(node, RANDOM_FACTORY_OPS)
