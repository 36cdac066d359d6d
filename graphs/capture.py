"""Capturing a PyTorch model as a runnable fx graph plus its placement graph.

First choice: ``torch.fx.symbolic_trace`` at module granularity (:class:`PlacerTracer`):
standard ``torch.nn`` layers and recurrent modules stay one ``call_module`` node, as do
the leaf modules the user names; buffers and parameters used directly become
``get_attr`` nodes. Shapes come from ``ShapeProp`` on fake tensors (no memory, no
compute), on real tensors when an op has no fake implementation.

Fallback, for models fx cannot trace (Python control flow on shapes, iteration over
tensors, most Hugging Face models): ``torch.export.export(strict=False)`` without
decompositions; ``exported.module()`` is the runnable GraphModule and each node's module
is recovered from its ``nn_module_stack``. When both fail, :class:`CaptureError` names the
model line that could not be traced.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import itertools
import logging
import operator
import random
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_symbolic_trace
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.errors import CaptureError
from graphs.eval_mode import (
    EvalArguments,
    _same_tensor,
    export_eval_arguments,
    export_eval_plan,
    export_module_modes,
    follow_eval_graph,
    follow_eval_mode,
    fx_eval_arguments,
    refuse_eval_mode,
    refuse_other_shapes,
)
from graphs.fingerprint import model_fingerprint
from graphs.model_file import preserved_buffers
from graphs.module_attributes import ensure_module, keep_plain_attributes
from graphs.ops import (
    AUGMENTED_ASSIGNMENTS,
    FACTORY_OPS,
    RANDOM_FACTORY_OPS,
    draws_random_numbers,
    method_updates_in_place,
    op_name,
    storage_roots,
)
from graphs.placement_graph import build_placement_graph
from graphs.random_state import kept_random_state
from graphs.saved_activations import annotate_saved_bytes
from graphs.user_frames import describe_frame, is_user_file, user_frame

log = logging.getLogger(__name__)

# Recurrent layers run a time loop inside one kernel: keeping them whole is the only
# sensible granularity (unrolled cells are how a model exposes per-step parallelism).
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)



@dataclass
class CapturedModel:
    """A captured model: the runnable GraphModule and its placement graph (names shared)."""

    gm: fx.GraphModule
    graph: nx.DiGraph
    method: str
    fingerprint: str
    model: nn.Module
    example_inputs: tuple
    name: str = "model"
    shapes_from: str = "fake"
    fx_error: str | None = None
    leaf_modules: tuple = field(default_factory=tuple)
    #: module path -> ``training`` flag of every module while it was traced (see :func:`capture`).
    training_modes: dict[str, bool] = field(default_factory=dict)


#: Values a module attribute may hold that a trace bakes into the graph when forward() reads
#: them (:func:`pin_constant_attributes`): Python numbers, flags and text, plain tensors (not
#: parameters or buffers: fx keeps such a tensor as a constant of its own), None, and tuples,
#: lists and dicts of Python values (:func:`_baked_value`).
Scalar = float | int | bool | str | torch.Tensor | None | tuple | list | dict
_SCALAR_TYPES = (float, int, bool, str, torch.Tensor)


def _baked_value(value: Any) -> bool:
    """Whether a module attribute holding ``value`` is one a trace bakes in when forward() reads
    it (:data:`Scalar`): a Python number, flag or text, a plain tensor, None (``if self.temp is not
    None:``), or a tuple, list or dict of such Python values (``self.scales = (1.0, 0.5)``,
    ``self.opts = {"act": "relu"}``: set anew on the placed model, they changed nothing, with no
    error; walkthrough: outputs 1.6 off)."""
    if value is None or type(value) in _SCALAR_TYPES:
        return True
    if type(value) in (tuple, list):
        return all(v is None or type(v) in _SCALAR_TYPES[:-1] for v in value)
    if type(value) is dict:
        return all(type(k) is str and (v is None or type(v) in _SCALAR_TYPES[:-1]) for k, v in value.items())
    return False


@dataclass(frozen=True)
class TensorRead:
    """A plain tensor attribute forward() read while traced, by its shape (:func:`pin_constant_attributes`)."""

    shape: tuple[int, ...]


class PlacerTracer(fx.Tracer):
    """fx tracer at module granularity: torch.nn layers, recurrent modules and user leaves are single nodes.

    Buffers are proxied (``get_attr`` nodes) like parameters: fx's default hands forward()
    the real buffer, so ``self.ema.mul_(0.9)`` or ``self.calls.add_(1)`` would run once on
    the user's model at trace time and be missing from the graph.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_types: Sequence[type] = (), leaf_names: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.leaf_names = frozenset(leaf_names)
        self.grad_enabled = True
        self.without_grad: list[fx.Node] = []  # nodes made with gradients turned off
        self.autocast = _autocast_state()  # when tracing began: a node made under another is refused
        self.constant_reads: dict[str, Scalar | TensorRead] = {}  # module attributes forward() read (:data:`Scalar`)
        self.modes_read: dict[str, bool] = {}  # module path -> the training flag forward() read of it
        self.attributes_read: set[str] = set()  # Python attributes forward() read before setting them

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.grad_enabled = torch.is_grad_enabled()
        self.without_grad = []
        self.autocast = _autocast_state()
        self.modes_read, self.attributes_read = {}, set()
        with _GuardedTrace(self, root), _factories_taking_proxies(self), _python_draws_refused(), \
                _constant_attributes_read(root, self.modes_read, self.attributes_read) as self.constant_reads:
            graph = super().trace(root, concrete_args)
        self._refuse_grad_mode_it_drops(graph)
        _augmented_out_of_place(graph, self.root)
        for node in graph.nodes:
            # Under `from __future__ import annotations` forward's annotations are strings, which
            # fx's code names as globals that pickle cannot find: torch.save(placed) failed.
            if isinstance(node.type, str):
                node.type = None
        return graph

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.grad_enabled and not torch.is_grad_enabled():
            self.without_grad.append(node)
        if kind != "placeholder" and _autocast_state() != self.autocast:
            # fx records no autocast region: its ops would run in float32 where the model ran
            # them in bfloat16 (walkthrough: 3e-3 max output difference, every placement
            # failing the check). torch.export records the region (wrap_with_autocast).
            raise AutocastNotTraced(f"forward() enters torch.autocast around {kind} {_target_name(target)}; "
                                    "torch.fx does not record autocast")
        return node

    def _refuse_grad_mode_it_drops(self, graph: fx.Graph) -> None:
        """Raise :class:`GradModeNotTraced` when an op forward() runs with gradients off
        (``torch.no_grad``, ``set_grad_enabled(False)``, ``inference_mode``) reads a trainable
        parameter, directly or through other ops.

        fx records no grad mode, so such an op got gradients in the graph (a scale computed
        under no_grad changed every gradient; an EMA of activations made its buffer require
        grad; walkthrough). torch.export records the mode, so the model is left to it. An op
        that reads no parameter (a statistic of the input) computes the same either way and
        stays with fx, whose graph still follows ``.eval()``.
        """
        if not self.without_grad:
            return
        trainable: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op == "get_attr":
                with contextlib.suppress(AttributeError):
                    value = self.root.get_parameter(str(node.target))
                    if value.requires_grad:
                        trainable.add(node)
            elif node.op == "call_module":
                module = self.root.get_submodule(str(node.target))
                if any(p.requires_grad for p in module.parameters()):
                    trainable.add(node)
            if any(arg in trainable for arg in node.all_input_nodes):
                trainable.add(node)
        for node in self.without_grad:
            if node in trainable:
                target = getattr(node.target, "__name__", node.target)
                raise GradModeNotTraced(
                    f"forward() turns gradients off (torch.no_grad, set_grad_enabled or inference_mode) "
                    f"around {node.op} {target}, which reads trainable parameters; torch.fx does not "
                    "record the grad mode")

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugmentedProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, RECURRENT_TYPES) or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if m._backward_hooks or m._backward_pre_hooks:
            # Traced through, its backward hooks were lost (walkthrough: gradients 1.7 off);
            # called whole, autograd runs them.
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _AugmentedProxy(fx.Proxy):
    """An fx Proxy that records ``x += y`` (and ``-=``, ``*=``, ``|=`` ...) as the in-place update it is.

    fx's Proxy defines no ``__iadd__``, so Python ran ``x = x + y``: a new tensor in the
    graph where the model updates ``x`` in place, and a view or another name of ``x`` taken
    before read the old values (walkthrough: ``t = h.t(); h += y`` gave another output).
    Where nothing reads the old tensor again, :func:`_augmented_out_of_place` turns the
    update back into ``x + y``. Item assignment (``out[:, :4] = h``), which fx's Proxy refuses,
    is recorded as ``operator.setitem``, the in-place update it is.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _record_augmented(name: str) -> None:
    target = AUGMENTED_ASSIGNMENTS[name]

    def record(self: fx.Proxy, value: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, value), {})

    record.__name__ = f"__{name}__"
    setattr(_AugmentedProxy, record.__name__, record)


for _name in AUGMENTED_ASSIGNMENTS:
    _record_augmented(_name)


def _augmented_out_of_place(graph: fx.Graph, root: nn.Module) -> None:
    """Record ``x += y`` as ``x + y`` where nothing can tell the two apart.

    The in-place form is needed only where the old tensor is read again after the update
    (through its name, a view of it or the tensor it views) or belongs to the caller (an
    input, an attribute). Elsewhere (``out += identity`` at the end of a residual block) the
    out-of-place form computes the same and keeps what stage runtimes rely on: a stage may
    receive ``out`` as a fresh autograd leaf, which an in-place update refuses.
    """
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    storage = storage_roots(nodes, root)  # node -> the node whose storage its result may share
    for n in nodes:
        name = getattr(n.target, "__name__", "")
        if n.op != "call_function" or AUGMENTED_ASSIGNMENTS.get(name) is not n.target:
            continue
        target = n.args[0]
        base = storage[target] if isinstance(target, fx.Node) else None
        if base is not None and base.op in ("placeholder", "get_attr"):
            continue
        read_after = base is not None and any(
            position[user] > position[n] for alias in nodes[:position[n]] if storage[alias] is base
            for user in alias.users if user is not n)
        if not read_after:
            n.target = getattr(operator, name[1:], None) or getattr(operator, f"{name[1:]}_")
            storage[n] = n


def resolve_leaf_modules(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple[tuple[type, ...], set[str]]:
    """Split leaf specs into module types and names (module paths or class names), checking each.

    A name that matches no module path and no class name in ``model`` is refused: a typo
    would otherwise silently change the graph's granularity.
    """
    types: list[type] = []
    names: set[str] = set()
    paths = {path for path, _ in model.named_modules()}
    classes = {type(m).__name__ for m in model.modules()}
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            if leaf not in paths and leaf not in classes:
                raise CaptureError(
                    f"leaf module {leaf!r} matches no module of the model; expected a module path "
                    f"(e.g. {_example_path(paths)!r}) or a module class name (e.g. {sorted(classes)[0]!r})"
                )
            names.add(leaf)
        else:
            raise CaptureError(
                f"leaf module {leaf!r} is a {type(leaf).__name__}; expected an nn.Module subclass, "
                "a module path or a module class name"
            )
    return tuple(types), names


def _example_path(paths: set[str]) -> str:
    named = sorted(p for p in paths if p)
    return named[0] if named else "encoder"


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def fx_trace(model: nn.Module, leaf_types: Sequence[type] = (), leaf_names: Iterable[str] = (),
             name: str = "model") -> fx.GraphModule:
    """Symbolically trace ``model`` with :class:`PlacerTracer` (raises whatever fx raises)."""
    _refuse_root_hooks(model)
    tracer = PlacerTracer(leaf_types, leaf_names)
    with _no_constants_left_on(model, tracer):
        graph = tracer.trace(model)
        _refuse_carried_state(model, tracer.attributes_read, "torch.fx")  # before checked_trace puts them back
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__ if name == "model" else name)
    keep_plain_attributes(gm, (n for n, _ in model.named_buffers(remove_duplicate=False)))
    if tracer.constant_reads:
        pin_constant_attributes(gm, tracer.constant_reads)
    modes = modes_on(gm, tracer.modes_read, model)
    if modes:
        gm.placer_module_modes = modes  # type: ignore[assignment]
    return gm


#: torch.nn layers whose mode lives in their ops' own flags: fx calls them whole (a ``call_module``
#: that follows the layer's flag), and :func:`graphs.eval_mode.export_module_modes` checks them in a
#: torch.export graph only where the flag changes what they compute (an LSTM without dropout does not).
_MODE_IN_OPS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                                             nn.RNNBase, nn.modules.dropout._DropoutNd, nn.RReLU)


def modes_on(gm: fx.GraphModule, modes_read: Mapping[str, bool], model: nn.Module) -> dict[str, bool]:
    """The modes of ``modes_read`` (module path of ``model`` -> the training flag forward() read of
    it while traced) that ``gm`` can be told otherwise: those of its submodules (not the root, whose
    flag switches between the training and the eval forward; nor the layers of :data:`_MODE_IN_OPS`),
    which :func:`graphs.eval_mode.follow_eval_mode` checks at every forward.

    A tracer runs ``if self.training:`` and ``F.dropout(h, p, self.training)`` in a module it
    traces through, so the graph computes the mode it read: ``placed.backbone.eval()`` (a frozen
    backbone) changed nothing, with no error (walkthrough: outputs 0.52 off under fx; 0.015 under
    torch.export, whose ops' own flags were checked but not forward()'s branches).
    """
    modes: dict[str, bool] = {}
    for path, flag in modes_read.items():
        if not path:
            continue
        with contextlib.suppress(AttributeError):
            gm.get_submodule(path)  # a module without state (a Dropout) is not on the graph's module
            if not isinstance(model.get_submodule(path), _MODE_IN_OPS):
                modes[path] = flag
    return modes


@contextlib.contextmanager
def _constant_attributes_read(root: Any, modes_read: dict[str, bool] | None = None,
                              attributes_read: set[str] | None = None,
                              tensors_set: dict[str, bool] | None = None) -> Iterator[dict[str, Scalar | TensorRead]]:
    """The attributes of ``root``'s modules holding a Python ``float``, ``int``, ``bool`` or ``str``,
    or a plain tensor (:data:`Scalar`; a tensor as its :class:`TensorRead`), that the block reads,
    by qualified name; ``training`` is eval mode's (:mod:`graphs.eval_mode`), and names starting
    with ``_`` are nn.Module's own.

    They are taken out of the modules' ``__dict__`` for the block, so a read falls through to
    ``nn.Module.__getattr__``, which is wrapped to record it and return the value; both are put
    back after. A read is what counts, not a use in an op: a value forward() compared
    (``if self.tau > 0.5``) is baked in as surely as one it divided by. Only reads that way are
    seen: a module class with a ``__getattr__`` of its own that does not call ``nn.Module``'s
    hides its reads (they then go unchecked, as before).

    ``modes_read``, where given, gets each module's ``training`` flag that the block reads, by
    module path (:func:`modes_on`), seen the same way; ``attributes_read`` the qualified names of
    the attributes read while they held their value from before the block (``None`` ones too) or
    were missing (``hasattr``), for :func:`_refuse_carried_state`; ``tensors_set`` whether each
    tensor the block sets as a module attribute computes from the data (:func:`_varies`), where a
    torch.export trace tracks it.
    """
    reads: dict[str, Scalar | TensorRead] = {}
    if not isinstance(root, nn.Module):
        yield reads
        return
    held: dict[int, tuple[str, dict[str, Scalar | None]]] = {}
    paths: dict[int, str] = {}
    for path, module in root.named_modules():
        paths[id(module)] = path
        constants = {k: v for k, v in vars(module).items() if not k.startswith("_")
                     and _baked_value(v)
                     and (k != "training" or modes_read is not None)}
        if constants:
            held[id(module)] = (path, constants)
            for k in constants:
                del module.__dict__[k]
    if not held and attributes_read is None:
        yield reads
        return
    plain_getattr = nn.Module.__getattr__
    plain_setattr = nn.Module.__setattr__

    def recording_setattr(module: nn.Module, name: str, value: Any) -> None:
        if tensors_set is not None and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            node = _export_node(value)
            path = paths.get(id(module))
            if node is not None and path is not None:
                # Now: torch.export rewrites its graph afterwards, and the node's inputs are gone then.
                tensors_set[f"{path}.{name}" if path else name] = _varies(node, set(), {})
        plain_setattr(module, name, value)

    def recording_getattr(module: nn.Module, name: str) -> Any:
        entry = held.get(id(module))
        if entry is not None and name == "training" and name in entry[1]:
            assert modes_read is not None  # held only then
            modes_read[entry[0]] = bool(entry[1][name])
            return entry[1][name]
        path = paths.get(id(module))
        qualname = f"{path}.{name}" if path else name
        if entry is not None and name in entry[1]:
            value = entry[1][name]
            if attributes_read is not None:
                attributes_read.add(qualname)
            # A tensor is kept as its shape: holding it would keep the user's tensor alive beside
            # the placed model's own copy (the graph holds fx's constant, not this attribute). A
            # list or dict as it is now: forward() or the loop may change the object itself later.
            reads[qualname] = (TensorRead(tuple(value.shape)) if isinstance(value, torch.Tensor)
                               else copy.deepcopy(value) if isinstance(value, (list, dict)) else value)
            return value
        try:
            return plain_getattr(module, name)
        except AttributeError:
            if attributes_read is not None and path is not None:
                attributes_read.add(qualname)  # hasattr(self, "h") before the first call sets it
            raise

    # fx's tracer wraps nn.Module.__getattr__ around the one it saved at import
    # (torch.fx._symbolic_trace._orig_module_getattr), so that name records too.
    fx_saved = getattr(_fx_symbolic_trace, "_orig_module_getattr", None)
    nn.Module.__getattr__ = recording_getattr  # type: ignore[method-assign]
    if tensors_set is not None:
        nn.Module.__setattr__ = recording_setattr  # type: ignore[method-assign,assignment]
    if fx_saved is not None:
        _fx_symbolic_trace._orig_module_getattr = recording_getattr
    try:
        yield reads
    finally:
        nn.Module.__getattr__ = plain_getattr  # type: ignore[method-assign]
        nn.Module.__setattr__ = plain_setattr  # type: ignore[method-assign]
        if fx_saved is not None:
            _fx_symbolic_trace._orig_module_getattr = fx_saved
        modules = {id(m): m for m in root.modules()}
        for key, (_, constants) in held.items():
            module = modules.get(key)
            if module is None:
                continue
            for k, v in constants.items():
                module.__dict__.setdefault(k, v)  # one forward() set itself is its own (a trace-time update)


def _export_node(value: torch.Tensor) -> fx.Node | None:
    """The node of torch.export's graph in the making that computes ``value`` (a fake tensor of a
    non-strict trace), or None outside such a trace."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    mode = get_proxy_mode()
    if mode is None:
        return None
    slot = get_proxy_slot(value, mode.tracer, None)
    proxy = getattr(slot, "proxy", None)
    return getattr(proxy, "node", None)


