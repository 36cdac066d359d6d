"""What a placed model checks before each forward, so that it never silently computes
something other than the model it was captured from.

A trace bakes into the graph what forward() read that is not a parameter, a buffer or an input:
Python values and plain tensors of the modules (an annealed temperature, a flag, a count), the
example's non-tensor arguments, and under torch.export the example's shapes. The graph then
computes with those values whatever they become. :func:`constant_attributes_read` records the
attributes a trace reads (:data:`Scalar`), :func:`pin_constant_attributes`,
:func:`pin_constant_inputs` and :func:`pin_shapes_unless_generic` pin them on the captured
graph, and a forward pre-hook refuses a call where one changed, naming it and the remedy
(a buffer, a tensor input). :func:`refuse_hooks_never_run` does the same for a hook added
later on a module the graph never calls. :func:`varies` tells a value computed from the data
from one computed from constants alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_symbolic_trace
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.errors import CaptureError, one_line_reason
from graphs.eval_interpreter import refuse_other_shapes
from graphs.forward_inputs import ForwardParam, UnboundInput, bind_inputs
from graphs.ops import draws_random_numbers, op_name
from graphs.random_state import kept_random_state

log = logging.getLogger(__name__)

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


@contextlib.contextmanager
def constant_attributes_read(root: Any, modes_read: dict[str, bool] | None = None,
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
    module path (:func:`graphs.module_modes.modes_on`), seen the same way; ``attributes_read`` the qualified names of
    the attributes read while they held their value from before the block (``None`` ones too) or
    were missing (``hasattr``), for :func:`refuse_carried_state`; ``tensors_set`` whether each
    tensor the block sets as a module attribute computes from the data (:func:`varies`), where a
    torch.export trace tracks it.
    """
    reads: dict[str, Scalar | TensorRead] = {}
    if not isinstance(root, nn.Module):
        yield reads
        return
    # Keyed by the module's __dict__, not the module: the view of graphs.loss_targets shares its
    # model's __dict__, and a hook of the model reads through the model itself (self.features).
    held: dict[int, tuple[str, dict[str, Scalar | None]]] = {}
    paths: dict[int, str] = {}
    for path, module in root.named_modules():
        paths[id(vars(module))] = path
        constants = {k: v for k, v in vars(module).items() if not k.startswith("_")
                     and _baked_value(v)
                     and (k != "training" or modes_read is not None)}
        if constants:
            held[id(vars(module))] = (path, constants)
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
            path = paths.get(id(vars(module)))
            if node is not None and path is not None:
                # Now: torch.export rewrites its graph afterwards, and the node's inputs are gone then.
                tensors_set[f"{path}.{name}" if path else name] = varies(node, set(), {})
        plain_setattr(module, name, value)

    def recording_getattr(module: nn.Module, name: str) -> Any:
        entry = held.get(id(vars(module)))
        if entry is not None and name == "training" and name in entry[1]:
            assert modes_read is not None  # held only then
            modes_read[entry[0]] = bool(entry[1][name])
            return entry[1][name]
        path = paths.get(id(vars(module)))
        qualname = f"{path}.{name}" if path else name
        if entry is not None and name in entry[1]:
            value = entry[1][name]
            if attributes_read is not None:
                attributes_read.add(qualname)
            # A tensor is kept as its shape: holding it would keep the user's tensor alive beside
            # the placed model's own copy (the graph holds fx's constant, not this attribute). A
            # list or dict as it is now: forward() or the loop may change the object itself later;
            # one that has come to hold a tensor (a hook's ``self.features["mid"] = output`` into a
            # dict empty before) holds what the trace computed, no value baked in.
            if isinstance(value, (list, dict)) and not _baked_value(value):
                reads.pop(qualname, None)
            else:
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
        modules = {id(vars(m)): m for m in root.modules()}
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


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root``'s submodule at ``path`` ("" is ``root``), None where there is none: what the
    forward pre-hooks here look up at every step, where ``get_submodule``'s checks cost ~4 us a path."""
    found: nn.Module | None = root
    for part in path.split(".") if path else ():
        found = found._modules.get(part) if found is not None else None
    return found


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
            holders[path] = _submodule(module, path)  # None: no such module, so nothing could be set on it
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
        found = _submodule(module, path)
        if found is not None and (found._forward_hooks or found._forward_pre_hooks or found._backward_hooks
                                  or found._backward_pre_hooks):
            raise CaptureError(
                f"module {path!r} of the placed model has a hook registered after capture, which would never run: the "
                f"graph runs the ops of {path!r} itself and never calls the module; expected the hook registered on "
                "the model before capturing it (the tracers put what it does in the graph), or on a module the graph "
                "calls (a torch.nn layer, a leaf module)")


_refuse_hooks_never_run.placer_hook = True  # type: ignore[attr-defined]  # copies register it again (graphs.eval_mode)


@contextlib.contextmanager
def no_constants_left_on(model: nn.Module, tracer: fx.Tracer) -> Iterator[None]:
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
    if refuse_other_constants not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(refuse_other_constants, with_kwargs=True)


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


