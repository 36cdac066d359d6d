"""What a captured graph runs after ``.eval()``: the model traced a second time, in eval mode.

Both tracers run ``if self.training:`` and ``F.dropout(h, p, self.training)`` while tracing,
so a graph captured in training mode keeps the training branch. capture (:mod:`graphs.capture`)
traces the model again in eval mode: for a torch.fx capture (:func:`mode_baked_by_fx`) that gives
the same graph with other constants, another graph, or, where fx cannot trace the eval mode, the
model exported in eval mode; for a torch.export capture (:func:`export_eval`), the model exported
again in eval mode. Where none of these works, the answer is why the graph cannot follow
``.eval()``. :mod:`graphs.eval_mode` installs the answer on the graph.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from graphs.errors import one_line_reason
from graphs.eval_arguments import (
    EvalArguments,
    _same_tensor,
    export_eval_arguments,
    export_eval_plan,
    fx_eval_arguments,
)
from graphs.export_tracer import export_trace, quiet_torch_logs
from graphs.forward_checks import no_constants_left_on, pin_constant_attributes
from graphs.fx_tracer import PlacerTracer
from graphs.module_modes import set_training_modes
from graphs.python_draws import CHANGING_REMEDY, ChangingValue
from graphs.state_snapshot import StateSnapshot

log = logging.getLogger(__name__)


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


def mode_baked_by_fx(model: nn.Module, inputs: tuple, gm: fx.GraphModule, leaf_types: Sequence[type],
                      leaf_names: Iterable[str], trace_modes: dict[str, bool],
                      training_attributes: Sequence[str] = (), batch_dim: int = 0) -> EvalArguments | fx.Graph | str:
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
        return _exported_for_fx(model, inputs, gm, trace_modes, training_attributes, one_line_reason(exc), batch_dim)
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
            if training_attributes:
                raise ChangingValue(_attributes_set_message(model, training_attributes))
            raise ChangingValue("forward() gives torch.fx another graph at every trace: it computes with a Python value "
                                "that changes from one call to the next (random.random(), a clock), which a trace "
                                f"runs once and bakes into the graph. {CHANGING_REMEDY}")
    if found is not None:
        return found
    return ("forward() gives torch.fx another graph at every trace (a value that changes from one trace to the "
            "next, such as random.random()): no eval-mode graph traced from it can be trusted")


def _attributes_set_message(model: nn.Module, names: Sequence[str]) -> str:
    """Why a model whose forward sets Python attributes (``names``, as the trace left them) gives
    another graph at every trace, and what to do: AWD-LSTM's weight drop assigns a dropped copy of a
    weight to its LSTM (``setattr(self.rnn, "weight_hh_l0", w)``) in every forward, which no graph
    records, so the placed LSTM would run on a stale weight; it was refused as "a Python value that
    changes from one call to the next (random.random(), a clock)", which named the wrong cause."""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    owner_path = names[0].rpartition(".")[0]
    owner = model.get_submodule(owner_path)
    # A torch.nn layer sets nothing in its own forward: the module setting it holds it (its parent).
    if type(owner).__module__.startswith("torch.nn") and owner_path:
        owner_path = owner_path.rpartition(".")[0]
        owner = model.get_submodule(owner_path)
    leaf = (f": `--leaf {type(owner).__name__}` (module {owner_path!r}) if its forward sets and reads them, or "
            "leaf_modules in the API" if owner_path else " (leaf_modules, or `--leaf MODULE` on the command line)")
    return ("forward() gives torch.fx another graph at every trace: it sets the Python attribute(s) "
            f"{shown} while it runs (a weight assigned to a module, as weight drop does; a cached tensor), which no "
            "graph records: a trace bakes what it found there, so the placed model would compute with a stale "
            "value. Expected the value passed as a tensor to what reads it (an argument, or "
            "torch.func.functional_call with the weights), or the module that sets and reads it kept whole as a leaf "
            f"module{leaf}")


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


def export_eval(model: nn.Module, inputs: tuple, gm: fx.GraphModule, trace_modes: dict[str, bool],
                 training_attributes: Sequence[str] = (), batch_dim: int = 0) -> EvalArguments | fx.Graph | str:
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
        eval_gm = _export_in_eval_mode(model, inputs, trace_modes, training_attributes, batch_dim)
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
                     training_attributes: Sequence[str], fx_reason: str, batch_dim: int = 0) -> fx.Graph | str:
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
        eval_gm = _export_in_eval_mode(model, inputs, trace_modes, training_attributes, batch_dim)
    except Exception as exc:  # noqa: BLE001 - neither tracer follows the eval mode
        return (f"torch.fx cannot trace forward() in eval mode ({fx_reason}), nor torch.export capture it "
                f"({one_line_reason(exc)}), and the graph keeps what forward() computed in training mode: after .eval() "
                "it would still run the training one")
    if isinstance(eval_gm, str):
        return eval_gm
    _warn_of_fast_paths(model)
    shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
              for n in eval_gm.graph.nodes if n.op == "placeholder"]
    # A size export specialised (the loop above) is a SymInt with a constant value: the example's.
    gm.placer_eval_input_shapes = [  # type: ignore[assignment]
        tuple(int(d) for d in shape) if shape is not None and all(is_concrete_int(d) for d in shape) else None
        for shape in shapes]
    return _exported_eval_graph(eval_gm, model, gm)


def _export_in_eval_mode(model: nn.Module, inputs: tuple, trace_modes: dict[str, bool],
                         training_attributes: Sequence[str], batch_dim: int = 0) -> fx.GraphModule | str:
    """``model`` exported in eval mode (its modes ``trace_modes`` again after), or why it cannot
    follow ``.eval()``: forward() sets Python attributes in eval mode only (:func:`_eval_python_state`).

    Raises:
        Exception: whatever torch.export raises.
    """
    model.eval()
    python_state: list[str] = []
    try:
        with _restored(model) as python_state, quiet_torch_logs(logging.CRITICAL):
            eval_gm = export_trace(model, inputs, follow_eval=False, batch_dim=batch_dim)
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
