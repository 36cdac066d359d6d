"""A pipelined placement's stage modules, cut from the captured fx graph.

``torch.distributed.pipelining.PipelineStage`` sends a stage's outputs to the next stage
only (``stage.py``: ``stage_index + 1``), so every value produced before a boundary and read
after it crosses that boundary: stage ``s`` takes ``boundary(s)`` positionally and returns
``boundary(s + 1)``, passing through the values it only relays (a skip connection across
two boundaries goes 0 -> 1 -> 2). The model inputs reach every stage as keyword arguments
(the schedule's ``step(**kwargs)`` splits them per micro-batch and gives them to every
stage), so no stage relays an input. The last stage returns the model's scalar loss
(the captured graph computes it, or ``loss_fn(output, *inputs)`` does), divided by the
number of micro-batches: the schedule's gradient accumulation then gives the gradient of
the mean over micro-batches, the full batch's for a mean loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec

from envs.runtime.gradient_reach import loss_of_a_cut_output
from envs.sim.pipeline_layout import Pipeline, PipelineError
from graphs.buffers import preserved_buffers
from graphs.graph_inputs import model_args
from graphs.input_batch import batch_axis, batch_size_of, batch_slice
from graphs.ops import differentiated_regions, in_place_writes
from graphs.random_state import kept_random_state

__all__ = ["StageSpec", "split_stages", "StageModule", "boundary_metas", "check_static_shapes", "microbatch",
           "whole_pipeline"]


@dataclass
class StageSpec:
    """One stage: its graph module, what it receives and sends, and the model inputs it reads."""

    index: int
    nodes: list[str]
    recv: list[str]
    send: list[str]
    inputs_used: list[str]
    gm: fx.GraphModule
    #: The model's output as its forward returns it, from what the last stage's graph returns
    #: (torch.export's codegen unflattens a flat tuple by its out_spec; fx's keeps it as it is).
    model_output: Callable[[Any], Any] = field(default=lambda out: out)


def _stage_of_nodes(gm: fx.GraphModule, pipeline: Pipeline) -> dict[str, int]:
    given = pipeline.stage_of()
    last = pipeline.num_stages - 1
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out[n.name] = last
        elif n.name in given:
            out[n.name] = given[n.name]
        elif n.op == "get_attr":  # a parameter read: it lives with its first reader
            out[n.name] = min((given.get(u.name, last) for u in n.users), default=last)
        else:
            raise PipelineError(f"node {n.name!r} of the model is in no stage of the pipeline")
    return out


def whole_pipeline(gm: fx.GraphModule, pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with every node of ``gm`` in a stage, as the simulator (and its memory
    check) wants it: a model input with its first reader (the schedules hand inputs to every
    stage), a parameter read with its first reader, the output with the last stage."""
    st = _stage_of_nodes(gm, pipeline)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            st[n.name] = min((st[u.name] for u in n.users), default=0)
    stages: list[list[str]] = [[] for _ in range(pipeline.num_stages)]
    for n in gm.graph.nodes:
        stages[st[n.name]].append(n.name)
    return Pipeline(tuple(tuple(s) for s in stages), pipeline.devices, pipeline.microbatches, pipeline.schedule)


