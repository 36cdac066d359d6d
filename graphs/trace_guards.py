"""Guards around a trace of forward(): what fx or torch.export would not record faithfully is
recorded as a node, or refused before it runs, instead of being baked into the graph.

While fx traces, :class:`GuardedTrace` records a tensor forward() makes from constants alone
(factories and random draws: fx would run them once and keep the result) as a node, records
factories sized by the data (:func:`factories_taking_proxies`), and stops an in-place update
of the model's own state reached without a proxy before it runs. :func:`python_draws_refused`
refuses draws from Python's or numpy's random numbers, which no graph can hold;
:func:`checked_trace` compares the model's state around a trace (:class:`StateSnapshot`) and
refuses updates the tracer did not record, naming the line of forward() that made them
(:func:`line_updating`); :func:`refuse_carried_state` refuses state forward() carries to its
next call in a Python attribute. Grad-mode, autocast and root-module hooks that a trace cannot
keep are refused with their own errors (:class:`GradModeNotTraced`,
:class:`AutocastNotTraced`, :func:`refuse_root_hooks`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from graphs.errors import CaptureError
from graphs.forward_checks import refuse_other_constants, same_value, varies
from graphs.ops import (
    FACTORY_OPS,
    RANDOM_FACTORY_OPS,
    draws_random_numbers,
    method_updates_in_place,
)
from graphs.user_frames import describe_frame, is_user_file


class RandomDrawNotTraced(CaptureError):
    """forward() draws random numbers with its own ``torch.Generator``, which an fx graph cannot
    hold (torch.export can try)."""


class GuardedTrace(torch.overrides.TorchFunctionMode):
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
def _replaced(replacements: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """``(module, name, value)``: each module attribute set to its value for the block, then
    put back (the torch factories and the random draws a trace must not run as they are)."""
    originals = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    for module, name, value in replacements:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


@contextlib.contextmanager
def factories_taking_proxies(tracer: fx.Tracer) -> Iterator[None]:
    """While fx traces, let ``torch.zeros(x.size(0), 16)`` (a size that reads the data) be a node.

    torch's argument parser refuses a Proxy inside a size before any ``__torch_function__`` or
    mode can see the call ("zeros() takes 1 positional argument but 2 were given"), so such a
    forward failed under fx and went to torch.export, whose graph bakes the example's size in:
    an RNN's initial state ``torch.zeros(x.size(0), hidden)`` then refused every other batch
    size, and ``x * torch.ones(x.shape[0], 1)`` broadcast a batch of 1 to the example's 8 rows
    (found by trying). The factories of :data:`_MADE_AS_NODES` on the ``torch`` module are
    wrapped for the trace: a call with a Proxy among its arguments is recorded as the factory's
    node, any other goes to the factory itself (and so to :class:`GuardedTrace`).
    """
    originals = {name: getattr(torch, name) for name in sorted(_MADE_AS_NODES) if callable(getattr(torch, name, None))}

    def taking_proxies(factory: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(factory)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _factory_node(tracer, factory, args, kwargs) if _reads_data(args, kwargs) else factory(*args, **kwargs)

        return call

    with _replaced([(torch, name, taking_proxies(factory)) for name, factory in originals.items()]):
        yield


class ConstantUpdatedByData(CaptureError):
    """forward() updates a tensor fx holds as a constant (``torch.tensor([...])``, a plain tensor
    attribute) with values of the data: fx records the update on the constant, but what forward()
    then computes from the tensor in Python runs at trace time, on the old values, and is baked
    in. torch.export records it."""


#: torch factories a trace records as nodes when no argument reads the data (:class:`GuardedTrace`):
#: all but those of ``data`` (``torch.tensor([...])``), which stay constants.
_MADE_AS_NODES = (FACTORY_OPS | RANDOM_FACTORY_OPS) - {"tensor", "as_tensor", "scalar_tensor"}


class ChangingValue(CaptureError):
    """forward() computes with a Python value that changes from one call to the next (a draw of
    Python's ``random`` or ``numpy.random``): a tracer runs the call once and the graph keeps its
    value, so the placed model would use that one value at every step. Neither tracer records it."""


CHANGING_REMEDY = ("Expected such values drawn with torch (torch.rand(()), torch.distributions), which the graph "
                    "draws anew at every step, or passed to forward() as tensors")


#: Functions of Python's ``random`` and ``numpy.random`` that draw nothing: torch's own tracing
#: saves and restores Python's random state (torch._dynamo's preserve_rng_state).
_NOT_DRAWS = frozenset({"seed", "getstate", "setstate", "get_state", "set_state"})


@contextlib.contextmanager
def python_draws_refused() -> Iterator[None]:
    """While a tracer runs forward(): a call of Python's ``random`` functions or ``numpy.random``'s
    raises :class:`ChangingValue`, naming the call and the model's line.

    Traced, ``if random.random() < p:`` (a layer drop) or ``h * random.uniform(0.5, 1.5)`` ran once
    and the graph kept its branch or its number: the placed model trained with one value for good,
    with no error (walkthrough: outputs 0.52 off). Only the module-level functions are seen (a
    ``random.Random`` of the model's own is not); a value that still changes from one trace to the
    next is refused after a second trace (:func:`graphs.eval_capture.mode_baked_by_fx`).
    """
    draws: list[tuple[Any, str]] = []
    sources: list[tuple[Any, Any]] = [(random, random._inst)]
    numpy = sys.modules.get("numpy")  # a model that draws with numpy has imported it
    numpy_random = getattr(numpy, "random", None)  # numpy imports its random module on first use
    if numpy_random is not None:
        sources.append((numpy_random, getattr(getattr(numpy_random, "mtrand", None), "_rand", None)))
    for module, state in sources:
        for name in getattr(module, "__all__", ()):
            draw = getattr(module, name, None)
            if state is not None and getattr(draw, "__self__", None) is state and name not in _NOT_DRAWS:
                draws.append((module, name))

    def refusing(qualname: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            frame = next((f for f in reversed(traceback.extract_stack()) if is_user_file(f.filename)), None)
            where = f" at {describe_frame(frame)}" if frame is not None else ""
            raise ChangingValue(f"forward() calls {qualname}(){where}, whose value a trace runs once and bakes into "
                                f"the graph: the placed model would use that one value at every step. {CHANGING_REMEDY}")

        return refuse

    with _replaced([(module, name, refusing(f"{module.__name__}.{name}")) for module, name in draws]):
        yield


class GradModeNotTraced(CaptureError):
    """forward() changes the grad mode, which torch.fx cannot record (torch.export can)."""


class RootHooksNotTraced(CaptureError):
    """The model's own module has forward hooks, which torch.fx does not run (torch.export does)."""


def refuse_root_backward_hooks(model: nn.Module, name: str) -> None:
    """Raise :class:`CaptureError` when the model's own module has backward hooks: fx traces
    its forward() (no module call for autograd to hook), torch.export leaves them out, and
    the model itself cannot be one node to place."""
    if model._backward_hooks or model._backward_pre_hooks:
        raise CaptureError(f"cannot capture model {name!r}: it has backward hooks on its own module "
                           "(register_full_backward_hook), which neither torch.fx nor torch.export keeps; expected "
                           "them on a submodule (placer keeps such a submodule whole, so autograd runs its hooks)")


def refuse_root_hooks(root: nn.Module) -> None:
    """Raise :class:`RootHooksNotTraced` when ``root`` has forward (pre-)hooks of its own.

    fx traces ``root.forward``, not ``root(...)``: hooks registered on the model itself were
    left out of the graph (walkthrough: a forward hook returning ``output - 1`` made every output
    1.0 off), while hooks on submodules run. torch.export traces the call, hooks included.
    placer's own input check (:func:`pin_constant_inputs`, a placed graph captured again) is not the user's.
    """
    hooks = [h for h in [*root._forward_pre_hooks.values(), *root._forward_hooks.values()]
             if h is not refuse_other_constants]
    if hooks:
        names = ", ".join(sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks}))
        raise RootHooksNotTraced(f"the model has {len(hooks)} forward hook(s) of its own ({names}); torch.fx "
                                 "traces forward() without them")


