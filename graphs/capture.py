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

Both traces run under the guards of :mod:`graphs.trace_guards` (what a trace would not record
faithfully is recorded as a node or refused), and the captured graph checks before each
forward what the trace baked in (:mod:`graphs.forward_checks`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import operator
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from graphs.errors import CaptureError, one_line_reason
from graphs.eval_arguments import (
    EvalArguments,
    _same_tensor,
    export_eval_arguments,
    export_eval_plan,
    export_module_modes,
    fx_eval_arguments,
)
from graphs.eval_mode import follow_eval_graph, follow_eval_mode, refuse_eval_mode
from graphs.fingerprint import model_fingerprint
from graphs.forward_checks import (
    Scalar,
    TensorRead,
    constant_attributes_read,
    constant_inputs,
    no_constants_left_on,
    pin_constant_attributes,
    pin_constant_inputs,
    pin_shapes_unless_generic,
    refuse_hooks_never_run,
)
from graphs.model_file import preserved_buffers
from graphs.module_attributes import ensure_module, keep_plain_attributes
from graphs.ops import (
    AUGMENTED_ASSIGNMENTS,
    storage_roots,
)
from graphs.placement_graph import build_placement_graph
from graphs.saved_activations import annotate_saved_bytes
from graphs.trace_guards import (
    CHANGING_REMEDY,
    AutocastNotTraced,
    ChangingValue,
    GradModeNotTraced,
    GuardedTrace,
    StateSnapshot,
    TraceTimeUpdate,
    autocast_state,
    checked_trace,
    factories_taking_proxies,
    last_user_line,
    line_updating,
    python_draws_refused,
    refuse_carried_state,
    refuse_root_backward_hooks,
    refuse_root_hooks,
    target_name,
)
from graphs.user_frames import describe_frame, user_frame

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

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.grad_enabled = torch.is_grad_enabled()
        self.without_grad = []
        self.autocast = autocast_state()
        self.modes_read, self.attributes_read = {}, set()
        with GuardedTrace(self, root), factories_taking_proxies(self), python_draws_refused(), \
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
    refuse_root_hooks(model)
    tracer = PlacerTracer(leaf_types, leaf_names)
    with no_constants_left_on(model, tracer):
        graph = tracer.trace(model)
        refuse_carried_state(model, tracer.attributes_read, "torch.fx")  # before checked_trace puts them back
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__ if name == "model" else name)
    keep_plain_attributes(gm, (n for n, _ in model.named_buffers(remove_duplicate=False)))
    if tracer.constant_reads:
        pin_constant_attributes(gm, tracer.constant_reads)
    modes = modes_on(gm, tracer.modes_read, model)
    if modes:
        gm.placer_module_modes = modes  # type: ignore[assignment]
    return gm