def split_stages(gm: fx.GraphModule, pipeline: Pipeline) -> list[StageSpec]:
    """Cut ``gm`` into the pipeline's stages (module doc).

    Raises:
        PipelineError: a node in no stage, or a node reading a value of a later stage.
    """
    nodes = list(gm.graph.nodes)
    st = _stage_of_nodes(gm, pipeline)
    pos = {n.name: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op == "placeholder":
            continue
        for a in n.all_input_nodes:
            if a.op != "placeholder" and st[a.name] > st[n.name]:
                raise PipelineError(f"node {n.name!r} (stage {st[n.name]}) reads {a.name!r} of stage {st[a.name]}; "
                                    "expected stages contiguous in a topological order")
    _check_state_updates(gm, st)
    _check_received_updates(gm, st)
    last_use = {n.name: max((st[u.name] for u in n.users), default=st[n.name])
                for n in nodes if n.op not in ("placeholder", "output")}

    def boundary(s: int) -> list[str]:
        return sorted((v for v, last in last_use.items() if st[v] < s <= last), key=pos.__getitem__)

    specs = []
    for s in range(pipeline.num_stages):
        recv = boundary(s)
        send = boundary(s + 1) if s < pipeline.num_stages - 1 else []
        g = fx.Graph()
        env: dict[str, fx.Node] = {v: g.placeholder(v) for v in recv}
        used = [n.name for n in nodes if n.op == "placeholder" and any(st[u.name] == s for u in n.users)]
        for v in used:
            env[v] = g.placeholder(v)
        members = [n for n in nodes if n.op != "placeholder" and st[n.name] == s]
        for n in members:
            if n.op == "output":
                g.output(fx.node.map_arg(n.args[0], lambda a: env[a.name]))
            else:
                env[n.name] = g.node_copy(n, lambda a: env[a.name])
        if s < pipeline.num_stages - 1:
            g.output(tuple(env[v] for v in send))
        specs.append(StageSpec(s, [n.name for n in members], recv, send, used,
                               fx.GraphModule(gm, g, class_name=f"Stage{s}"), gm.graph._codegen.process_outputs))
    return specs


def _check_state_updates(gm: fx.GraphModule, st: Mapping[str, int]) -> None:
    """Refuse a cut that separates an in-place update of a parameter or buffer from the stage
    holding it, or from any other read of the same attribute: each stage process holds its own
    copy of the model's state, so an update made in another stage lands on a copy (a running
    mean that stays at 0, with no error), and a read in another stage than the update's sees a
    copy the update never reaches (stale from the second step on). The rule is keyed by
    attribute, not by ``get_attr`` node: two ``get_attr`` nodes of one buffer read one tensor.

    Raises:
        PipelineError: naming the node, the attribute and the two stages.
    """
    readers: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(str(n.target), []).append(n)
    for n, held in in_place_writes(gm):
        if held.op != "get_attr":
            continue
        if st[held.name] != st[n.name]:
            raise PipelineError(
                f"node {n.name!r} (stage {st[n.name]}) updates {held.target!r} in place, but stage "
                f"{st[held.name]} holds it: the update would land on a copy; expected the attribute and its "
                "in-place update in one stage")
        for other in readers[str(held.target)]:
            if st[other.name] != st[n.name]:
                raise PipelineError(
                    f"node {other.name!r} (stage {st[other.name]}) reads {held.target!r}, which node {n.name!r} "
                    f"(stage {st[n.name]}) updates in place: stage {st[other.name]} would read its own copy, which "
                    "the update never reaches; expected every read of the attribute in the stage that updates it")


def _check_received_updates(gm: fx.GraphModule, st: Mapping[str, int]) -> None:
    """Refuse an in-place update of a value that an earlier stage made (``h.mul_(2)`` in stage 1
    on ``h`` of stage 0): the stage receives it as a fresh autograd leaf, and PyTorch refuses an
    in-place update of a leaf that requires grad (the job failed only once every rank had
    started: '[Stage 1] failed to run forward').

    Raises:
        PipelineError: naming the update, the value and the two stages.
    """
    for n, held in in_place_writes(gm):
        if held.op in ("get_attr", "placeholder") or st[held.name] >= st[n.name]:
            continue
        meta = held.meta.get("tensor_meta", held.meta.get("val"))
        if getattr(meta, "requires_grad", True):
            raise PipelineError(
                f"node {n.name!r} (stage {st[n.name]}) updates {held.name!r} of stage {st[held.name]} in place: the "
                "stage receives it as an autograd leaf, which cannot be updated in place; expected the value and "
                "its in-place updates in one stage")


#: Types of boundary values that are not sent but rebuilt as constants in the reading stage
#: (``x.shape[0]`` and the like: ``PipelineStage`` sends tensors only).
CONSTANT_TYPES = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)