def pin_constant_attributes(gm: fx.GraphModule, reads: Mapping[str, Scalar | TensorRead]) -> None:
    """Refuse a forward of ``gm`` after a module attribute its graph baked in as a Python value
    (:data:`Scalar`) was set to another one on ``gm`` (``placed.block.tau = 0.5``, an annealed
    temperature; ``placed.router.k = 1``; ``placed.gradient_checkpointing = True``).

    fx and torch.export compute with the value forward() read while they traced (``x / self.tau``
    became ``truediv(x, 1.0)``), so setting the attribute changed nothing, with no error (found
    by trying: the annealed model's outputs 2.26 off the original's); a flag or a count forward()
    branched or looped on took one branch for good. ``reads`` is the tracer's ``constant_reads``.
    A module-level forward pre-hook, registered again by copies and pickles
    (:func:`graphs.eval_mode.follow_eval_mode`), like :func:`pin_constant_inputs`'s.
    """
    gm.placer_constant_attributes = dict(reads)  # type: ignore[assignment]
    if _refuse_changed_constants not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_refuse_changed_constants)


def _refuse_changed_constants(module: fx.GraphModule, args: tuple) -> None:
    """Forward pre-hook of :func:`pin_constant_attributes`."""
    baked: dict[str, Scalar | TensorRead] = module.__dict__.get("placer_constant_attributes") or {}
    holders: dict[str, nn.Module | None] = {}
    for qualname, value in baked.items():
        path, _, name = qualname.rpartition(".")
        if path not in holders:
            found: nn.Module | None = module  # get_submodule's checks cost ~4 us a path, on every step
            for part in path.split(".") if path else ():
                found = found._modules.get(part) if found is not None else None
            holders[path] = found  # None: the graph holds no such module, so nothing could be set on it
        holder = holders[path]
        got = value if holder is None else holder.__dict__.get(name, value)
        if got is value or (not isinstance(value, TensorRead) and _same_constant(got, value)):
            continue  # a tensor attribute the graph read is never on the placed model's own modules
        if isinstance(value, TensorRead):
            was, now = f"a tensor{list(value.shape)}", f"another {_leaf_text(got)}"
            remedy = f"register it as a buffer (self.register_buffer({name!r}, tensor)), which the graph reads at every step"
        else:
            was, now = repr(value), repr(got)
            remedy = (f"hold it in a buffer (self.register_buffer({name!r}, torch.tensor({value!r}))), which the graph "
                      "reads at every step, or capture the model again" if type(value) in (float, int)
                      else "capture the model again after changing it")
        raise CaptureError(
            f"{qualname} was {was} when placer captured the model, and its graph computes with that value; it is now "
            f"{now}, which the placed model cannot follow (the capture baked the value into the graph); expected it "
            f"unchanged: {remedy}")


