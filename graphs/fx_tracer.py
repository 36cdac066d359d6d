"""The torch.fx tracer of a capture: :class:`PlacerTracer` traces a model at module granularity.

``torch.fx.symbolic_trace`` is capture's first choice (:mod:`graphs.capture`): standard
``torch.nn`` layers and recurrent modules stay one ``call_module`` node, as do the leaf modules
the user names (:func:`resolve_leaf_modules`); torch.nn's transformer stacks are traced layer by
layer (:mod:`graphs.transformer_stacks`); buffers and parameters used directly become
``get_attr`` nodes, and ``x += y`` is recorded as the in-place update it is where the old tensor
is read again. The trace runs under the guards of :mod:`graphs.trace_guards` and its siblings (what
fx would not record faithfully, a grad-mode change or an autocast region
(:mod:`graphs.untraced_modes`), is refused, and torch.export, :mod:`graphs.export_tracer`, is
tried instead).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.autograd_functions import functions_recorded_whole
from graphs.baked_constants import refuse_baked_gradients
from graphs.carried_state import refuse_carried_state
from graphs.errors import CaptureError
from graphs.forward_checks import (
    Scalar,
    TensorRead,
    constant_attributes_read,
    no_constants_left_on,
    pin_constant_attributes,
)
from graphs.module_attributes import keep_plain_attributes
from graphs.module_modes import modes_on
from graphs.ops import AUGMENTED_ASSIGNMENTS, storage_roots
from graphs.python_draws import python_draws_refused
from graphs.root_hooks import refuse_root_hooks
from graphs.tied_layers import tied_holders
from graphs.trace_guards import GuardedTrace, factories_taking_proxies
from graphs.transformer_stacks import is_stack, kept_whole, stack_forward
from graphs.untraced_modes import AutocastNotTraced, GradModeNotTraced, autocast_state, target_name
from graphs.update_lines import last_user_line, line_updating

# Recurrent layers run a time loop inside one kernel: keeping them whole is the only
# sensible granularity (unrolled cells are how a model exposes per-step parallelism).
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)


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
        self.autocast = autocast_state()  # when tracing began: a node made under another is refused
        self.constant_reads: dict[str, Scalar | TensorRead] = {}  # module attributes forward() read (:data:`Scalar`)
        self.modes_read: dict[str, bool] = {}  # module path -> the training flag forward() read of it
        self.attributes_read: set[str] = set()  # Python attributes forward() read before setting them
        self.whole_stacks: list[nn.Module] = []  # transformer stacks kept as one node (transformer_stacks.kept_whole)
        self.tied_holders: frozenset[int] = frozenset()  # layers traced through (graphs.tied_layers)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.grad_enabled = torch.is_grad_enabled()
        self.without_grad = []
        self.autocast = autocast_state()
        self.modes_read, self.attributes_read = {}, set()
        self.tied_holders = tied_holders(root) if isinstance(root, nn.Module) else frozenset()
        with GuardedTrace(self, root), factories_taking_proxies(self), python_draws_refused(), functions_recorded_whole(self), \
                constant_attributes_read(root, self.modes_read, self.attributes_read) as self.constant_reads:
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
        if kind != "placeholder" and autocast_state() != self.autocast:
            # fx records no autocast region: its ops would run in float32 where the model ran
            # them in bfloat16 (walkthrough: 3e-3 max output difference, every placement
            # failing the check). torch.export records the region (wrap_with_autocast).
            raise AutocastNotTraced(f"forward() enters torch.autocast around {kind} {target_name(target)}; "
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
        if isinstance(m, RECURRENT_TYPES) or names_leaf(m, module_qualified_name, self.leaf_types, self.leaf_names):
            return True
        if isinstance(m, torch.jit.ScriptModule):
            # TorchScript's compiled forward cannot be traced through (fx failed inside its
            # wrappers with "'OrderedDictWrapper' object has no attribute 'get'", torch.export
            # too); called whole, it runs its own forward and backward.
            return True
        if m._backward_hooks or m._backward_pre_hooks:
            # Traced through, its backward hooks were lost (walkthrough: gradients 1.7 off);
            # called whole, autograd runs them.
            return True
        if id(m) in self.tied_holders:  # its tensor is another layer's: a get_attr, not a fused group
            return False
        if is_stack(m):  # layer by layer (graphs.transformer_stacks), unless kept whole
            return m in self.whole_stacks
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if is_stack(m) and not self.is_leaf_module(m, self.path_of_module(m)):
            if kept_whole(m, args, kwargs, self.path_of_module(m)):
                self.whole_stacks.append(m)
            else:  # its own forward cannot be traced: fx follows its training path instead
                forward = stack_forward(m)
        return super().call_module(m, forward, args, kwargs)


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
            if leaf == "" or (leaf not in paths and not any(
                    path and type(m).__name__ == leaf for path, m in model.named_modules())):
                # only the model itself: the tracer never asks about the root, so it would be ignored
                raise CaptureError(
                    f"leaf module {leaf!r} names the model itself; a leaf is a submodule kept whole inside the "
                    f"model placer splits, so expected a submodule's path (e.g. {_example_path(paths)!r}) or class name")
            names.add(leaf)
        else:
            raise CaptureError(
                f"leaf module {leaf!r} is a {type(leaf).__name__}; expected an nn.Module subclass, "
                "a module path or a module class name"
            )
    return tuple(types), names


def names_leaf(module: nn.Module, path: str, leaf_types: tuple[type, ...], leaf_names: Iterable[str]) -> bool:
    """Whether the user's leaf modules (:func:`resolve_leaf_modules`'s types and names) name
    ``module`` at ``path``: an instance of one of the types, or its path or class name given."""
    return bool(leaf_types and isinstance(module, leaf_types)) or path in leaf_names \
        or type(module).__name__ in leaf_names


def leaf_module_paths(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple[str, ...]:
    """The paths of ``model``'s modules that ``leaf_modules`` names, outermost only.

    The same leaves as plain strings: what a placement file records and what a worker
    process, which cannot unpickle a class defined in the user's model file, captures with.
    Modules inside a leaf are left out (the tracer never reaches them). Raises what
    :func:`resolve_leaf_modules` raises.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> leaf_module_paths(m, ["1"]), leaf_module_paths(m, [nn.Linear])
    (('1',), ('0', '1.0'))
    """
    types, names = resolve_leaf_modules(model, leaf_modules)
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{outer}.") for outer in found):
            continue
        if names_leaf(module, path, types, names):
            found.append(path)
    return tuple(found)


def _example_path(paths: set[str]) -> str:
    named = sorted(p for p in paths if p)
    return named[0] if named else "encoder"


def fx_trace(model: nn.Module, leaf_types: Sequence[type] = (), leaf_names: Iterable[str] = (),
             name: str = "model") -> fx.GraphModule:
    """Symbolically trace ``model`` with :class:`PlacerTracer` (raises whatever fx raises)."""
    refuse_root_hooks(model)
    tracer = PlacerTracer(leaf_types, leaf_names)
    with no_constants_left_on(model, tracer):
        graph = tracer.trace(model)
        refuse_carried_state(model, tracer.attributes_read, "torch.fx")  # before checked_trace puts them back
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__ if name == "model" else name)
        refuse_baked_gradients(gm)  # torch.export records what fx computed at trace time
    keep_plain_attributes(gm, (n for n, _ in model.named_buffers(remove_duplicate=False)))
    if tracer.constant_reads:
        pin_constant_attributes(gm, tracer.constant_reads)
    modes = modes_on(gm, tracer.modes_read, model)
    if modes:
        gm.placer_module_modes = modes  # type: ignore[assignment]
    return gm


def fx_locate(model: nn.Module, leaf_types: Sequence[type], leaf_names: Iterable[str]) -> Any:
    """A ``locate`` for :func:`checked_trace`: the model line of an unrecorded update under fx."""

    def locate(targets: list[torch.Tensor], replaced: list[Any]) -> str | None:
        # A reassigned buffer holds the Proxy of the value computed for it: that node's
        # stack trace (recorded on a rerun) names the line.
        nodes = [p.node.name for p in replaced if isinstance(p, fx.Proxy)]
        if nodes:
            tracer = PlacerTracer(leaf_types, leaf_names)
            tracer.record_stack_traces = True
            with no_constants_left_on(model, tracer):
                graph = tracer.trace(model)
            for node in graph.nodes:
                if node.name in nodes and node.stack_trace:
                    return last_user_line(node.stack_trace)
            return None
        return line_updating(targets, lambda: fx_trace(model, leaf_types, leaf_names))

    return locate