def _is_constant(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return isinstance(value, CONSTANT_TYPES)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return repr(value)


class StageModule(nn.Module):
    """``forward(*received, **model_inputs)``: the stage's graph; the last stage returns the
    micro-batch's loss over ``microbatches`` (module doc).

    ``planned`` holds every boundary value of micro-batch 0 (:func:`boundary_metas`): tensors
    as meta tensors, constants (``x.shape[0]``) as their values. Constants are neither received
    nor sent; they are put back in place here. Each tensor the stage sends is checked against
    its planned shape first: a data-dependent shape would otherwise reach gloo, which aborts
    the receiving process on a larger message and silently accepts a smaller one.
    """

    def __init__(self, spec: StageSpec, last: bool, microbatches: int,
                 input_names: Sequence[str], loss_fn: Callable[..., torch.Tensor] | None = None,
                 planned: Mapping[str, Any] | None = None, input_keys: Mapping[str, str] | None = None,
                 inputs_spec: TreeSpec | None = None, cut_here: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        #: Inputs the schedule hands whole to every micro-batch although they hold the batch
        #: (sparse ones: :func:`chunk_specs`), name -> (batch, batch dim): cut here instead.
        self.cut_here = dict(cut_here or {})
        #: How the model's inputs nest (:func:`graphs.graph_inputs.input_spec`): its loss takes them so.
        self.inputs_spec = inputs_spec
        #: The keyword each model input arrives under (its name, unless the caller renamed them:
        #: :func:`schedule_keys`).
        self.input_keys = dict(input_keys) if input_keys is not None else {n: n for n in input_names}
        self.gm = spec.gm
        self.spec = spec
        self.last = last
        self.microbatches = microbatches
        self.input_names = list(input_names)
        self.loss_fn = loss_fn
        self.planned = dict(planned or {})
        self.constants = {k: v for k, v in self.planned.items() if not isinstance(v, torch.Tensor)}
        self._calls = 0

    @property
    def recv_tensors(self) -> list[str]:
        """The received values that travel (tensors), in the order ``forward`` takes them."""
        return [v for v in self.spec.recv if v not in self.constants]

    @property
    def send_tensors(self) -> list[str]:
        """The sent values that travel (tensors), in the order ``forward`` returns them."""
        return [v for v in self.spec.send if v not in self.constants]

    def forward(self, *received: torch.Tensor, **keyed: torch.Tensor) -> Any:
        inputs = {name: keyed[key] for name, key in self.input_keys.items() if key in keyed}
        microbatch = self._calls % self.microbatches  # every schedule runs a stage's forwards in order
        self._calls += 1
        if self.microbatches > 1:
            for name, (batch, dim) in self.cut_here.items():
                size = batch // self.microbatches
                inputs[name] = batch_slice(inputs[name], batch, microbatch * size, (microbatch + 1) * size, dim)
        tensors = iter(received)
        values = [self.constants[v] if v in self.constants else next(tensors) for v in self.spec.recv]
        out = self.gm(*values, *[inputs[n] for n in self.spec.inputs_used])
        if not self.last:
            sent = []
            for name, value in zip(self.spec.send, out):
                if name in self.constants:
                    continue
                plan = self.planned.get(name)
                if plan is not None and (not isinstance(value, torch.Tensor) or value.shape != plan.shape):
                    raise PipelineError(
                        f"stage {self.spec.index} output {name!r} has {_describe(value)} on micro-batch "
                        f"{microbatch}, planned {_describe(plan)} from micro-batch 0; a pipeline needs the same "
                        "shapes on every micro-batch (this value's shape depends on the data)")
                # gloo sends need contiguous tensors (a boundary after a transpose is a view)
                sent.append(value.contiguous())
            return tuple(sent)
        out = self.spec.model_output(out)
        args = model_args(self.inputs_spec, [inputs[n] for n in self.input_names])
        loss = loss_of_a_cut_output(self.loss_fn, out, args) if self.loss_fn is not None else out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise PipelineError("the last stage must produce a scalar loss (the model's output, or loss_fn's)")
        return loss / self.microbatches


def schedule_keys(input_names: Sequence[str]) -> dict[str, str]:
    """The keyword each model input is handed to a ``torch.distributed.pipelining`` schedule
    under: its position, not its name, since ``schedule.step(*args, target=None, losses=None,
    return_outputs=True, **kwargs)`` keeps those keywords for itself (a model input named
    ``target`` was taken as the schedule's loss target and never reached the stages).

    >>> schedule_keys(["x", "target"])
    {'x': 'input_0', 'target': 'input_1'}
    """
    return {name: f"input_{i}" for i, name in enumerate(input_names)}


def boundary_metas(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], names: set[str]) -> dict[str, Any]:
    """The named values on one micro-batch, from one forward of ``gm`` that leaves no trace:
    every buffer is restored after it, non-persistent ones included (the captured module shares
    its buffers with the user's model, so a counter the forward advances would start the
    training one probe ahead), and so is the random state (a dropout draw here would shift
    every later one). Tensors as meta tensors (shape, dtype, requires_grad), constants (ints,
    sizes, ...) as themselves.

    Raises:
        PipelineError: a named value that is neither (a tuple holding tensors, say).
    """
    out: dict[str, Any] = {}
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] = {}
    refused: list[PipelineError] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in names:
                if isinstance(value, torch.Tensor):
                    # contiguous, as StageModule sends it: a meta with the view's strides makes
                    # PipelineStage receive into a strided buffer, which gloo refuses
                    # (made after the run: a vmap's output is produced before torch.export's
                    # _vmap_decrement_nesting, where requires_grad_ is refused)
                    out[n.name] = None
                    tensors[n.name] = (tuple(value.shape), value.dtype, value.requires_grad)
                elif _is_constant(value):
                    out[n.name] = value
                elif not refused:
                    # Raised after the run: fx's interpreter would append the node and its
                    # traceback to the message.
                    refused.append(PipelineError(f"value {n.name!r} crosses a stage boundary but is a "
                                                 f"{type(value).__name__}, not a tensor or a constant; cut elsewhere"))
            return value

    order = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    # Autograd on (requires_grad is part of a meta), but nothing saved for a backward that never
    # comes: saving, this probe of the whole model on a micro-batch held every stage's
    # activations on every rank before the first step (gpt2 at M=1: 140 MiB, above the step's peak).
    # A forward that differentiates (torch.autograd.grad, a physics-informed loss) runs a
    # backward inside it, which reads what its ops saved ("Output of saved tensor unpack_hook
    # expected to be a Tensor but got result of type NoneType"): such a probe saves as usual.
    # A leaf module may differentiate inside (MAML's inner loop kept whole): the graph shows no
    # torch.autograd.grad there, so the probe runs again saving as usual when a backward inside
    # a node found nothing saved.
    for nothing_saved in ([False] if differentiated_regions(gm) else [True, False]):
        out.clear()
        tensors.clear()
        refused.clear()
        saved = (torch.autograd.graph.saved_tensors_hooks(lambda _t: None, lambda _p: None) if nothing_saved
                 else contextlib.nullcontext())
        try:
            with preserved_buffers(gm), kept_random_state(), torch.enable_grad(), saved, _functorch_level_kept():
                Recorder(gm).run(*[inputs[k] for k in order])
            break
        except TypeError as exc:  # autograd's words for a hook that saved nothing, read by a backward
            if not nothing_saved or "unpack_hook" not in str(exc):
                raise
    if refused:
        raise refused[0]
    for name, (shape, dtype, requires_grad) in tensors.items():
        out[name] = torch.empty(shape, dtype=dtype, device="meta").requires_grad_(requires_grad)
    return out