_refuse_changed_constants.placer_hook = True  # type: ignore[attr-defined]  # copies register it again (graphs.eval_mode)


def refuse_hooks_never_run(gm: fx.GraphModule) -> None:
    """Refuse a forward of ``gm`` after a hook was registered on one of its submodules that its
    graph never calls (``placed.backbone.register_forward_hook(fn)``, where fx traced through
    ``backbone``; any submodule of a torch.export graph).

    Such a module is a container of the state its ops read: the graph runs those ops itself, so
    the hook never ran, with no error (walkthrough: a forward hook doubling a block's output,
    loss 0.29 off; a pre-hook 0.098 off). Hooks registered before capture are in the graph (the
    tracers run them); a module the graph calls (a torch.nn layer, a leaf module) runs its own.
    A module-level forward pre-hook, registered again by copies and pickles
    (:func:`graphs.eval_mode.follow_eval_mode`), like :func:`pin_constant_inputs`'s.
    """
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    gm.placer_never_called = [  # type: ignore[assignment]
        path for path, _ in gm.named_modules() if path and not any(
            path == c or path.startswith(c + ".") for c in called)]
    if gm.placer_never_called and _refuse_hooks_never_run not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_refuse_hooks_never_run)


def _refuse_hooks_never_run(module: fx.GraphModule, args: tuple) -> None:
    """Forward pre-hook of :func:`refuse_hooks_never_run`."""
    for path in module.__dict__.get("placer_never_called") or ():
        found: nn.Module | None = module  # get_submodule's checks cost ~4 us a path, on every step
        for part in path.split("."):
            found = found._modules.get(part) if found is not None else None
        if found is not None and (found._forward_hooks or found._forward_pre_hooks or found._backward_hooks
                                  or found._backward_pre_hooks):
            raise CaptureError(
                f"module {path!r} of the placed model has a hook registered after capture, which would never run: the "
                f"graph runs the ops of {path!r} itself and never calls the module; expected the hook registered on "
                "the model before capturing it (the tracers put what it does in the graph), or on a module the graph "
                "calls (a torch.nn layer, a leaf module)")


_refuse_hooks_never_run.placer_hook = True  # type: ignore[attr-defined]  # copies register it again (graphs.eval_mode)


@contextlib.contextmanager
def _no_constants_left_on(model: nn.Module, tracer: fx.Tracer) -> Iterator[None]:
    """Take off ``model`` the tensor constants ``tracer`` sets on it while tracing.

    fx keeps a tensor that forward() makes from constants (``torch.full((4,), 0.5)``,
    ``torch.tensor(1.5)``) by setting it on the traced module itself as ``_tensor_constantN``
    (the GraphModule built in the block copies it from there): the user's model grew
    attributes on every capture (``_tensor_constant3`` after a second), against the
    promise that placing leaves it untouched.
    """
    before = set(vars(model))
    try:
        yield
    finally:
        for qualname in set(tracer.tensor_attrs.values()):
            if "." not in qualname and qualname not in before and qualname in vars(model):
                delattr(model, qualname)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> str:
    """Annotate every node with ``tensor_meta``; returns ``"fake"`` or ``"real"`` (which tensors ran).

    Fake tensors cost no memory or compute; some ops (custom kernels, data-dependent
    output shapes) have no fake implementation, and then real tensors are used, with
    buffers restored afterwards.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        # ShapeProp prints the traceback of a failing node itself; the fallback below is
        # the answer to that failure, so the noise is swallowed.
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
        return "fake"
    except Exception:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
    with contextlib.redirect_stderr(io.StringIO()), preserved_buffers(gm):
        ShapeProp(gm).propagate(*inputs)
    return "real"


def load_torch_exit_report_imports() -> None:
    """Import now what torch's at-exit compile-time report imports at shutdown, once
    fake tensors or torch.export have loaded ``torch._dynamo``.

    The report (``torch._dynamo.utils.dump_compile_times``, an atexit hook) imports
    ``tabulate``, whose ``wcwidth`` builds a NamedTuple with ``eval()``; under CPython 3.11 any
    ``eval()`` at shutdown clears the interpreter's "unhandled KeyboardInterrupt" mark, so a
    script that captured a model and was then stopped by Ctrl-C exited 1 instead of dying by
    SIGINT (130 in a shell). Already imported, nothing runs ``eval()`` at exit.
    """
    if "torch._dynamo.utils" not in sys.modules:
        return
    try:
        import tabulate  # noqa: F401 - imported for its side effect on shutdown, see above
    except ImportError:
        pass  # torch's report falls back to plain joins: nothing is imported at exit


@contextlib.contextmanager
def quiet_torch_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Silence torch's warnings (graph dumps on a failed guard) while a fallback is being tried.

    A failure surfaces as one CaptureError; a success needs no commentary.
    """
    logger = logging.getLogger("torch")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


class HooksNotKept(CaptureError):
    """torch.export would leave gradient hooks or a custom backward out of the graph (its gradients would be other ones)."""


class _GradientHooks(TorchFunctionMode):
    """Notes the gradient hooks forward() registers on tensors (``h.register_hook(fn)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook):
            self.seen = True
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _custom_functions_called() -> Iterator[list[type]]:
    """The ``torch.autograd.Function`` subclasses of the model's own code that forward() calls.

    torch.export traces their forward() and differentiates that: the backward the user wrote
    (a gradient reversal, a straight-through estimator) is gone from the graph (walkthrough).
    Function.apply is wrapped for the block; no torch function mode sees the call.
    """
    seen: list[type] = []
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not cls.__module__.startswith("torch."):
            seen.append(cls)
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield seen
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]


def export_trace(model: nn.Module, inputs: tuple, follow_eval: bool = True) -> fx.GraphModule:
    """``torch.export`` (non-strict, no decompositions) → runnable GraphModule with ``val`` metadata.

    With ``follow_eval`` it follows ``.eval()`` by the training flags placer knows
    (:func:`graphs.eval_mode.export_eval_arguments`); capture leaves that to its second export
    in eval mode (:func:`_export_eval`), which installs the eval forward once.

    Raises:
        CaptureError: the model has backward hooks, or forward() registers gradient hooks on
            tensors: torch.export keeps neither, so the graph's gradients would be other ones.
    """
    hooked = [path or "the model" for path, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if hooked:
        raise HooksNotKept(f"module {hooked[0]!r} has backward hooks (register_full_backward_hook), which torch.export "
                           "leaves out of the graph")
    gradient_hooks = _GradientHooks()
    with quiet_torch_logs(logging.CRITICAL), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        # export warns about torch internals (e.g. RNN flat weights); not the user's concern.
        warnings.simplefilter("ignore")
        modes_read: dict[str, bool] = {}
        attributes_read: set[str] = set()
        tensors_set: dict[str, bool] = {}
        with gradient_hooks, _custom_functions_called() as functions, _python_draws_refused(), \
                _constant_attributes_read(model, modes_read, attributes_read, tensors_set) as constants:
            exported = torch.export.export(model, inputs, strict=False)
    # torch.export puts tensor attributes forward() set back itself (with a warning, silenced above)
    _refuse_carried_state(model, attributes_read, "torch.export", tensors_set)
    if functions:
        raise HooksNotKept(f"forward() calls the autograd Function {functions[0].__qualname__}, whose own backward "
                           "torch.export replaces by the gradient of its forward()")
    if gradient_hooks.seen:
        raise HooksNotKept("forward() registers a gradient hook on a tensor (Tensor.register_hook), which torch.export "
                           "leaves out of the graph")
    # Guards are checks on later inputs' shapes; placement runs the example's shapes and
    # a guard node would be one more (cost-free) node to place.
    gm = exported.module(check_guards=False)
    # torch.export's module overrides train()/eval() on the instance with closures that raise
    # (export/_unlift.py: the graph keeps the mode it was traced in, whatever the flags say).
    # Those closures make the module unpicklable, so it could not be sent to worker processes,
    # and the runtime's train() calls failed. Without them, train()/eval() only set the flags
    # nn.Module keeps, which this graph's ops ignore: follow_eval_mode gives it the eval ops.
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    _drop_export_hooks(gm)
    pin_constant_inputs(gm, constant_inputs(inputs))
    if constants:
        pin_constant_attributes(gm, constants)
    gm.placer_module_modes = {**modes_on(gm, modes_read, model), **export_module_modes(gm, model)}  # type: ignore[assignment]
    if follow_eval:
        follow_eval_mode(gm, export_eval_arguments(gm))
    return gm



@contextlib.contextmanager
def _quiet_trace(model: nn.Module, leaf_types: Sequence[type],
                 leaf_names: Iterable[str]) -> Iterator[tuple[fx.Graph, PlacerTracer, list[str]]]:
    """``model`` traced again by fx, with its warnings silenced and its state restored after
    (the list names, once the block ends, the Python attributes the trace set: :func:`_restored`);
    the constants the trace put on ``model`` stay there until the block ends (for comparing
    them), then go."""
    tracer = PlacerTracer(leaf_types, leaf_names)
    with _restored(model) as python_state, _no_constants_left_on(model, tracer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield tracer.trace(model), tracer, python_state


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[list[str]]:
    """The model's tensors and Python attributes as they were before the block: a trace in eval
    mode runs forward()'s Python once more, and what only eval mode updates (``if not
    self.training: self.seen += 1``, ``self.last = h``) is not the captured graph's to keep (a
    tracer's Proxy was left on the user's model, which then no longer pickled: review). The
    list it yields names, when the block has ended, the Python attributes the block set: state
    no graph records."""
    snapshot = _StateSnapshot.take(model)
    python_state: list[str] = []
    try:
        yield python_state
    finally:
        python_state += snapshot.restore_attributes(model)
        snapshot.restore(model)


def _same_value(a: Any, b: Any) -> bool:
    """Whether two values of a Python attribute are equal (tensors only by identity)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that cannot say whether it is equal has changed
        return False


