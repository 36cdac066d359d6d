"""The torch.export path of a capture: :func:`export_trace`, for models torch.fx cannot trace.

Python control flow on shapes, iteration over tensors and most Hugging Face models defeat
torch.fx; capture (:mod:`graphs.capture`) then runs ``torch.export.export(strict=False)`` without
decompositions, the batch dimension symbolic where the model lets it be
(:func:`batch_dynamic_shapes`: a graph that runs micro-batches and DDP shares; exported at the
example's sizes where export refuses that). ``exported.module()`` is the runnable GraphModule
and each node's module is recovered from its ``nn_module_stack``. torch.export keeps no gradient hooks and no custom
backward, so a model with them is refused (:class:`HooksNotKept`) rather than given other
gradients; the train()/eval() overrides and example-bound hooks torch.export puts on its module
are removed, so that the module pickles and runs any batch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from graphs.carried_state import refuse_carried_state
from graphs.errors import CaptureError
from graphs.eval_arguments import export_eval_arguments, export_module_modes
from graphs.eval_mode import follow_eval_mode
from graphs.forward_checks import (
    constant_attributes_read,
    constant_inputs,
    pin_constant_attributes,
    pin_constant_inputs,
)
from graphs.forward_inputs import forward_params
from graphs.module_modes import modes_on
from graphs.python_draws import python_draws_refused

log = logging.getLogger(__name__)


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


def export_trace(model: nn.Module, inputs: tuple, follow_eval: bool = True, batch_dim: int = 0) -> fx.GraphModule:
    """``torch.export`` (non-strict, no decompositions) → runnable GraphModule with ``val`` metadata.

    With ``follow_eval`` it follows ``.eval()`` by the training flags placer knows
    (:func:`graphs.eval_arguments.export_eval_arguments`); capture leaves that to its second export
    in eval mode (:func:`graphs.eval_capture.export_eval`), which installs the eval forward once.

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
            exported = _export_batch_generic(model, inputs, batch_dim)
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
    # placed(**batch): forward_checks.refuse_other_constants binds keyword inputs by these.
    gm.placer_forward_params = forward_params(model, plain_defaults=True)  # type: ignore[assignment]
    if constants:
        pin_constant_attributes(gm, constants)
    gm.placer_module_modes = {**modes_on(gm, modes_read, model), **export_module_modes(gm, model)}  # type: ignore[assignment]
    if follow_eval:
        follow_eval_mode(gm, export_eval_arguments(gm))
    return gm


def batch_dynamic_shapes(inputs: tuple, batch_dim: int = 0) -> tuple[Any, ...] | None:
    """torch.export's ``dynamic_shapes`` for ``inputs``: the batch dimension of every tensor that
    carries the batch (:func:`graphs.input_batch.carries_batch`) left to export to keep symbolic
    (``Dim.AUTO``: dynamic where the model lets it be, the example's size where the model fixes
    it), every other dimension static. None when no input has a batch.

    >>> batch_dynamic_shapes((torch.zeros(4, 3), 2.0))
    ({0: DimHint(AUTO)}, None)
    """
    from graphs.input_batch import batch_axis, batch_size_of

    batch = batch_size_of(inputs, batch_dim)
    if batch is None:
        return None

    def dynamic(x: Any) -> dict[int, Any] | None:
        axis = batch_axis(x, batch, batch_dim)
        return None if axis is None else {axis: torch.export.Dim.AUTO}

    return tuple(tree_map(dynamic, inputs))


def _export_batch_generic(model: nn.Module, inputs: tuple, batch_dim: int) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` with its batch dimension symbolic where the model
    allows (:func:`batch_dynamic_shapes`), so that the graph runs micro-batches and DDP shares;
    exported with every size fixed where export refuses that.

    Exported at the example's sizes alone, a graph held the batch in its ops (``view(16, 64,
    ...)``): a Hugging Face GPT-2 of batch 16 could not run on 4 samples, and every pipeline
    and DDP row of it was set aside (DDP 1.45x, a 2 x 2 pipeline x DDP 1.62x the single V100 on
    4xV100-nvlink, simulated).
    """
    shapes = batch_dynamic_shapes(inputs, batch_dim)
    if shapes is not None:
        try:
            with _dim_marks_removed(inputs):
                return torch.export.export(model, inputs, strict=False, dynamic_shapes=shapes)
        except Exception as exc:  # noqa: BLE001 - the static export below decides
            log.info("torch.export with a symbolic batch failed (%s); exporting at the example's sizes",
                     type(exc).__name__)
    return torch.export.export(model, inputs, strict=False)


@contextlib.contextmanager
def _dim_marks_removed(inputs: tuple) -> Iterator[None]:
    """Take off the input tensors, on exit, the marks a symbolic export leaves on them
    (``_dynamo_dynamic_indices`` and the like): the static export that follows a failed symbolic
    one read them and traced the batch as symbolic all the same (a draw with the model's own
    generator, ``torch.randn(x.shape, generator=g)``, failed both ways: "SymIntArrayRef expected
    to contain only concrete integers"), and they stayed on the user's example inputs."""
    from torch.utils._pytree import tree_leaves

    tensors = [x for x in tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    before = [set(vars(t)) for t in tensors]
    try:
        yield
    finally:
        for t, had in zip(tensors, before):
            for name in [n for n in vars(t) if n not in had and "dynamo" in n]:
                delattr(t, name)


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