#: torch.nn layers whose mode lives in their ops' own flags: fx calls them whole (a ``call_module``
#: that follows the layer's flag), and :func:`graphs.eval_arguments.export_module_modes` checks them in a
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
    (:func:`graphs.eval_arguments.export_eval_arguments`); capture leaves that to its second export
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
        with gradient_hooks, _custom_functions_called() as functions, python_draws_refused(), \
                constant_attributes_read(model, modes_read, attributes_read, tensors_set) as constants:
            exported = torch.export.export(model, inputs, strict=False)
    # torch.export puts tensor attributes forward() set back itself (with a warning, silenced above)
    refuse_carried_state(model, attributes_read, "torch.export", tensors_set)
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
    with _restored(model) as python_state, no_constants_left_on(model, tracer), warnings.catch_warnings():
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
    snapshot = StateSnapshot.take(model)
    python_state: list[str] = []
    try:
        yield python_state
    finally:
        python_state += snapshot.restore_attributes(model)
        snapshot.restore(model)


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
        return _exported_for_fx(model, inputs, gm, trace_modes, training_attributes, one_line_reason(exc))
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
                                f"runs once and bakes into the graph. {CHANGING_REMEDY}")
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
    in eval mode, as constants of ``gm`` (:func:`graphs.eval_arguments.export_eval_plan`) or as its
    own graph where it runs other ops; where the eval mode cannot be exported, the training
    flags placer knows (:func:`graphs.eval_arguments.export_eval_arguments`), with a warning; where
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
                    "the model's own 'if self.training:' branches", type(model).__name__, one_line_reason(exc))
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
    (``placer_eval_input_shapes``, checked by :func:`graphs.eval_interpreter.refuse_other_shapes`).
    """
    try:
        eval_gm = _export_in_eval_mode(model, inputs, trace_modes, training_attributes)
    except Exception as exc:  # noqa: BLE001 - neither tracer follows the eval mode
        return (f"torch.fx cannot trace forward() in eval mode ({fx_reason}), nor torch.export capture it "
                f"({one_line_reason(exc)}), and the graph keeps what forward() computed in training mode: after .eval() "
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
    refuse_root_backward_hooks(model, name)
    _refuse_graph_module_names(model, name)
    try:
        return _capture(model, inputs, leaf_modules, leaf_types, leaf_names, name, trace_modes, loss_fn)
    finally:
        set_training_modes(model, user_modes)


def _refuse_graph_module_names(model: nn.Module, name: str) -> None:
    """Refuse a model whose own parameter, buffer or submodule has the name of an attribute the
    captured ``fx.GraphModule`` needs (``code``, ``graph``, ``recompile``...): both tracers copy
    the model's top-level members onto the GraphModule, where such a name clashes (torch.fx:
    "Code has not been generated! Please report a bug to PyTorch", torch.export: "attribute
    'code' already exists"), so say which name and what to do instead."""
    reserved = set(dir(fx.GraphModule)) - set(dir(nn.Module))
    members = [*model._parameters, *model._buffers, *model._modules]
    clash = sorted(m for m in members if m in reserved)
    if clash:
        raise CaptureError(f"cannot capture model {name!r}: its attribute(s) {clash} have the name of torch.fx."
                           f"GraphModule's own {', '.join(repr(c) for c in clash)}, which the captured graph "
                           "needs; expected other names for the model's parameters, buffers and submodules "
                           f"(e.g. {clash[0] + 'book' if clash[0] == 'code' else clash[0] + '_'!r})")


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
        fx_error = one_line_reason(fx_exc)
        try:
            gm = checked_trace(model, "torch.export", lambda: export_trace(model, inputs, follow_eval=False),
                               lambda targets, _: line_updating(targets, lambda: export_trace(model, inputs, False)),
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


def _capture_error(name: str, fx_exc: BaseException, export_exc: BaseException) -> CaptureError:
    if isinstance(export_exc, HooksNotKept):
        return CaptureError(
            f"cannot capture model {name!r}: {export_exc}, and torch.fx could not trace it ({one_line_reason(fx_exc)}); "
            "expected gradient hooks and custom autograd Functions inside a submodule named as a leaf module "
            "(leaf_modules; a submodule with backward hooks is kept whole anyway), so that autograd runs them, "
            "and a forward() torch.fx can trace")
    frame = user_frame(export_exc) or user_frame(fx_exc)
    where = (f"the line that could not be traced is {describe_frame(frame)}" if frame
             else "no model line appears in the traceback")
    return CaptureError(
        f"cannot capture model {name!r}: neither torch.fx nor torch.export could trace it; {where}. "
        f"torch.fx: {one_line_reason(fx_exc)}. torch.export: {one_line_reason(export_exc)}. Expected a forward() "
        "whose Python control flow does not depend on tensor values: rewrite that line (e.g. "
        "torch.where instead of `if`), or name its module as a leaf module"
    )


def _fx_locate(model: nn.Module, leaf_types: Sequence[type], leaf_names: Iterable[str]) -> Any:
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