def _mode_baked_by_fx(model: nn.Module, inputs: tuple, gm: fx.GraphModule, leaf_types: Sequence[type],
                      leaf_names: Iterable[str], trace_modes: dict[str, bool],
                      training_attributes: Sequence[str] = ()) -> EvalArguments | fx.Graph | str:
    """What ``gm`` (fx, traced in ``trace_modes``) runs in eval mode: its eval-mode constants, or
    the model's graph traced in eval mode where it takes other ops, or why it cannot follow
    ``.eval()``.

    fx runs ``if self.training:`` and ``F.dropout(h, p, self.training)`` in the user's code
    while tracing, so the graph keeps the training mode's: after ``placed.eval()`` it still
    scaled and dropped out, with no error (walkthrough). Traced again in eval mode, such a
    model gives the same graph with other constants (:func:`fx_eval_arguments`), or another
    graph (:func:`graphs.eval_mode.follow_eval_graph`; tensors it makes while tracing are kept
    on ``gm`` under names of their own), or none: where fx cannot trace it in eval mode, the
    model exported in eval mode (:func:`_exported_for_fx`), else refused. Traced again in
    training mode, it must give the captured graph back: a value that changes from one trace to
    the next (``random.random()`` in forward) is refused.
    """
    model.eval()
    found: EvalArguments | fx.Graph | None
    python_state: list[str] = []
    try:
        with _quiet_trace(model, leaf_types, leaf_names) as (graph, tracer, python_state):
            found = fx_eval_arguments(gm.graph, graph)
            eval_reads = tracer.constant_reads  # what only eval mode reads is baked in its graph too
            # fx keeps a tensor forward() makes (torch.tensor(0.5 if self.training else 2.0)) as an
            # attribute, read by a get_attr of the same name in both traces.
            made = set(tracer.tensor_attrs.values())
            if found is not None and any(
                    n.op == "get_attr" and n.target in made
                    and not _same_tensor(operator.attrgetter(str(n.target))(gm), operator.attrgetter(str(n.target))(model))
                    for n in graph.nodes):
                found = None  # the same ops on another tensor: the eval graph, with its own tensor
            if found is None:
                found = _own_constants(graph, made.__contains__, model, gm)
    except Exception as exc:  # noqa: BLE001 - untraceable in eval mode: torch.export may capture it
        return _exported_for_fx(model, inputs, gm, trace_modes, training_attributes, _reason(exc))
    finally:
        set_training_modes(model, trace_modes)
    eval_only = [name for name in python_state if name not in training_attributes]
    if eval_only:
        return _eval_python_state(eval_only)
    if eval_reads.keys() - gm.__dict__.get("placer_constant_attributes", {}).keys():
        pin_constant_attributes(gm, {**eval_reads, **gm.__dict__.get("placer_constant_attributes", {})})
    if found is not None:
        # A constant may differ for another reason than the mode (random.random() in forward):
        # traced again in the capture's own modes, the graph must come back as it was.
        try:
            with _quiet_trace(model, leaf_types, leaf_names) as (again, _, _):
                changed = fx_eval_arguments(gm.graph, again) != {}
        except Exception:  # noqa: BLE001
            found, changed = None, False
        if changed:
            # The training graph holds one trace's value: the placed model would train with it at
            # every step (walkthrough: random.uniform(0.5, 1.5) in forward), so nothing is captured.
            raise ChangingValue("forward() gives torch.fx another graph at every trace: it computes with a Python value "
                                "that changes from one call to the next (random.random(), a clock), which a trace "
                                f"runs once and bakes into the graph. {_CHANGING_REMEDY}")
    if found is not None:
        return found
    return ("forward() gives torch.fx another graph at every trace (a value that changes from one trace to the "
            "next, such as random.random()): no eval-mode graph traced from it can be trusted")


def _eval_python_state(names: list[str]) -> str:
    """Why a model whose forward sets Python attributes in eval mode only (``training_attributes``:
    those the training trace set too, a cached tensor, are the graph's constants) cannot follow
    ``.eval()``."""
    return (f"forward() sets the Python attribute {names[0]!r} in eval mode, which no graph records: after "
            ".eval() the placed model would compute without it")


def _own_constants(graph: fx.Graph, constant: Callable[[str], bool], source: nn.Module,
                   gm: fx.GraphModule) -> fx.Graph:
    """``graph`` (an eval-mode trace) with the tensors it reads that are not the model's state
    (``constant(target)``; their values on ``source``) put on ``gm`` under names no
    training-graph constant has."""
    taken = 0
    for n in graph.nodes:
        if n.op == "get_attr" and constant(str(n.target)):
            while hasattr(gm, f"_placer_eval_constant{taken}"):
                taken += 1
            name = f"_placer_eval_constant{taken}"
            object.__setattr__(gm, name, operator.attrgetter(str(n.target))(source))
            n.target = name
    return graph


#: Modules whose forward takes PyTorch's fused fast path in eval mode under ``torch.no_grad()``
#: (``torch._transformer_encoder_layer_fwd``, ``_native_multi_head_attention``, nested tensors
#: for a padding mask), which torch.export never records: it traces the standard path.
_FAST_PATH_MODULES: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer, nn.MultiheadAttention)


def _warn_of_fast_paths(model: nn.Module) -> None:
    """Say that an exported model with :data:`_FAST_PATH_MODULES` computes their standard path
    in eval mode where the original, under ``torch.no_grad()``, takes the fast one: equal up to
    rounding (the fused kernels round otherwise), except at the positions a
    ``src_key_padding_mask`` pads, which ``nn.TransformerEncoder``'s nested tensors fill with 0
    (review: 1.97 apart there, with no word)."""
    paths = [path for path, m in model.named_modules() if isinstance(m, _FAST_PATH_MODULES)]
    if paths:
        log.warning("%s is captured by torch.export, which records the standard path of %s: after .eval(), "
                    "under torch.no_grad() the original takes PyTorch's fast path instead, whose fused kernels "
                    "round otherwise and whose nested tensors (nn.TransformerEncoder with a padding mask) give 0 "
                    "at padded positions, where the placed model gives the standard path's values",
                    type(model).__name__, ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else ""))


def _export_eval(model: nn.Module, inputs: tuple, gm: fx.GraphModule, trace_modes: dict[str, bool],
                 training_attributes: Sequence[str] = ()) -> EvalArguments | fx.Graph | str:
    """What ``gm`` (torch.export, training mode) runs in eval mode: the model exported again
    in eval mode, as constants of ``gm`` (:func:`graphs.eval_mode.export_eval_plan`) or as its
    own graph where it runs other ops; where the eval mode cannot be exported, the training
    flags placer knows (:func:`graphs.eval_mode.export_eval_arguments`), with a warning; where
    it sets Python attributes, why it cannot follow ``.eval()``.

    torch.export runs ``if self.training:`` while tracing, so the graph keeps the training
    branch: after ``placed.eval()`` it ran that branch with no error (walkthrough), and an op
    with a training flag placer's table did not know kept its training mode. Exporting twice
    costs a second export at capture.
    """
    _warn_of_fast_paths(model)
    try:
        eval_gm = _export_in_eval_mode(model, inputs, trace_modes, training_attributes)
    except Exception as exc:  # noqa: BLE001 - the training capture stands
        # What placer did before exporting twice: switch the training flags it knows. Refusing
        # eval mode would stop every validation pass of a model that only fails to export in it.
        log.warning("torch.export cannot capture %s in eval mode (%s): after .eval() the placed model switches "
                    "the training flags of BatchNorm, dropout, InstanceNorm, RNNs and rrelu, but cannot check "
                    "the model's own 'if self.training:' branches", type(model).__name__, _reason(exc))
        return export_eval_arguments(gm)
    if isinstance(eval_gm, str):
        return eval_gm
    plan = export_eval_plan(gm, eval_gm)
    return plan if plan is not None else _exported_eval_graph(eval_gm, model, gm)


def _exported_for_fx(model: nn.Module, inputs: tuple, gm: fx.GraphModule, trace_modes: dict[str, bool],
                     training_attributes: Sequence[str], fx_reason: str) -> fx.Graph | str:
    """The eval graph of ``gm`` (fx, training mode) where fx cannot trace the model in eval mode
    (``if not self.training:`` around a loop over a tensor): the model exported in eval mode, or
    why it cannot follow ``.eval()``.

    Refusing eval mode stopped every validation pass of such a model (walkthrough). torch.export
    specialises its graph on the example's shapes where fx's training graph takes any: another
    batch size could run the example's (``torch.ones(3, 1)`` broadcast over one row) with no
    error, so the eval forward refuses inputs of other shapes
    (``placer_eval_input_shapes``, checked by :func:`graphs.eval_mode.refuse_other_shapes`).
    """
    try:
        eval_gm = _export_in_eval_mode(model, inputs, trace_modes, training_attributes)
    except Exception as exc:  # noqa: BLE001 - neither tracer follows the eval mode
        return (f"torch.fx cannot trace forward() in eval mode ({fx_reason}), nor torch.export capture it "
                f"({_reason(exc)}), and the graph keeps what forward() computed in training mode: after .eval() "
                "it would still run the training one")
    if isinstance(eval_gm, str):
        return eval_gm
    _warn_of_fast_paths(model)
    shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
              for n in eval_gm.graph.nodes if n.op == "placeholder"]
    gm.placer_eval_input_shapes = [  # type: ignore[assignment]
        shape if shape is not None and all(isinstance(d, int) for d in shape) else None for shape in shapes]
    return _exported_eval_graph(eval_gm, model, gm)


def _export_in_eval_mode(model: nn.Module, inputs: tuple, trace_modes: dict[str, bool],
                         training_attributes: Sequence[str]) -> fx.GraphModule | str:
    """``model`` exported in eval mode (its modes ``trace_modes`` again after), or why it cannot
    follow ``.eval()``: forward() sets Python attributes in eval mode only (:func:`_eval_python_state`).

    Raises:
        Exception: whatever torch.export raises.
    """
    model.eval()
    python_state: list[str] = []
    try:
        with _restored(model) as python_state, quiet_torch_logs(logging.CRITICAL):
            eval_gm = export_trace(model, inputs, follow_eval=False)
    finally:
        set_training_modes(model, trace_modes)
    eval_only = [name for name in python_state if name not in training_attributes]
    return _eval_python_state(eval_only) if eval_only else eval_gm