def _as_positional(args: tuple, kwargs: dict[str, Any], params: tuple[ForwardParam, ...]) -> tuple:
    """``args`` and ``kwargs`` as the model's positional inputs (:func:`graphs.forward_inputs.bind_inputs`),
    or a CaptureError naming what does not bind."""
    try:
        return bind_inputs(params, args, kwargs)
    except UnboundInput as exc:
        if exc.unknown:
            raise CaptureError(
                f"the model's graph was called with {', '.join(repr(k) for k in exc.unknown)}, which forward() does "
                f"not take by position after {len(args)} positional input(s) (its parameters: "
                f"{', '.join(name for name, _, _ in params)}); expected the inputs it was captured with") from None
        raise CaptureError(f"the model's graph was called without {exc.missing!r}, a parameter of forward() without a "
                           "default; expected every such input") from None


def refuse_other_constants(module: fx.GraphModule, args: tuple,
                           kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of :func:`pin_constant_inputs`. A graph torch.export captured takes its
    inputs by position only; keyword inputs (``placed(**batch)``) are put in their positions by
    the model's own signature (``placer_forward_params``, :func:`graphs.forward_inputs.forward_params`)
    and passed on so."""
    pinned: tuple[Any, dict[int, Any]] = module.placer_constant_inputs  # type: ignore[assignment]
    spec, constants = pinned
    params = module.__dict__.get("placer_forward_params")
    rewritten: tuple[tuple, dict[str, Any]] | None = None
    if kwargs and params:
        args = _as_positional(args, kwargs, params)
        kwargs, rewritten = {}, (args, {})
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
    return rewritten


refuse_other_constants.placer_hook = True  # type: ignore[attr-defined]  # copies register it again (graphs.eval_mode)


#: Why an exported training graph that is not batch-generic refuses other shapes (:func:`pin_shapes_unless_generic`).
_EXPORTED_SHAPES = (
    "torch.export captured the model's graph with the example's sizes in its ops, and at capture a batch of another "
    "size computed something else than the model (or failed); expected inputs of the example's shapes: drop or pad "
    "a last, smaller batch (DataLoader(drop_last=True)), or capture the model with the shapes it will train on")


def pin_shapes_unless_generic(gm: fx.GraphModule, model: nn.Module, inputs: tuple, batch_dim: int = 0) -> None:
    """Make ``gm`` (torch.export's training graph of ``model``) refuse inputs of other shapes than
    the example's, unless it computes the model's outputs for a batch of another size.

    torch.export specialises on the example's shapes: sizes the model computes from its input
    (``x.view(x.size(0), -1)``, ``torch.ones(x.shape[0], 1)``) are constants in the graph, so
    a last, smaller batch could run them with no error (a row broadcast over the example's rows,
    found by trying). The check: every tensor input whose batch dimension (``batch_dim``) is the
    first input's batch gets one sample more (its samples taken in turn), and copies of ``gm`` and ``model`` (one
    deep copy, so their shared tensors stay shared, and forward()'s own updates of them, a
    BatchNorm's statistics or a teacher's weights, land on the copies) run it from one seed.
    Models with more than :data:`BATCH_CHECK_MAX_BYTES` of state, or that cannot be deep-copied,
    are not checked (a log line says so) and keep running any shape, as before.
    """
    leaves, spec = tree_flatten(inputs)
    first = next((v for v in leaves if isinstance(v, torch.Tensor) and v.dim() > batch_dim), None)
    if first is None:
        return
    state = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if state > BATCH_CHECK_MAX_BYTES:
        log.info("the graph torch.export captured was not checked on another batch size (%.1f GiB of state to "
                 "copy); it may hold the example's batch size", state / 2**30)
        return
    batch = first.shape[batch_dim]
    rows = torch.arange(batch + 1) % batch
    grown = tree_unflatten([v.index_select(batch_dim, rows.to(v.device)) if isinstance(v, torch.Tensor)
                            and v.dim() > batch_dim and v.shape[batch_dim] == batch else v for v in leaves], spec)
    try:
        twin_gm, twin_model = copy.deepcopy((gm, model))
    except Exception as exc:  # noqa: BLE001 - a model holding what does not copy (a lock, a file)
        log.info("the graph torch.export captured was not checked on another batch size (the model does not "
                 "deep-copy: %s); it may hold the example's batch size", one_line_reason(exc))
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


#: Ops that read only a tensor's metadata: a value computed from them alone (a mask sized by
#: ``x.size(1)``) is the same at every call of the same shapes.
_METADATA_READS = frozenset({"size", "dim", "numel", "shape", "dtype", "device", "ndim"})


def varies(node: fx.Node, state: set[str], memo: dict[fx.Node, bool]) -> bool:
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
            memo[node] = any(varies(arg, state, memo) for arg in node.all_input_nodes)
    return memo[node]


def same_value(a: Any, b: Any) -> bool:
    """Whether two values of a Python attribute are equal (tensors only by identity)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that cannot say whether it is equal has changed
        return False
