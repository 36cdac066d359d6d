"""Capturing a PyTorch model as a runnable fx graph plus its placement graph.

First choice: ``torch.fx.symbolic_trace`` at module granularity (:mod:`graphs.fx_tracer`).
Shapes come from ``ShapeProp`` on fake tensors (no memory, no compute), on real tensors when an
op has no fake implementation (:func:`propagate_shapes`).

Fallback, for models fx cannot trace (Python control flow on shapes, iteration over
tensors, most Hugging Face models): ``torch.export.export(strict=False)`` without
decompositions (:mod:`graphs.export_tracer`). When both fail, :class:`CaptureError` names the
model line that could not be traced.

Both traces run under guards (what a trace would not record faithfully is recorded as a node or
refused: :mod:`graphs.trace_guards`, :mod:`graphs.python_draws`, :mod:`graphs.state_snapshot`,
:mod:`graphs.carried_state`, :mod:`graphs.root_hooks`), and the captured graph checks before each
forward what the trace baked in (:mod:`graphs.forward_checks`). The model is traced in training
mode and its modes put back after (:mod:`graphs.module_modes`); what the graph runs after
``.eval()`` comes from a second trace in eval mode (:mod:`graphs.eval_capture`), and the
GraphModule gets every parameter and buffer of the model, in its order
(:mod:`graphs.state_completion`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graphs.activation_checkpoints import recording_checkpoints, reentrant_calls
from graphs.autograd_functions import FunctionNotNamed
from graphs.buffers import preserved_buffers
from graphs.distribution_checks import distribution_checks_off
from graphs.errors import CaptureError, one_line_reason
from graphs.eval_arguments import EvalArguments
from graphs.eval_capture import export_eval, mode_baked_by_fx
from graphs.eval_mode import follow_eval_graph, follow_eval_mode, refuse_eval_mode
from graphs.export_tracer import HooksNotKept, export_trace, quiet_torch_logs
from graphs.fingerprint import model_fingerprint
from graphs.forward_checks import pin_shapes_unless_generic, refuse_hooks_never_run
from graphs.fx_tracer import fx_locate, fx_trace, leaf_module_paths, resolve_leaf_modules
from graphs.lazy_modules import materialize
from graphs.leaf_kernels import annotate_leaf_kernels
from graphs.loss_reach import loss_differentiates_through_model
from graphs.module_modes import set_training_modes, training_modes
from graphs.placement_graph import build_placement_graph, mark_loss_differentiated
from graphs.python_draws import ChangingValue
from graphs.root_hooks import refuse_root_backward_hooks
from graphs.saved_activations import SAVED_FROM, annotate_saved_bytes
from graphs.shape_dependence import data_dependent_shapes
from graphs.stale_state import held_tensors_kept, refusing_stale_state
from graphs.state_completion import complete_state
from graphs.state_snapshot import TraceTimeUpdate, checked_trace
from graphs.unregistered_modules import unregistered_modules
from graphs.update_lines import line_updating
from graphs.user_frames import describe_frame, modules_running, user_frame, user_frame_calling

log = logging.getLogger(__name__)


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

    @property
    def leaf_paths(self) -> tuple[str, ...]:
        """The module paths kept whole because of ``leaf_modules``
        (:func:`graphs.fx_tracer.leaf_module_paths`): what capturing the model again, in a
        worker process or from a placement file, needs to give the same graph."""
        return leaf_module_paths(self.model, self.leaf_modules) if self.leaf_modules else ()


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


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


def capture(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any] = (),
            name: str = "model", loss_fn: Callable[..., torch.Tensor] | None = None, batch_dim: int = 0) -> CapturedModel:
    """Capture ``model`` on ``example_inputs`` (see the module doc for fx → export → error).

    ``leaf_modules``: module classes, module paths (``"encoder.rnn"``) or class names
    (``"Block"``) to keep as single nodes (fx path only: torch.export always traces into
    modules and keeps the mapping in ``module``). ``loss_fn(output, *inputs)``: the model's
    loss, whose saved tensors count in the ``act_bytes`` of the node producing the output
    (:mod:`graphs.saved_activations`); None counts the forward's alone. ``batch_dim``: the
    inputs' batch dimension (:attr:`graphs.model_file.ModelSpec.batch_dim`), which torch.export
    keeps symbolic where the model lets it (so that the graph runs micro-batches) and the check
    of a graph that may fix the batch grows.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    try:
        materialize(model, inputs)  # lazy modules take their shapes before anything reads them
    except Exception as exc:  # the model's own code failed on its inputs
        raise CaptureError(f"cannot capture model {name!r}: its lazy modules could not take their shapes from the "
                           f"example inputs ({one_line_reason(exc)}); expected inputs forward() accepts") from None
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
    loose = unregistered_modules(model)
    if loose:
        log.warning("%s keeps module(s) %s in a plain Python container, not an nn.ModuleList/ModuleDict: their "
                    "parameters are not the model's (model.parameters() leaves them out, so no optimizer trains "
                    "them, .to() does not move them), and placer captures them as constants; expected "
                    "nn.ModuleList or nn.ModuleDict if they are to train", name, ", ".join(loose[:4])
                    + (f" and {len(loose) - 4} more" if len(loose) > 4 else ""))
    _refuse_graph_module_names(model, name)
    try:
        # distribution checks: their value checks are control flow no tracer follows
        with distribution_checks_off(), held_tensors_kept(model):
            return _capture(model, inputs, leaf_modules, leaf_types, leaf_names, name, trace_modes, loss_fn,
                            batch_dim)
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
             loss_fn: Callable[..., torch.Tensor] | None = None, batch_dim: int = 0) -> CapturedModel:
    fx_error: str | None = None
    baked: EvalArguments | fx.Graph | str | None = None
    training_attributes: list[str] = []  # Python attributes the training trace set (put back)
    checkpointed: list[str] = []
    try:
        with recording_checkpoints(model) as checkpointed:
            gm = checked_trace(model, "torch.fx", lambda: fx_trace(model, leaf_types, leaf_names, name),
                               fx_locate(model, leaf_types, leaf_names), training_attributes)
        if checkpointed:
            shown = ", ".join(dict.fromkeys(checkpointed))
            log.warning("%s: forward() checkpoints activations (torch.utils.checkpoint, of %s); torch.fx traces "
                        "through it, so the captured graph, the placed model and the simulated memory keep every "
                        "activation instead of recomputing them: the same results, more memory than the model "
                        "uses. To keep it, call checkpoint inside a module's forward and name that module as a leaf "
                        "module (leaf_modules, or --leaf): a leaf runs its own forward", name, shown)
        # A failure here is the fallback's cue, not the user's news; so is a stale constant
        # (torch.export runs the hooks that write it, and records the read).
        with quiet_torch_logs(logging.CRITICAL), refusing_stale_state(gm, model):
            shapes_from = propagate_shapes(gm, inputs)
        method = "fx"
        baked = mode_baked_by_fx(model, inputs, gm, leaf_types, leaf_names, trace_modes, training_attributes, batch_dim)
    except Exception as fx_exc:  # anything fx cannot handle goes to torch.export
        if (isinstance(fx_exc, TraceTimeUpdate) and fx_exc.python_state) or isinstance(fx_exc, (ChangingValue,
                                                                                                 FunctionNotNamed)):
            # torch.export would bake the same Python value (or drop the same Python state, or the
            # Function's backward)
            raise CaptureError(f"cannot capture model {name!r}: {fx_exc}") from None
        reentrant = reentrant_calls(checkpointed)
        if reentrant:  # torch.export's graph of it carries no gradient (graphs.activation_checkpoints)
            shown = ", ".join(dict.fromkeys(reentrant))
            raise CaptureError(
                f"cannot capture model {name!r}: forward() checkpoints {shown} with use_reentrant=True, which runs "
                "the block under no_grad: torch.fx cannot record that and torch.export's graph of it carries no "
                "gradient; expected use_reentrant=False (PyTorch's recommended form, which gives the block's parameters "
                "their gradients whether or not its inputs require grad; placer traces through it), or the checkpoint "
                "inside a module named as a leaf module (--leaf)") from None
        fx_error = one_line_reason(fx_exc)
        try:
            gm = checked_trace(model, "torch.export", lambda: export_trace(model, inputs, False, batch_dim),
                               lambda targets, _: line_updating(targets, lambda: export_trace(model, inputs, False,
                                                                                              batch_dim)),
                               training_attributes)
        except Exception as export_exc:
            if isinstance(export_exc, TraceTimeUpdate) and isinstance(fx_exc, TraceTimeUpdate):
                raise CaptureError(f"cannot capture model {name!r}: {fx_exc}") from None
            if isinstance(export_exc, TraceTimeUpdate) and export_exc.python_state:
                raise CaptureError(f"cannot capture model {name!r}: {export_exc}") from None
            raise _capture_error(name, fx_exc, export_exc, model,
                                 leaf_module_paths(model, leaf_modules) if leaf_modules else ()) from None
        method, shapes_from = "export", "fake"
        baked = export_eval(model, inputs, gm, trace_modes, training_attributes, batch_dim)
    if isinstance(baked, str):
        refuse_eval_mode(gm, baked)
    elif isinstance(baked, dict):
        follow_eval_mode(gm, baked)
    load_torch_exit_report_imports()
    complete_state(gm, model)
    refuse_hooks_never_run(gm)
    follow_eval_mode(gm)  # copies and pickles register its hook again (a no-op where nothing needs that)
    if method == "export":
        pin_shapes_unless_generic(gm, model, inputs, batch_dim)
    if isinstance(baked, fx.Graph):
        # After complete_state: the eval graph may read state the training graph does not.
        try:
            follow_eval_graph(gm, baked, source=model)
        except CaptureError as exc:
            refuse_eval_mode(gm, str(exc))

    fingerprint = model_fingerprint(gm, model, inputs)
    graph = build_placement_graph(gm, name=name, method=method, fingerprint=fingerprint,
                                  trust_requires_grad=(method == "fx"))
    annotate_leaf_kernels(graph, gm, inputs)
    try:
        annotate_saved_bytes(graph, gm, inputs, fake=(shapes_from == "fake"), loss_fn=loss_fn)
    except Exception as exc:  # the graph stays usable: compile_problem's fallback estimate applies
        log.warning("could not measure the activations autograd saves for %s (%s: %s); memory uses the "
                    "estimate 'each op that requires grad keeps its output'", name, type(exc).__name__, exc)
    if graph.graph.get(SAVED_FROM) != "fake":
        # Fake tensors alone could not size some op (a data-dependent size is one such op;
        # where they could, none is, and the costlier pass under a ShapeEnv is skipped).
        for name in data_dependent_shapes(gm, inputs):
            graph.nodes[name]["shape_varies"] = True
    if loss_fn is not None and loss_differentiates_through_model(gm, inputs, loss_fn):
        mark_loss_differentiated(graph)
        log.warning("%s: the loss differentiates through the model (torch.autograd.grad of its output by an input "
                    "or an activation, in get_loss), so it needs the autograd graph behind the output: the model is "
                    "one group, which no worker-process boundary or pipeline stage cuts (over worker processes one "
                    "of them holds it all; DDP and one process run it whole)", name)
    return CapturedModel(gm=gm, graph=graph, method=method, fingerprint=fingerprint, model=model,
                         example_inputs=inputs, name=name, shapes_from=shapes_from,
                         fx_error=fx_error, leaf_modules=leaf_modules, training_modes=trace_modes)