def _exported_eval_graph(eval_gm: fx.GraphModule, model: nn.Module, gm: fx.GraphModule) -> fx.Graph:
    """The graph of ``eval_gm`` (``model`` exported in eval mode) to run over ``gm``'s state:
    torch.export's own constants put on ``gm`` (:func:`_own_constants`)."""
    state = {n for n, _ in itertools.chain(model.named_parameters(remove_duplicate=False),
                                            model.named_buffers(remove_duplicate=False))}
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(eval_gm.graph._codegen)  # the pytree of inputs and outputs
    graph.output(graph.graph_copy(eval_gm.graph, {}))
    return _own_constants(graph, lambda target: target not in state, eval_gm, gm)


def pin_constant_inputs(gm: fx.GraphModule, pinned: tuple[Any, dict[int, Any]]) -> None:
    """Refuse a forward of ``gm`` whose inputs differ from the example's in what the graph
    baked in: their structure (``None`` where a tensor was, a tuple of another length) or a
    value that is not a tensor (``scale=3``, ``flag=False``).

    torch.export specialises on those: called with ``scale=5`` the graph computed with 3, and
    a mask passed where the example had ``None`` was ignored, with no error (walkthrough).
    ``pinned`` is :func:`constant_inputs` of the example. A module-level forward pre-hook (the
    module is pickled into job files), which apply's copy, and the copies and pickles
    :func:`graphs.eval_mode.follow_eval_mode` rebuilds, register again.
    """
    gm.placer_constant_inputs = pinned  # type: ignore[assignment]
    if _refuse_other_constants not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_refuse_other_constants, with_kwargs=True)


def constant_inputs(inputs: tuple) -> tuple[Any, dict[int, Any]]:
    """The pytree structure of ``inputs`` and its leaves that are not tensors, by position."""
    leaves, spec = tree_flatten(inputs)
    return spec, {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}


def _leaf_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor{list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and (a is b or bool(a == b))
    except Exception:  # an object whose == is not a truth value: not one the graph can have compared
        return True


def _refuse_other_constants(module: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of :func:`pin_constant_inputs`."""
    pinned: tuple[Any, dict[int, Any]] = module.placer_constant_inputs  # type: ignore[assignment]
    spec, constants = pinned
    values = args
    if kwargs:  # keyword arguments in their positions (a forward following eval mode takes *args, **kwargs)
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            values = (*bound.args, *bound.kwargs.values())
        except TypeError:
            values = (*args, *kwargs.values())
    leaves, got = tree_flatten(values)
    changed = [f"{_leaf_text(constants[i])} became {_leaf_text(leaves[i])}" for i in constants
               if got == spec and not _same_constant(leaves[i], constants[i])]
    if got != spec or changed:
        what = "; ".join(changed) if changed else "their structure differs (e.g. a tensor where the example had None)"
        raise CaptureError(f"the model's graph was captured by torch.export with the example inputs' values that "
                           f"are not tensors baked in, and these inputs differ: {what}; expected inputs like the "
                           "example's (tensors may change), or capture the model with these")
    refuse_other_shapes(leaves, module.__dict__.get("placer_input_shapes"), _EXPORTED_SHAPES)


_refuse_other_constants.placer_hook = True  # type: ignore[attr-defined]  # copies register it again (graphs.eval_mode)


#: Why an exported training graph that is not batch-generic refuses other shapes (:func:`pin_shapes_unless_generic`).
_EXPORTED_SHAPES = (
    "torch.export captured the model's graph with the example's sizes in its ops, and at capture a batch of another "
    "size computed something else than the model (or failed); expected inputs of the example's shapes: drop or pad "
    "a last, smaller batch (DataLoader(drop_last=True)), or capture the model with the shapes it will train on")


def pin_shapes_unless_generic(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> None:
    """Make ``gm`` (torch.export's training graph of ``model``) refuse inputs of other shapes than
    the example's, unless it computes the model's outputs for a batch of another size.

    torch.export specialises on the example's shapes: sizes the model computes from its input
    (``x.view(x.size(0), -1)``, ``torch.ones(x.shape[0], 1)``) are constants in the graph, so
    a last, smaller batch could run them with no error (a row broadcast over the example's rows,
    found by trying). The check: every tensor input whose first dimension is the first input's
    batch gets one row more (its rows taken in turn), and copies of ``gm`` and ``model`` (one
    deep copy, so their shared tensors stay shared, and forward()'s own updates of them, a
    BatchNorm's statistics or a teacher's weights, land on the copies) run it from one seed.
    Models with more than :data:`BATCH_CHECK_MAX_BYTES` of state, or that cannot be deep-copied,
    are not checked (a log line says so) and keep running any shape, as before.
    """
    leaves, spec = tree_flatten(inputs)
    first = next((v for v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is None:
        return
    state = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if state > BATCH_CHECK_MAX_BYTES:
        log.info("the graph torch.export captured was not checked on another batch size (%.1f GiB of state to "
                 "copy); it may hold the example's batch size", state / 2**30)
        return
    batch = first.shape[0]
    rows = torch.arange(batch + 1) % batch
    grown = tree_unflatten([v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() > 0
                            and v.shape[0] == batch else v for v in leaves], spec)
    try:
        twin_gm, twin_model = copy.deepcopy((gm, model))
    except Exception as exc:  # noqa: BLE001 - a model holding what does not copy (a lock, a file)
        log.info("the graph torch.export captured was not checked on another batch size (the model does not "
                 "deep-copy: %s); it may hold the example's batch size", _reason(exc))
        return
    if not _same_outputs(twin_gm, twin_model, grown):
        gm.placer_input_shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else None  # type: ignore[assignment]
                                  for v in leaves]


#: The most state (parameters and buffers, bytes) :func:`pin_shapes_unless_generic` copies to check a graph.
BATCH_CHECK_MAX_BYTES = 2**30


def _same_outputs(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> bool:
    """Whether ``gm`` and ``model`` compute the same outputs from ``inputs`` (one seed each;
    the random state is left as it was)."""
    try:
        with kept_random_state(), torch.no_grad():
            torch.manual_seed(0)
            got = tree_flatten(gm(*inputs))[0]
            torch.manual_seed(0)
            want = tree_flatten(model(*inputs))[0]
    except Exception:  # noqa: BLE001 - a graph that fails on another batch size is not generic
        return False
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            if a.numel() and not torch.allclose(a.detach().float(), b.detach().float(), rtol=1e-5, atol=1e-6,
                                                equal_nan=True):
                return False
    return True


def _drop_export_hooks(gm: fx.GraphModule) -> None:
    """Remove the forward hooks torch.export's module registers (export/_unlift.py,
    ``_create_stateful_graph_module``): the closures over example inputs that are nn.Modules,
    when there is none (they do nothing then, and closures cannot be pickled into a job file),
    and the input-shape check, which refuses any batch but the example's even where the graph
    runs on it. Guards are off here (``check_guards=False``) for the same reason: micro-batches
    and DDP replicas run the graph on part of the batch, and where an op does fix the batch
    size, it fails on its own (the micro-batch profile then says so) and the numerical check
    compares whatever runs with the full batch."""
    from torch.export._unlift import _check_input_constraints_pre_hook

    for key, hook in list(gm._forward_pre_hooks.items()):
        if hook is _check_input_constraints_pre_hook:
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for key, hook in list(hooks.items()):
            if "_create_stateful_graph_module" not in getattr(hook, "__qualname__", ""):
                continue
            captured = [c.cell_contents for c in (hook.__closure__ or ())]
            if all(isinstance(c, (list, tuple, set, dict)) and not c for c in captured):
                del hooks[key]
                gm._forward_hooks_always_called.pop(key, None)


def capture(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any] = (),
            name: str = "model", loss_fn: Callable[..., torch.Tensor] | None = None) -> CapturedModel:
    """Capture ``model`` on ``example_inputs`` (see the module doc for fx → export → error).

    ``leaf_modules``: module classes, module paths (``"encoder.rnn"``) or class names
    (``"Block"``) to keep as single nodes (fx path only: torch.export always traces into
    modules and keeps the mapping in ``module``). ``loss_fn(output, *inputs)``: the model's
    loss, whose saved tensors count in the ``act_bytes`` of the node producing the output
    (:mod:`graphs.saved_activations`); None counts the forward's alone.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    leaf_modules = tuple(leaf_modules)
    leaf_types, leaf_names = resolve_leaf_modules(model, leaf_modules)
    user_modes = training_modes(model)
    if not model.training:
        # placer places a training step, and a tracer bakes the mode into the graph
        # (F.dropout(x, p, self.training), and all of it under torch.export): a model
        # handed over in eval mode (from_pretrained returns one) would otherwise train
        # without dropout and with frozen BatchNorm statistics. Modules the user put in
        # eval mode inside a training model (a frozen BatchNorm) stay as they are.
        log.info("capturing %s in training mode (it was in eval mode); its modes are restored afterwards", name)
        model.train()
    trace_modes = training_modes(model)
    _refuse_root_backward_hooks(model, name)
    try:
        return _capture(model, inputs, leaf_modules, leaf_types, leaf_names, name, trace_modes, loss_fn)
    finally:
        set_training_modes(model, user_modes)


def _capture(model: nn.Module, inputs: tuple, leaf_modules: tuple, leaf_types: tuple[type, ...],
             leaf_names: set[str], name: str, trace_modes: dict[str, bool],
             loss_fn: Callable[..., torch.Tensor] | None = None) -> CapturedModel:
    fx_error: str | None = None
    baked: EvalArguments | fx.Graph | str | None = None
    training_attributes: list[str] = []  # Python attributes the training trace set (put back)
    try:
        gm = checked_trace(model, "torch.fx", lambda: fx_trace(model, leaf_types, leaf_names, name),
                           _fx_locate(model, leaf_types, leaf_names), training_attributes)
        with quiet_torch_logs(logging.CRITICAL):  # a failure here is the fallback's cue, not the user's news
            shapes_from = propagate_shapes(gm, inputs)
        method = "fx"
        baked = _mode_baked_by_fx(model, inputs, gm, leaf_types, leaf_names, trace_modes, training_attributes)
    except Exception as fx_exc:  # anything fx cannot handle goes to torch.export
        if (isinstance(fx_exc, TraceTimeUpdate) and fx_exc.python_state) or isinstance(fx_exc, ChangingValue):
            # torch.export would bake the same Python value (or drop the same Python state)
            raise CaptureError(f"cannot capture model {name!r}: {fx_exc}") from None
        fx_error = _reason(fx_exc)
        try:
            gm = checked_trace(model, "torch.export", lambda: export_trace(model, inputs, follow_eval=False),
                               lambda targets, _: _line_updating(targets, lambda: export_trace(model, inputs, False)),
                               training_attributes)
        except Exception as export_exc:
            if isinstance(export_exc, TraceTimeUpdate) and isinstance(fx_exc, TraceTimeUpdate):
                raise CaptureError(f"cannot capture model {name!r}: {fx_exc}") from None
            if isinstance(export_exc, TraceTimeUpdate) and export_exc.python_state:
                raise CaptureError(f"cannot capture model {name!r}: {export_exc}") from None
            raise _capture_error(name, fx_exc, export_exc) from None
        method, shapes_from = "export", "fake"
        baked = _export_eval(model, inputs, gm, trace_modes, training_attributes)
    if isinstance(baked, str):
        refuse_eval_mode(gm, baked)
    elif isinstance(baked, dict):
        follow_eval_mode(gm, baked)
    load_torch_exit_report_imports()
    complete_state(gm, model)
    refuse_hooks_never_run(gm)
    follow_eval_mode(gm)  # copies and pickles register its hook again (a no-op where nothing needs that)
    if method == "export":
        pin_shapes_unless_generic(gm, model, inputs)
    if isinstance(baked, fx.Graph):
        # After complete_state: the eval graph may read state the training graph does not.
        try:
            follow_eval_graph(gm, baked, source=model)
        except CaptureError as exc:
            refuse_eval_mode(gm, str(exc))

    fingerprint = model_fingerprint(gm, model, inputs)
    graph = build_placement_graph(gm, name=name, method=method, fingerprint=fingerprint,
                                  trust_requires_grad=(method == "fx"))
    try:
        annotate_saved_bytes(graph, gm, inputs, fake=(shapes_from == "fake"), loss_fn=loss_fn)
    except Exception as exc:  # the graph stays usable: compile_problem's fallback estimate applies
        log.warning("could not measure the activations autograd saves for %s (%s: %s); memory uses the "
                    "estimate 'each op that requires grad keeps its output'", name, type(exc).__name__, exc)
    return CapturedModel(gm=gm, graph=graph, method=method, fingerprint=fingerprint, model=model,
                         example_inputs=inputs, name=name, shapes_from=shapes_from,
                         fx_error=fx_error, leaf_modules=leaf_modules, training_modes=trace_modes)


def training_modes(module: nn.Module) -> dict[str, bool]:
    """module path -> its ``training`` flag."""
    return {path: m.training for path, m in module.named_modules(remove_duplicate=False)}


def set_training_modes(module: nn.Module, modes: dict[str, bool]) -> None:
    """Set each module's ``training`` flag from ``modes`` (paths not in it are left alone)."""
    for path, m in module.named_modules(remove_duplicate=False):
        if path in modes:
            m.training = modes[path]


def _reason(exc: BaseException, limit: int = 240) -> str:
    """One line on why a tracer failed."""
    kind = type(exc).__name__
    text = (str(exc).strip().splitlines() or ["(no message)"])[0]
    if "DataDependent" in kind or "data-dependent" in text:
        text = f"Python control flow depends on tensor values ({text})"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind}: {text}"


def _capture_error(name: str, fx_exc: BaseException, export_exc: BaseException) -> CaptureError:
    if isinstance(export_exc, HooksNotKept):
        return CaptureError(
            f"cannot capture model {name!r}: {export_exc}, and torch.fx could not trace it ({_reason(fx_exc)}); "
            "expected gradient hooks and custom autograd Functions inside a submodule named as a leaf module "
            "(leaf_modules; a submodule with backward hooks is kept whole anyway), so that autograd runs them, "
            "and a forward() torch.fx can trace")
    frame = user_frame(export_exc) or user_frame(fx_exc)
    where = (f"the line that could not be traced is {describe_frame(frame)}" if frame
             else "no model line appears in the traceback")
    return CaptureError(
        f"cannot capture model {name!r}: neither torch.fx nor torch.export could trace it; {where}. "
        f"torch.fx: {_reason(fx_exc)}. torch.export: {_reason(export_exc)}. Expected a forward() "
        "whose Python control flow does not depend on tensor values: rewrite that line (e.g. "
        "torch.where instead of `if`), or name its module as a leaf module"
    )


# --------------------------------------------------------------------------- state updated in forward()


class RandomDrawNotTraced(CaptureError):
    """forward() draws random numbers with its own ``torch.Generator``, which an fx graph cannot
    hold (torch.export can try)."""


class _GuardedTrace(torch.overrides.TorchFunctionMode):
    """While fx traces: record a tensor that forward() makes from constants alone as a node, and
    stop an in-place update of the model's own state before it runs.

    fx records only calls that touch a Proxy, so ``torch.randn(8, 16)`` or ``torch.zeros(3, 8)``
    ran once at trace time and the tensor became a constant (``_tensor_constantN``), with two
    silent consequences (found by trying): noise of a fixed shape was the same at every step
    (first loss 0.2833 against the original's 0.2838), and an update of the tensor that reads
    the data (``out.index_add_(0, idx, h)``, ``out[:, :4] = h``) was recorded on the constant
    while the Python variable kept the unchanged real tensor, so what forward() computed from it
    afterwards (``total += out``) ran at trace time and was baked in too: the model returned
    ones, whatever its input. As a node the tensor is made anew at every call, and everything
    computed from it is traced (a draw keeps its generator: ``envs.runtime.apply`` keeps it on
    the original's device). A random draw from constants alone (``torch.bernoulli(self.keep)`` of
    a plain tensor attribute, ``torch.tensor([...]).normal_()``, a mixup weight
    ``Beta(0.4, 0.4).sample()``) was baked the same way, the same numbers at every step (found by
    trying: outputs 0.68 off), so it is a node too (:func:`graphs.ops.draws_random_numbers`).
    ``torch.tensor(data)`` stays a constant: an update of it that reads
    the data is refused (:class:`ConstantUpdatedByData`), so torch.export, which records it,
    captures the model. Calls that touch a Proxy go on to fx.

    fx traces forward()'s Python on Proxies, but a tensor it reaches without one (parameters
    through ``self.target.parameters()``, a buffer through a list) is the real one: an update of
    it (a mean teacher's ``p.mul_(0.99).add_(q, alpha=0.01)`` under ``no_grad``) ran on the
    user's model at every trace, and capture traces more than once (the line is looked for,
    eval mode is traced too). :func:`checked_trace` refuses such an update after the trace and
    puts buffers back, but not parameters (a copy of each would double a large model's
    memory): the user's teacher was left one or more updates ahead (found by trying). So the
    update is refused here, before it runs, naming the tensor and the model's line.
    """

    def __init__(self, tracer: fx.Tracer, root: Any) -> None:
        super().__init__()
        self.tracer = tracer
        self.state: dict[int, str] = {}  # storage address -> the parameter or buffer it holds
        if isinstance(root, nn.Module):
            for name, t in [*root.named_parameters(), *root.named_buffers()]:
                if t.device.type != "meta":
                    self.state.setdefault(t.untyped_storage().data_ptr(), name)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self._refuse_unrecorded_update(func, args, kwargs)
        if _reads_data(args, kwargs) or not (_is_factory_call(func) or _is_random_call(func)):
            return func(*args, **kwargs)
        return _factory_node(self.tracer, func, args, kwargs)

    def _refuse_unrecorded_update(self, func: Any, args: tuple, kwargs: dict) -> None:
        written = [args[0]] if method_updates_in_place(str(getattr(func, "__name__", ""))) and args else []
        if isinstance(kwargs.get("out"), torch.Tensor):
            written.append(kwargs["out"])
        for t in written:
            if not isinstance(t, torch.Tensor) or isinstance(t, fx.Proxy) or t.device.type == "meta":
                continue
            held = self.state.get(t.untyped_storage().data_ptr())
            if held is None and not _reads_data(args, kwargs):
                continue  # a constant updated by constants: computed once, as forward() would each call
            frame = next((f for f in reversed(traceback.extract_stack()) if is_user_file(f.filename)), None)
            if held is not None:
                raise TraceTimeUpdate(_unrecorded_update(f"tensor {held!r}", frame and describe_frame(frame),
                                                         "torch.fx", stopped=True))
            where = f" at {describe_frame(frame)}" if frame is not None else ""
            raise ConstantUpdatedByData(
                f"forward() updates a tensor made from constants alone with values of the data{where}: fx "
                "records the update on a constant and goes on with the tensor as it was")


def _reads_data(args: tuple, kwargs: dict) -> bool:
    """Whether a call's arguments hold a Proxy (a value computed from the model's inputs)."""
    return any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0])