@contextlib.contextmanager
def _functorch_level_kept() -> Iterator[None]:
    """Leave functorch's interpreter stack as it was: a graph that raised between torch.export's
    ``_vmap_increment_nesting`` and ``_vmap_decrement_nesting`` left a vmap level open, and every
    later backward in this process failed ("backward() called inside a functorch transform")."""
    entered = torch._C._functorch.maybe_current_level()
    try:
        yield
    finally:
        while (level := torch._C._functorch.maybe_current_level()) is not None and (entered is None or level > entered):
            torch._C._functorch._vmap_decrement_nesting()


def microbatch(inputs: Mapping[str, torch.Tensor], index: int, microbatches: int,
               batch_dim: int = 0) -> dict[str, torch.Tensor]:
    """Micro-batch ``index`` of the model inputs (equal slices of the batch dimension
    ``batch_dim``, as the schedules split them: :func:`chunk_specs`)."""
    batch = batch_size_of(dict(inputs), batch_dim) or 0
    size = batch // microbatches
    return {k: batch_slice(v, batch, index * size, (index + 1) * size, batch_dim) for k, v in inputs.items()}


def chunk_specs(inputs: Mapping[str, Any], batch_dim: int = 0) -> dict[str, Any]:
    """How a ``torch.distributed.pipelining`` schedule is to cut each input into micro-batches:
    along the dimension that holds the batch (:func:`graphs.input_batch.batch_axis`), whole to every
    micro-batch otherwise, so that the schedule cuts what :func:`microbatch` cuts (its default
    cuts every tensor along dim 0)."""
    from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate
    from torch.utils._pytree import tree_map

    batch = batch_size_of(dict(inputs), batch_dim) or 0

    def spec(x: Any) -> Any:
        axis = batch_axis(x, batch, batch_dim)
        # A sparse tensor goes whole: the schedule's cut (tensor_split) has no sparse kernel; the
        # stage cuts it (sparse_batch_inputs, StageModule's cut_here).
        return _Replicate if axis is None or x.layout != torch.strided else TensorChunkSpec(axis)

    # Leaf by leaf: the schedule flattens each input (a dict of tensors is several leaves).
    return {k: tree_map(spec, v) for k, v in inputs.items()}