class AutocastNotTraced(CaptureError):
    """forward() enters or leaves ``torch.autocast``, which torch.fx cannot record (torch.export can)."""


#: Device types whose autocast state a forward() may change.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> tuple[tuple[bool, torch.dtype], ...]:
    """Whether autocast is on, and to which dtype, per device type."""
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


def target_name(target: Any) -> str:
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
class StateSnapshot:
    """What a trace must leave as it found it: tensor slots, their versions, buffer values,
    scalars, and every module's Python attributes (a tracer's Proxy or a tensor forward()
    caches, ``if self.mask is None: self.mask = ...``, stayed on the user's model: review)."""

    slots: dict[tuple[str, str, str], Any]  # (module path, "_parameters"/"_buffers", key) -> tensor
    versions: dict[tuple[str, str, str], int]
    buffers: dict[tuple[str, str, str], torch.Tensor]
    scalars: dict[tuple[str, str], Any]
    attributes: dict[str, dict[str, Any]]  # module path -> its vars(), as they were

    @classmethod
    def take(cls, model: nn.Module) -> StateSnapshot:
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
                if key not in before or not same_value(before[key], value):
                    changed.append(f"{path}.{key}" if path else key)
                if key in before:
                    vars(m)[key] = before[key]  # an instance's vars() is its writable __dict__
                else:
                    del vars(m)[key]
        return changed

    def changes(self, model: nn.Module) -> tuple[list[str], list[str], list[Any]]:
        """(tensors replaced or updated, Python attributes changed, the objects now in replaced slots)."""
        now = StateSnapshot.take_light(model)
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
    snapshot = StateSnapshot.take(model)
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
def refuse_carried_state(model: nn.Module, read: Iterable[str], tracer: str,
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
    forward() set computes from the data, by qualified name (:func:`constant_attributes_read`).
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
    inputs, the model's parameters or buffers, or a random draw (:func:`varies`): one that differs
    from call to call, unlike a cache made of constants and sizes (``self.mask = torch.triu(...)``)."""
    state = {n for n, _ in itertools.chain(model.named_parameters(remove_duplicate=False),
                                            model.named_buffers(remove_duplicate=False))}
    memo: dict[fx.Node, bool] = {}
    return [name for name, value in values.items() if any(
        varies(v.node, state, memo) for v in tree_flatten(value)[0] if isinstance(v, fx.Proxy))]


def _unrecorded_update(what: str, line: str | None, tracer: str, stopped: bool = False) -> str:
    """The refusal of an update of model state that ``tracer`` does not record (one text for
    :func:`checked_trace`, after the trace, and :class:`GuardedTrace`, before the update)."""
    where = f" at {line}" if line else ""
    ran = "would have run" if stopped else "ran"
    return (f"forward() updates {what}{where} in a way {tracer} does not record: the update {ran} once while "
            "tracing and is not part of the captured graph, so the placed model would diverge from the "
            "original from its second step on. Expected state kept in registered buffers and updated in "
            "place with tensor methods (e.g. self.register_buffer('steps', torch.zeros(())) and "
            "self.steps.add_(1))")


def last_user_line(stack_trace: str) -> str | None:
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


def line_updating(targets: list[torch.Tensor], retrace: Any) -> str | None:
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