def _is_factory_call(func: Any) -> bool:
    """Whether ``func`` is one of torch's factories a trace records as a node (:data:`_MADE_AS_NODES`)."""
    return getattr(func, "__name__", "") in _MADE_AS_NODES and getattr(func, "__module__", "") == "torch"


def _is_random_call(func: Any) -> bool:
    """Whether ``func`` is torch's own function or Tensor method that draws random numbers
    (:func:`graphs.ops.draws_random_numbers`: ``torch.bernoulli``, ``Tensor.normal_``,
    ``torch.multinomial``, ``F.dropout``), not a user function of the same name."""
    name = getattr(func, "__name__", "")
    owned = getattr(torch.Tensor, name, None) is func or str(getattr(func, "__module__", "")).startswith("torch")
    return owned and draws_random_numbers(name)


def _factory_node(tracer: fx.Tracer, factory: Callable[..., Any], args: tuple, kwargs: dict) -> fx.Proxy:
    """The call of a torch factory or random draw recorded as a node, a Tensor method as a method
    call (a draw with a generator of its own refused: an fx graph cannot hold the generator)."""
    if kwargs.get("generator") is not None:
        raise RandomDrawNotTraced(f"forward() calls torch.{factory.__name__} with a generator of its own, which an "
                                  "fx graph cannot hold")
    if getattr(torch.Tensor, factory.__name__, None) is factory:
        return tracer.create_proxy("call_method", factory.__name__, args, kwargs)
    return tracer.create_proxy("call_function", factory, args, kwargs)