def sparse_batch_inputs(inputs: Mapping[str, Any], batch_dim: int = 0) -> dict[str, tuple[int, int]]:
    """The inputs that hold the batch in a sparse tensor (a bag of features per sample), name ->
    (batch, batch dim): ``torch.distributed.pipelining`` cannot cut them into micro-batches
    (``torch.tensor_split`` has no sparse kernel: the rank crashed with "Could not run
    'aten::as_strided' with arguments from the 'SparseCPU' backend"), so the schedule hands them
    whole and :class:`StageModule` takes its micro-batch's rows (:func:`graphs.input_batch.batch_slice`).

    >>> sparse_batch_inputs({"bow": torch.eye(4).to_sparse(), "y": torch.zeros(4)})
    {'bow': (4, 0)}
    """
    from torch.utils._pytree import tree_leaves

    batch = batch_size_of(dict(inputs), batch_dim) or 0
    return {name: (batch, batch_dim) for name, value in inputs.items()
            if any(isinstance(x, torch.Tensor) and x.layout != torch.strided and batch_axis(x, batch, batch_dim) is not None
                   for x in tree_leaves(value))}


def check_static_shapes(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], pipeline: Pipeline,
                        batch_dim: int = 0) -> dict[str, Any]:
    """Run every micro-batch through ``gm`` and compare each boundary value with micro-batch 0's:
    ``PipelineStage`` preallocates its receive buffers from one set of shapes, so a value whose
    shape (or constant) depends on the data cannot cross a stage boundary. Returns micro-batch
    0's boundary values (:func:`boundary_metas`).

    Raises:
        PipelineError: the first value that differs, naming the stage that sends it and both values.
    """
    specs = split_stages(gm, pipeline)
    sender = {v: spec.index for spec in specs for v in spec.send if v not in {w for w in spec.recv}}
    names = {v for spec in specs for v in spec.recv + spec.send}
    first = boundary_metas(gm, microbatch(inputs, 0, pipeline.microbatches, batch_dim), names)
    for k in range(1, pipeline.microbatches):
        other = boundary_metas(gm, microbatch(inputs, k, pipeline.microbatches, batch_dim), names)
        for name, value in first.items():
            a, b = value, other[name]
            same = (a.shape == b.shape and a.dtype == b.dtype) if isinstance(a, torch.Tensor) and isinstance(
                b, torch.Tensor) else (type(a) is type(b) and a == b)
            if not same:
                raise PipelineError(
                    f"stage {sender.get(name, 0)} output {name!r} has {_describe(b)} on micro-batch {k} but "
                    f"{_describe(a)} on micro-batch 0; a pipeline needs the same shapes on every micro-batch "
                    "(this value depends on the data): cut elsewhere, or pad the data to fixed shapes")
    return first
