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
import io
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graphs.errors import CaptureError
from graphs.fingerprint import model_fingerprint
from graphs.model_file import preserved_buffers
from graphs.placement_graph import build_placement_graph
from graphs.user_frames import describe_frame, user_frame

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


class PlacerTracer(fx.Tracer):
    """fx tracer at module granularity: torch.nn layers, recurrent modules and user leaves are single nodes."""

    def __init__(self, leaf_types: Sequence[type] = (), leaf_names: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.leaf_names = frozenset(leaf_names)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, RECURRENT_TYPES) or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


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
    tracer = PlacerTracer(leaf_types, leaf_names)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__ if name == "model" else name)


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


def export_trace(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    """``torch.export`` (non-strict, no decompositions) → runnable GraphModule with ``val`` metadata."""
    with quiet_torch_logs(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        # export warns about torch internals (e.g. RNN flat weights); not the user's concern.
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, inputs, strict=False)
    # Guards are checks on later inputs' shapes; placement runs the example's shapes and
    # a guard node would be one more (cost-free) node to place.
    return exported.module(check_guards=False)


def capture(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any] = (),
            name: str = "model") -> CapturedModel:
    """Capture ``model`` on ``example_inputs`` (see the module doc for fx → export → error).

    ``leaf_modules``: module classes, module paths (``"encoder.rnn"``) or class names
    (``"Block"``) to keep as single nodes (fx path only: torch.export always traces into
    modules and keeps the mapping in ``module``).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    leaf_modules = tuple(leaf_modules)
    leaf_types, leaf_names = resolve_leaf_modules(model, leaf_modules)
    fx_error: str | None = None
    try:
        gm = fx_trace(model, leaf_types, leaf_names, name)
        shapes_from = propagate_shapes(gm, inputs)
        method = "fx"
    except Exception as fx_exc:  # anything fx cannot handle goes to torch.export
        fx_error = _reason(fx_exc)
        try:
            gm = export_trace(model, inputs)
        except Exception as export_exc:
            raise _capture_error(name, fx_exc, export_exc) from None
        method, shapes_from = "export", "fake"

    fingerprint = model_fingerprint(gm, model, inputs)
    graph = build_placement_graph(gm, name=name, method=method, fingerprint=fingerprint,
                                  trust_requires_grad=(method == "fx"))
    return CapturedModel(gm=gm, graph=graph, method=method, fingerprint=fingerprint, model=model,
                         example_inputs=inputs, name=name, shapes_from=shapes_from,
                         fx_error=fx_error, leaf_modules=leaf_modules)


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
    frame = user_frame(export_exc) or user_frame(fx_exc)
    where = (f"the line that could not be traced is {describe_frame(frame)}" if frame
             else "no model line appears in the traceback")
    return CaptureError(
        f"cannot capture model {name!r}: neither torch.fx nor torch.export could trace it; {where}. "
        f"torch.fx: {_reason(fx_exc)}. torch.export: {_reason(export_exc)}. Expected a forward() "
        "whose Python control flow does not depend on tensor values: rewrite that line (e.g. "
        "torch.where instead of `if`), or name its module as a leaf module"
    )