@contextlib.contextmanager
def _factories_taking_proxies(tracer: fx.Tracer) -> Iterator[None]:
    """While fx traces, let ``torch.zeros(x.size(0), 16)`` (a size that reads the data) be a node.

    torch's argument parser refuses a Proxy inside a size before any ``__torch_function__`` or
    mode can see the call ("zeros() takes 1 positional argument but 2 were given"), so such a
    forward failed under fx and went to torch.export, whose graph bakes the example's size in:
    an RNN's initial state ``torch.zeros(x.size(0), hidden)`` then refused every other batch
    size, and ``x * torch.ones(x.shape[0], 1)`` broadcast a batch of 1 to the example's 8 rows
    (found by trying). The factories of :data:`_MADE_AS_NODES` on the ``torch`` module are
    wrapped for the trace: a call with a Proxy among its arguments is recorded as the factory's
    node, any other goes to the factory itself (and so to :class:`_GuardedTrace`).
    """
    originals = {name: getattr(torch, name) for name in sorted(_MADE_AS_NODES) if callable(getattr(torch, name, None))}

    def taking_proxies(factory: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(factory)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _factory_node(tracer, factory, args, kwargs) if _reads_data(args, kwargs) else factory(*args, **kwargs)

        return call

    for name, factory in originals.items():
        setattr(torch, name, taking_proxies(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


class ConstantUpdatedByData(CaptureError):
    """forward() updates a tensor fx holds as a constant (``torch.tensor([...])``, a plain tensor
    attribute) with values of the data: fx records the update on the constant, but what forward()
    then computes from the tensor in Python runs at trace time, on the old values, and is baked
    in. torch.export records it."""


#: torch factories a trace records as nodes when no argument reads the data (:class:`_GuardedTrace`):
#: all but those of ``data`` (``torch.tensor([...])``), which stay constants.
_MADE_AS_NODES = (FACTORY_OPS | RANDOM_FACTORY_OPS) - {"tensor", "as_tensor", "scalar_tensor"}


class ChangingValue(CaptureError):
    """forward() computes with a Python value that changes from one call to the next (a draw of
    Python's ``random`` or ``numpy.random``): a tracer runs the call once and the graph keeps its
    value, so the placed model would use that one value at every step. Neither tracer records it."""


_CHANGING_REMEDY = ("Expected such values drawn with torch (torch.rand(()), torch.distributions), which the graph "
                    "draws anew at every step, or passed to forward() as tensors")


#: Functions of Python's ``random`` and ``numpy.random`` that draw nothing: torch's own tracing
#: saves and restores Python's random state (torch._dynamo's preserve_rng_state).
_NOT_DRAWS = frozenset({"seed", "getstate", "setstate", "get_state", "set_state"})


@contextlib.contextmanager
def _python_draws_refused() -> Iterator[None]:
    """While a tracer runs forward(): a call of Python's ``random`` functions or ``numpy.random``'s
    raises :class:`ChangingValue`, naming the call and the model's line.

    Traced, ``if random.random() < p:`` (a layer drop) or ``h * random.uniform(0.5, 1.5)`` ran once
    and the graph kept its branch or its number: the placed model trained with one value for good,
    with no error (walkthrough: outputs 0.52 off). Only the module-level functions are seen (a
    ``random.Random`` of the model's own is not); a value that still changes from one trace to the
    next is refused after a second trace (:func:`_mode_baked_by_fx`).
    """
    patched: list[tuple[Any, str, Any]] = []
    sources: list[tuple[Any, Any]] = [(random, random._inst)]
    numpy = sys.modules.get("numpy")  # a model that draws with numpy has imported it
    numpy_random = getattr(numpy, "random", None)  # numpy imports its random module on first use
    if numpy_random is not None:
        sources.append((numpy_random, getattr(getattr(numpy_random, "mtrand", None), "_rand", None)))
    for module, state in sources:
        for name in getattr(module, "__all__", ()):
            draw = getattr(module, name, None)
            if state is not None and getattr(draw, "__self__", None) is state and name not in _NOT_DRAWS:
                patched.append((module, name, draw))

    def refusing(qualname: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            frame = next((f for f in reversed(traceback.extract_stack()) if is_user_file(f.filename)), None)
            where = f" at {describe_frame(frame)}" if frame is not None else ""
            raise ChangingValue(f"forward() calls {qualname}(){where}, whose value a trace runs once and bakes into "
                                f"the graph: the placed model would use that one value at every step. {_CHANGING_REMEDY}")

        return refuse

    for module, name, _ in patched:
        setattr(module, name, refusing(f"{module.__name__}.{name}"))
    try:
        yield
    finally:
        for module, name, draw in patched:
            setattr(module, name, draw)


class GradModeNotTraced(CaptureError):
    """forward() changes the grad mode, which torch.fx cannot record (torch.export can)."""


class RootHooksNotTraced(CaptureError):
    """The model's own module has forward hooks, which torch.fx does not run (torch.export does)."""


def _refuse_root_backward_hooks(model: nn.Module, name: str) -> None:
    """Raise :class:`CaptureError` when the model's own module has backward hooks: fx traces
    its forward() (no module call for autograd to hook), torch.export leaves them out, and
    the model itself cannot be one node to place."""
    if model._backward_hooks or model._backward_pre_hooks:
        raise CaptureError(f"cannot capture model {name!r}: it has backward hooks on its own module "
                           "(register_full_backward_hook), which neither torch.fx nor torch.export keeps; expected "
                           "them on a submodule (placer keeps such a submodule whole, so autograd runs its hooks)")


def _refuse_root_hooks(root: nn.Module) -> None:
    """Raise :class:`RootHooksNotTraced` when ``root`` has forward (pre-)hooks of its own.

    fx traces ``root.forward``, not ``root(...)``: hooks registered on the model itself were
    left out of the graph (walkthrough: a forward hook returning ``output - 1`` made every output
    1.0 off), while hooks on submodules run. torch.export traces the call, hooks included.
    placer's own input check (:func:`pin_constant_inputs`, a placed graph captured again) is not the user's.
    """
    hooks = [h for h in [*root._forward_pre_hooks.values(), *root._forward_hooks.values()]
             if h is not _refuse_other_constants]
    if hooks:
        names = ", ".join(sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks}))
        raise RootHooksNotTraced(f"the model has {len(hooks)} forward hook(s) of its own ({names}); torch.fx "
                                 "traces forward() without them")


class AutocastNotTraced(CaptureError):
    """forward() enters or leaves ``torch.autocast``, which torch.fx cannot record (torch.export can)."""


#: Device types whose autocast state a forward() may change.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> tuple[tuple[bool, torch.dtype], ...]:
    """Whether autocast is on, and to which dtype, per device type."""
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


def _target_name(target: Any) -> str:
    return str(getattr(target, "__name__", target))


class TraceTimeUpdate(CaptureError):
    """forward() updated the model's state while being traced: the update is not in the graph.

    ``python_state``: the state is a Python attribute, which no tracer records (torch.export
    would silently drop it too), so the model is refused without a fallback.
    """

    def __init__(self, message: str, python_state: bool = False) -> None:
        super().__init__(message)
        self.python_state = python_state


#: Python attribute types whose change during a trace means forward() keeps Python-side state.
_SCALARS = (bool, int, float, str)


@dataclass
class _StateSnapshot:
    """What a trace must leave as it found it: tensor slots, their versions, buffer values,
    scalars, and every module's Python attributes (a tracer's Proxy or a tensor forward()
    caches, ``if self.mask is None: self.mask = ...``, stayed on the user's model: review)."""

    slots: dict[tuple[str, str, str], Any]  # (module path, "_parameters"/"_buffers", key) -> tensor
    versions: dict[tuple[str, str, str], int]
    buffers: dict[tuple[str, str, str], torch.Tensor]
    scalars: dict[tuple[str, str], Any]
    attributes: dict[str, dict[str, Any]]  # module path -> its vars(), as they were

    @classmethod
    def take(cls, model: nn.Module) -> _StateSnapshot:
        slots, scalars = cls.take_light(model)
        versions = {k: t._version for k, t in slots.items() if isinstance(t, torch.Tensor)}
        # Buffers only: a copy of every parameter would double a large model's memory, and
        # an updated parameter is refused all the same.
        buffers = {k: t.detach().clone() for k, t in slots.items()
                   if k[1] == "_buffers" and isinstance(t, torch.Tensor)}
        attributes = {path: dict(vars(m)) for path, m in model.named_modules(remove_duplicate=False)}
        return cls(slots, versions, buffers, scalars, attributes)

    def restore_attributes(self, model: nn.Module) -> list[str]:
        """Put every module's Python attributes back as they were; returns those that had
        changed (values torch.export rebuilds equal, a LayerNorm's ``normalized_shape``, had not)."""
        changed = []
        for path, m in model.named_modules(remove_duplicate=False):
            before = self.attributes.get(path, {})
            for key, value in list(vars(m).items()):
                if key in before and before[key] is value:
                    continue
                if key not in before or not _same_value(before[key], value):
                    changed.append(f"{path}.{key}" if path else key)
                if key in before:
                    vars(m)[key] = before[key]  # an instance's vars() is its writable __dict__
                else:
                    del vars(m)[key]
        return changed

    def changes(self, model: nn.Module) -> tuple[list[str], list[str], list[Any]]:
        """(tensors replaced or updated, Python attributes changed, the objects now in replaced slots)."""
        now = _StateSnapshot.take_light(model)
        changed, replaced = [], []
        for k, t in self.slots.items():
            current = now[0].get(k, t)
            if current is not t:
                changed.append(_slot_name(k))
                replaced.append(current)
            elif isinstance(t, torch.Tensor) and t._version != self.versions[k]:
                changed.append(_slot_name(k))
        scalars = [f"{p}.{a}" if p else a for (p, a), v in self.scalars.items() if now[1].get((p, a), v) != v]
        return changed, scalars, replaced

    @staticmethod
    def take_light(model: nn.Module) -> tuple[dict[tuple[str, str, str], Any], dict[tuple[str, str], Any]]:
        slots: dict[tuple[str, str, str], Any] = {}
        scalars: dict[tuple[str, str], Any] = {}
        for path, mod in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                for key, value in getattr(mod, kind).items():
                    slots[(path, kind, key)] = value
            for key, value in vars(mod).items():
                if isinstance(value, _SCALARS) and key != "training":
                    scalars[(path, key)] = value
        return slots, scalars

    def restore(self, model: nn.Module) -> None:
        self.restore_attributes(model)
        modules = dict(model.named_modules(remove_duplicate=False))
        with torch.no_grad():
            for (path, kind, key), value in self.slots.items():
                mod = modules.get(path)
                if mod is not None and getattr(mod, kind).get(key) is not value:
                    getattr(mod, kind)[key] = value
            for k, copy in self.buffers.items():
                t = self.slots[k]
                if t.shape == copy.shape and not torch.equal(t, copy):
                    t.copy_(copy)
        for (path, attr), value in self.scalars.items():
            mod = modules.get(path)
            if mod is not None and vars(mod).get(attr, value) != value:
                vars(mod)[attr] = value  # type: ignore[index]  # an instance's vars() is its writable __dict__


def _slot_name(key: tuple[str, str, str]) -> str:
    path, _, name = key
    return f"{path}.{name}" if path else name


def checked_trace(model: nn.Module, tracer: str, trace: Any, locate: Any,
                  attributes_set: list[str] | None = None) -> fx.GraphModule:
    """Run ``trace()``; refuse it if it changed the model's tensors or Python attributes.

    A tracer runs forward()'s Python once. An update it does not record — a tensor it did
    not proxy (reached through a list or ``_buffers``) updated in place, a buffer
    reassigned (``self.calls = self.calls + 1``: fx records the addition, not the
    assignment), a Python number (``self.steps += 1``) — happens then, on the user's
    model, and never again in the captured graph: the placed model would silently diverge
    from the original from its second step on. The model is restored and
    :class:`TraceTimeUpdate` names the state and, via ``locate(changed_tensors,
    replacements)`` (a rerun that finds the line), the model line. Other Python attributes
    forward() sets (a tensor it caches: ``if self.mask is None: self.mask = ...``) are put back
    and named in ``attributes_set``: the graph holds what they computed.
    """
    snapshot = _StateSnapshot.take(model)
    try:
        gm = trace()
        changed, scalars, replaced = snapshot.changes(model)
    finally:
        restored = snapshot.restore_attributes(model)
        snapshot.restore(model)
    if attributes_set is not None:
        attributes_set += restored
    if not changed and not scalars:
        return gm
    line = None
    if changed:
        try:
            line = locate([snapshot.slots[k] for k in snapshot.slots if _slot_name(k) in changed], replaced)
        except Exception:  # the line is a courtesy; the refusal stands without it
            line = None
        finally:
            snapshot.restore(model)
    what = (f"tensor {changed[0]!r}" if changed else f"Python attribute {scalars[0]!r}")
    raise TraceTimeUpdate(_unrecorded_update(what, line, tracer), python_state=not changed)


#: Ops that read only a tensor's metadata: a value computed from them alone (a mask sized by
#: ``x.size(1)``) is the same at every call of the same shapes.
_METADATA_READS = frozenset({"size", "dim", "numel", "shape", "dtype", "device", "ndim"})


def _refuse_carried_state(model: nn.Module, read: Iterable[str], tracer: str,
                          set_from_data: Mapping[str, bool] | None = None) -> None:
    """Raise :class:`TraceTimeUpdate` where forward() read a Python attribute of ``model`` (``read``:
    qualified names, read while it still held the value from before the call) and then set it to a
    value of the graph that differs from call to call (:func:`_carried_state`): a recurrent state
    kept for the next batch (``out, h = self.rnn(x, self.h); self.h = h.detach()``).

    The original carries it to its next call; the graph holds no Python attribute, so the placed
    model computed every call from what the traced call found (walkthrough: a GRU whose hidden
    state was kept on the module, outputs 0.024 off from the second batch on, no error). A value
    set before any read (``torch.nn.utils.prune``'s hook recomputing ``weight`` for the call) is
    the call's own, and a cache of constants and sizes is the same at every call: both captured.
    ``set_from_data`` (torch.export, which puts the attributes back itself): whether each tensor
    forward() set computes from the data, by qualified name (:func:`_constant_attributes_read`).
    """
    values: dict[str, Any] = {}
    for qualname in read:
        path, _, name = qualname.rpartition(".")
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(path) if path else model
            if name in vars(module):
                values[qualname] = vars(module)[name]
    carried = ([q for q in read if set_from_data.get(q)] if set_from_data is not None  # torch.export: recorded then
               else _carried_state(values, model))
    if carried:
        raise TraceTimeUpdate(
            f"forward() keeps {carried[0]!r} as a Python attribute, set to a value computed from the inputs or the "
            f"model's state (a recurrent state carried to the next batch): {tracer} records no Python attribute, so "
            "the placed model would compute every call from the value the first one found. Expected state carried "
            "between calls in a registered buffer updated in place (self.register_buffer('h', torch.zeros(...)); "
            "self.h.copy_(h.detach())), or passed to forward() and returned by it", python_state=True)


def _carried_state(values: Mapping[str, Any], model: nn.Module) -> list[str]:
    """The attributes of ``values`` (by name) that hold a value of the graph computed from the
    inputs, the model's parameters or buffers, or a random draw (:func:`_varies`): one that differs
    from call to call, unlike a cache made of constants and sizes (``self.mask = torch.triu(...)``)."""
    state = {n for n, _ in itertools.chain(model.named_parameters(remove_duplicate=False),
                                            model.named_buffers(remove_duplicate=False))}
    memo: dict[fx.Node, bool] = {}
    return [name for name, value in values.items() if any(
        _varies(v.node, state, memo) for v in tree_flatten(value)[0] if isinstance(v, fx.Proxy))]


def _varies(node: fx.Node, state: set[str], memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` computes from the inputs (placeholders: torch.export's lift parameters and
    buffers to placeholders too), the model's ``state`` (get_attr targets), a module call or a
    random draw, rather than from constants and tensor sizes alone."""
    if node not in memo:
        name = str(node.target) if node.op in ("call_method", "get_attr") else op_name(node)
        if (node.op == "call_method" and name in _METADATA_READS) or (
                node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_READS):
            memo[node] = False
        elif node.op in ("placeholder", "call_module") or (node.op == "get_attr" and name in state):
            memo[node] = True
        elif node.op in ("call_function", "call_method") and draws_random_numbers(name):
            memo[node] = True
        else:
            memo[node] = False  # set first: a node's inputs come before it, so no cycle
            memo[node] = any(_varies(arg, state, memo) for arg in node.all_input_nodes)
    return memo[node]


def _unrecorded_update(what: str, line: str | None, tracer: str, stopped: bool = False) -> str:
    """The refusal of an update of model state that ``tracer`` does not record (one text for
    :func:`checked_trace`, after the trace, and :class:`_GuardedTrace`, before the update)."""
    where = f" at {line}" if line else ""
    ran = "would have run" if stopped else "ran"
    return (f"forward() updates {what}{where} in a way {tracer} does not record: the update {ran} once while "
            "tracing and is not part of the captured graph, so the placed model would diverge from the "
            "original from its second step on. Expected state kept in registered buffers and updated in "
            "place with tensor methods (e.g. self.register_buffer('steps', torch.zeros(())) and "
            "self.steps.add_(1))")


def _fx_locate(model: nn.Module, leaf_types: Sequence[type], leaf_names: Iterable[str]) -> Any:
    """A ``locate`` for :func:`checked_trace`: the model line of an unrecorded update under fx."""

    def locate(targets: list[torch.Tensor], replaced: list[Any]) -> str | None:
        # A reassigned buffer holds the Proxy of the value computed for it: that node's
        # stack trace (recorded on a rerun) names the line.
        nodes = [p.node.name for p in replaced if isinstance(p, fx.Proxy)]
        if nodes:
            tracer = PlacerTracer(leaf_types, leaf_names)
            tracer.record_stack_traces = True
            with _no_constants_left_on(model, tracer):
                graph = tracer.trace(model)
            for node in graph.nodes:
                if node.name in nodes and node.stack_trace:
                    return _last_user_line(node.stack_trace)
            return None
        return _line_updating(targets, lambda: fx_trace(model, leaf_types, leaf_names))

    return locate


def _last_user_line(stack_trace: str) -> str | None:
    frames = traceback.StackSummary.from_list([])
    lines = stack_trace.strip().splitlines()
    for i, text in enumerate(lines):
        text = text.strip()
        if text.startswith("File \"") and ", line " in text:
            filename = text[len("File \""):text.index("\", line ")]
            lineno = int(text.split(", line ")[1].split(",")[0])
            func = text.split(" in ")[-1] if " in " in text else ""
            frames.append(traceback.FrameSummary(filename, lineno, func, line=None))
    users = [f for f in frames if is_user_file(f.filename)]
    return describe_frame(users[-1]) if users else None


def _line_updating(targets: list[torch.Tensor], retrace: Any) -> str | None:
    """Rerun ``retrace`` with a profiler hook; the model line of the first in-place call on a target."""
    ids = {id(t) for t in targets}
    found: list[str] = []

    def hook(frame: Any, event: str, arg: Any) -> None:
        if found or event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        if id(owner) in ids and str(getattr(arg, "__name__", "")).endswith("_"):
            for summary in reversed(traceback.extract_stack(frame)):
                if is_user_file(summary.filename):
                    found.append(describe_frame(summary))
                    return

    sys.setprofile(hook)
    try:
        retrace()
    finally:
        sys.setprofile(None)
    return found[0] if found else None


def complete_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` every parameter and buffer of ``model`` that forward() does not use.

    fx copies only the attributes the graph reads, so an unused buffer would be missing
    from the placed model's ``state_dict()`` and loading it back into the original with
    ``strict=True`` would fail. The tensors are shared, not copied, as fx shares the rest.
    Buffers the model keeps out of its ``state_dict`` (``persistent=False``) stay out.
    """
    have = set(gm.state_dict(keep_vars=True))
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        for key, value in list(mod._parameters.items()) + list(mod._buffers.items()):
            if value is None or prefix + key in have:
                continue
            owner = ensure_module(gm, path)
            if key in mod._parameters:
                owner.register_parameter(key, value)
            else:
                owner.register_buffer(key, value, persistent=key not in mod._non_persistent_buffers_set)
        # torch.export registers every buffer as persistent: one the model keeps out of its
        # state_dict would then be an unexpected key when loading back with strict=True.
        for key in mod._non_persistent_buffers_set:
            with contextlib.suppress(AttributeError):
                owner = gm.get_submodule(path) if path else gm
                if key in owner._buffers:
                    owner._non_persistent_buffers_set.add(key)
    _match_registration_order(gm, model)


def _match_registration_order(gm: fx.GraphModule, model: nn.Module) -> None:
    """Register ``gm``'s submodules, parameters and buffers in ``model``'s order.

    fx copies them in the order forward() uses them, so a model that defines its head first
    listed its parameters in another order once placed: an optimizer's ``state_dict`` (which
    is by position) saved from the placed model then resumed the original with Adam's moments
    on the wrong weights, and a weight tied between two modules was named after the other
    one (``emb.weight`` for ``head.weight``), which the numerical check took for a missing
    gradient (walkthrough)."""
    for path, mod in model.named_modules(remove_duplicate=False):
        try:
            placed = gm.get_submodule(path) if path else gm
        except AttributeError:
            continue
        for attr in ("_modules", "_parameters", "_buffers"):
            own, theirs = getattr(placed, attr), getattr(mod, attr)
            order = [k for k in theirs if k in own] + [k for k in own if k not in theirs]
            if list(own) != order:
                reordered = {k: own[k] for k in order}
                own.clear()
                own.update(reordered)