def _is_dataclass_named(qualified: str) -> bool:
    """Whether ``qualified`` (``module.Class``, from torch.export's message) names a dataclass of a
    loaded module."""
    module, _, cls = qualified.rpartition(".")
    return dataclasses.is_dataclass(getattr(sys.modules.get(module), cls, None))


def _inside_leaves(model: nn.Module | None, frame: Any, leaf_paths: Sequence[str]) -> list[str]:
    """The leaf modules (of ``leaf_paths``) that run ``frame``'s line, themselves or through a module
    inside them, where every module running that line is inside a leaf; else empty."""
    if model is None or frame is None or not leaf_paths:
        return []
    def holder(path: str) -> str | None:
        return next((leaf for leaf in leaf_paths if path == leaf or path.startswith(f"{leaf}.")), None)

    holders = [holder(p) for p in modules_running(model, frame)]
    return list(dict.fromkeys(h for h in holders if h is not None)) if holders and None not in holders else []


def _capture_error(name: str, fx_exc: BaseException, export_exc: BaseException,
                   model: nn.Module | None = None, leaf_paths: Sequence[str] = ()) -> CaptureError:
    if isinstance(export_exc, HooksNotKept):
        return CaptureError(
            f"cannot capture model {name!r}: {export_exc}, and torch.fx could not trace it ({one_line_reason(fx_exc)}); "
            "expected a forward() torch.fx can trace (it records custom autograd Functions whole), or gradient hooks "
            "and custom autograd Functions inside a submodule named as a leaf module (leaf_modules, or `--leaf "
            "MODULE` on the command line; a submodule with backward hooks is kept whole anyway), so that autograd "
            "runs them")
    unknown = re.search(r"Found <class '([\w.]+)'> in output", str(export_exc))
    if unknown:
        kind = unknown.group(1)
        # transformers' DynamicCache: HF models return their key/value cache unless told not to.
        cache = ("; a Hugging Face model returns its key/value cache for generation, which training does not "
                 "use: set model.config.use_cache = False in get_model()") if "cache" in kind.lower() else ""
        short = kind.rsplit(".", 1)[-1]
        if _is_dataclass_named(kind):  # torch.export takes a dataclass once it is registered with pytree
            return CaptureError(
                f"cannot capture model {name!r}: forward() returns the dataclass {short}, which torch.export takes as "
                f"a graph output only once registered, and torch.fx could not trace it ({one_line_reason(fx_exc)}); "
                f"expected torch.export.register_dataclass({short}) after the class in the model file (its worker "
                "processes import the file too), or outputs made of tensors in tuples, lists or dicts")
        return CaptureError(
            f"cannot capture model {name!r}: forward() returns a {kind}, which torch.export cannot give as a graph "
            f"output, and torch.fx could not trace it ({one_line_reason(fx_exc)}); expected outputs made of tensors "
            f"(in tuples, lists, dicts, or dataclasses registered with torch.export.register_dataclass){cache}")
    packing = user_frame_calling(fx_exc, "torch/nn/utils/rnn.py") or user_frame_calling(export_exc,
                                                                                     "torch/nn/utils/rnn.py")
    if packing is not None:
        # fx: lengths.to() on a Proxy; export: the packed data's size is the lengths' sum. Called
        # inside a leaf module, the packing runs on real tensors.
        return CaptureError(
            f"cannot capture model {name!r}: forward() packs or unpacks a padded batch (torch.nn.utils.rnn, at "
            f"{describe_frame(packing)}), whose sizes come from the lengths' values, which neither torch.fx nor "
            f"torch.export can record (torch.fx: {one_line_reason(fx_exc)}); expected the packing, the recurrent "
            "layer it feeds and any unpacking inside one submodule named as a leaf module (leaf_modules, or "
            "`--leaf MODULE` on the command line), which runs them whole, or padded sequences without packing")
    frame = user_frame(export_exc) or user_frame(fx_exc)
    inside = _inside_leaves(model, frame, leaf_paths)
    fx_frame = user_frame(fx_exc)
    export_text = one_line_reason(export_exc)
    control_flow = ("cannot be used as inputs to control flow" in str(fx_exc)
                    or type(export_exc).__name__ == "GuardOnDataDependentSymNode")
    if inside and fx_frame is not None:
        # torch.export keeps no module whole: its failure inside a leaf is not what stops the
        # capture, torch.fx's line is (given `--leaf ActNorm`, an ActNorm's `.item()` was named
        # and `--leaf ActNorm` suggested again, while fx had stopped in another module's line)
        frame = fx_frame
        shown = ", ".join(inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
        export_text = (f"{export_text}, inside the leaf module(s) {shown}, which it traces into (torch.export keeps "
                       "no module whole)")
        control_flow = "cannot be used as inputs to control flow" in str(fx_exc)
    where = (f"the line that could not be traced is {describe_frame(frame)}" if frame
             else "no model line appears in the traceback")
    expected = ("a forward() whose Python control flow does not depend on tensor values: rewrite that line (e.g. "
                "torch.where instead of `if`)" if control_flow else "a forward() both tracers can follow: rewrite "
                "that line")
    paths = modules_running(model, frame) if model is not None and frame is not None else []
    if paths == [""]:
        leaf = ("; it is in the model's own forward(), which cannot be kept whole: move it into a submodule and name "
                "that module as a leaf module (leaf_modules, or `--leaf MODULE` on the command line)")
    elif paths and model is not None:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        leaf = (f", or keep the module that runs it whole as a leaf module: `--leaf {type(model.get_submodule(paths[0])).__name__}` "
                f"(its class; {shown}), or leaf_modules in the API")
    else:
        leaf = ", or name its module as a leaf module (leaf_modules, or `--leaf MODULE` on the command line)"
    return CaptureError(
        f"cannot capture model {name!r}: neither torch.fx nor torch.export could trace it; {where}. "
        f"torch.fx: {one_line_reason(fx_exc)}. torch.export: {export_text}. Expected {expected}{leaf}"
    )

