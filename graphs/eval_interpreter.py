"""The eval graph run where its data is: the interpreter of a placed model's second graph.

Where ``if self.training:`` took another branch, the placed model keeps the model traced in
eval mode as a second graph, which no placement placed. :class:`DataFollowingInterpreter`
runs it over the placed state, each op where its module's parameters, the tensor it updates
or the placed training op of its name are, else where its latest input is
(:func:`_data_device`); :func:`eval_only_state` says where ``apply`` puts the state only
that graph reads, by the same rules; :func:`refuse_other_shapes` refuses inputs of other
shapes than a graph holding the example's. It stands apart from :mod:`graphs.eval_mode`,
which decides which eval forward a module gets and keeps it through copies and pickles: this
module runs one graph op by op and knows nothing of copies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import nn
from torch.utils import _pytree as pytree

from graphs.errors import CaptureError
from graphs.module_attributes import _resolve
from graphs.ops import argument, mutated_args


def _interpreting(graph: fx.Graph) -> Callable[..., Any]:
    """A forward that runs ``graph`` over its module's state (:class:`DataFollowingInterpreter`),
    called as the training forward fx generates is: the same arguments, by position or by
    name, with the same defaults (:func:`_signature`)."""
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    in_spec = info.in_spec if info is not None else None
    signature = _signature(graph)

    def eval_forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values: list[Any] = []
        for p in signature.parameters.values():
            value = bound.arguments[p.name]
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                values.extend(value)
            else:
                values.append(value)
        if in_spec is None:  # fx's graph, or torch.export's after a pickle (fx re-traces its code, leaves and all)
            refuse_other_shapes(values, self.__dict__.get("placer_eval_input_shapes"))
            return DataFollowingInterpreter(self, graph=graph).run(*values)
        # torch.export's graphs take the inputs' leaves, flattened as its generated forward does.
        if _has_args_and_kwargs(in_spec):
            count = in_spec.child(0).num_children
            inputs: Any = (values[:count], dict(zip(in_spec.child(1).context, values[count:])))
        else:
            inputs = values
        leaves = fx_pytree.tree_flatten_spec(inputs, in_spec)
        refuse_other_shapes(leaves, self.__dict__.get("placer_eval_input_shapes"))
        out = DataFollowingInterpreter(self, graph=graph).run(*leaves, enable_io_processing=False)
        return codegen.process_outputs(out)

    return eval_forward


#: Why an eval graph holds the example's shapes (:func:`refuse_other_shapes`'s default).
EVAL_GRAPH_SHAPES = (
    "torch.fx cannot trace forward() in eval mode, so the placed model evaluates the graph torch.export captured in "
    "eval mode, which holds the example's shapes. Evaluate with inputs of those shapes, or with your original "
    "model, loading the trained weights back with model.load_state_dict(placed.state_dict())")


def refuse_other_shapes(leaves: Sequence[Any], shapes: Sequence[tuple[int, ...] | None] | None,
                        why: str = EVAL_GRAPH_SHAPES) -> None:
    """Raise where an input of a graph that holds the example's shapes (``shapes``: the
    example's, per flattened input; None where any shape runs) has another shape: another batch
    size could run the example's sizes with no error (``torch.ones(3, 1)`` broadcast over one
    row). ``why`` says which graph holds them and what to do."""
    for i, (leaf, shape) in enumerate(zip(leaves, shapes or ())):
        if shape is not None and isinstance(leaf, torch.Tensor) and tuple(leaf.shape) != shape:
            raise CaptureError(f"input {i} has shape {tuple(leaf.shape)} where the example had {shape}: {why}")


def _signature(graph: fx.Graph) -> inspect.Signature:
    """The signature of the forward fx generates for ``graph``: its placeholders (their
    defaults; ``*args``), or torch.export's original argument names."""
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                  for name in info.orig_args])
    parameters = []
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        name = str(n.target)
        if name.startswith("*"):
            parameters.append(inspect.Parameter(name.lstrip("*"), inspect.Parameter.VAR_POSITIONAL))
        else:
            default = n.args[0] if n.args else inspect.Parameter.empty
            parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    return inspect.Signature(parameters)


def _has_args_and_kwargs(in_spec: pytree.TreeSpec) -> bool:
    """Whether torch.export's ``in_spec`` is ``(args, kwargs)`` (fx's ``_PyTreeCodeGen`` asks the same)."""
    return (in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(0).type is tuple
            and in_spec.child(1).type is dict)


class DataFollowingInterpreter(fx.Interpreter):
    """Runs a graph of ``module`` (its eval graph) over the module's placed state.

    Each op runs on the device of its module's parameters (a ``call_module``), of the tensor
    it updates (an in-place op: :func:`graphs.ops.mutated_args`, aten's ``add_.Tensor`` and
    ``x[i] = y`` included), where the placement put the training graph's op of the same
    name, op and target (``placer_placement``: most of an eval graph is the training graph's),
    or else where its latest-made input is (a residual add follows the block it closes, not
    the stream it adds to); other tensor inputs are copied there, and the output goes to the
    placed model's output device. Only the copies' cost depends on the choice, never the
    values. It costs a Python step per op, which eval passes can afford.
    """

    def __init__(self, module: fx.GraphModule, graph: fx.Graph) -> None:
        super().__init__(module, graph=graph)
        self.placed_module = module

    # Read only where an op's inputs are on several devices: a forward on one device builds none.
    @functools.cached_property
    def order(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.graph.nodes)}

    @functools.cached_property
    def placed(self) -> dict[str, tuple[Any, torch.device]]:
        return _placed_devices(self.placed_module)

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tensors: list[torch.Tensor] = []
            fx.node.map_aggregate((args, kwargs), lambda v: tensors.append(v) if isinstance(v, torch.Tensor) else None)
            device = self._device_for(n, tensors)
            if device is not None and any(t.device != device for t in tensors):
                args, kwargs = fx.node.map_aggregate((args, kwargs), lambda v: _moved(v, device))
            return getattr(self, n.op)(n.target, args, kwargs)

    def _device_for(self, n: fx.Node, tensors: list[torch.Tensor]) -> torch.device | None:
        if n.op == "call_module":
            state = _state_tensors(self.fetch_attr(str(n.target)))
            if state:
                return state[0].device
        if len({t.device for t in tensors}) <= 1:
            return None  # nothing to move
        return _data_device(n, self.module, self._device_of, self.placed, self.order) or tensors[0].device

    def _device_of(self, n: fx.Node) -> torch.device | None:
        value = self.env.get(n)
        return value.device if isinstance(value, torch.Tensor) else None

    def output(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().output(target, args, kwargs)
        placed = getattr(self.module, "placer_output_device", None)
        real = (getattr(self.module, "placer_real_devices", None) or {}).get(placed)
        return _moved(out, torch.device(real)) if real is not None else out


def _placed_devices(gm: fx.GraphModule) -> dict[str, tuple[Any, torch.device]]:
    """``{training node name: ((op, target), its real device)}`` from ``placer_placement``."""
    placement: dict[str, str] = getattr(gm, "placer_placement", None) or {}
    real: dict[str, str] = getattr(gm, "placer_real_devices", None) or {}
    return {n.name: ((n.op, n.target), torch.device(real.get(placement[n.name], placement[n.name])))
            for n in gm.graph.nodes if n.name in placement}


def _state_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors a ``get_attr`` or ``call_module`` target holds: a module's parameters, then its buffers."""
    if isinstance(value, nn.Module):
        return [*value.parameters(), *value.buffers()]
    return [value] if isinstance(value, torch.Tensor) else []


def _data_device(n: fx.Node, root: nn.Module, device_of: Callable[[fx.Node], torch.device | None],
                 placed: dict[str, tuple[Any, torch.device]], order: dict[fx.Node, int]) -> torch.device | None:
    """Where :class:`DataFollowingInterpreter` runs ``n``, an op whose tensor inputs are on several
    devices (``device_of`` says where an input node's tensor is, None for no tensor): with the tensor
    it updates, else with the placed training op of its name, op and target, else with its
    latest-made input; None where no rule applies (the interpreter then takes its first tensor's)."""
    for key in mutated_args(n, root):
        written = argument(n, key)
        if isinstance(written, fx.Node) and (device := device_of(written)) is not None:
            return device  # on a copy elsewhere the update would be lost (aten.add_.Tensor, x[i] = y)
    twin = placed.get(n.name)
    if twin is not None and twin[0] == (n.op, n.target):
        return twin[1]
    made = [m for m in n.all_input_nodes if m.op != "get_attr" and device_of(m) is not None]
    return device_of(max(made, key=order.__getitem__)) if made else None


def eval_only_state(gm: fx.GraphModule) -> dict[str, torch.device]:
    """``{target: device}`` for the state that only ``gm``'s eval graph reads (``placer_eval_graph``:
    a head only eval mode calls), each where its data is.

    No training op placed such state, so it stayed where the user's model was, and the
    interpreter ran its module there, copying the activations to it and back on every eval
    forward (a GPU placement evaluated its head on the CPU). ``apply`` moves it once, to the
    device the interpreter's other rules run its first op on (:func:`_data_device`), given
    where the placed training state and the placed ops are. Where nothing placed feeds it (it
    reads the inputs only), no device is known: it stays. A module part of whose state the
    training graph reads is placed already: it runs there. A torch.export graph reads every
    parameter (unused ones too), so its placement places them all: nothing is left here.
    """
    graph: fx.Graph | None = gm.__dict__.get("placer_eval_graph")
    if graph is None:
        return {}
    where = {id(t): t.device for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
             for t in _state_tensors(_resolve(gm, str(n.target)))}
    placed, order = _placed_devices(gm), {n: i for i, n in enumerate(graph.nodes)}
    device: dict[fx.Node, torch.device | None] = {}
    chosen: dict[str, torch.device] = {}

    def state_device(target: str) -> torch.device | None:
        return next((where[id(t)] for t in _state_tensors(_resolve(gm, target)) if id(t) in where), None)

    for n in graph.nodes:
        if n.op in ("placeholder", "output"):
            continue  # the caller's inputs: on a device only the call knows
        if n.op == "get_attr" or (n.op == "call_module" and state_device(str(n.target)) is not None):
            device[n] = state_device(str(n.target))  # None: only the eval graph reads it, its user decides
            continue
        inputs = [d for m in n.all_input_nodes if (d := device.get(m)) is not None]
        here = (_data_device(n, gm, device.get, placed, order) if len(set(inputs)) > 1 else None) or next(
            iter(inputs), None)
        device[n] = here
        if here is None:
            continue
        unplaced = [n] if n.op == "call_module" else [m for m in n.all_input_nodes
                                                      if m.op == "get_attr" and device[m] is None]
        for m in unplaced:
            tensors = _state_tensors(_resolve(gm, str(m.target)))
            if tensors and all(id(t) not in where for t in tensors):
                chosen[str(m.target)] = device[m] = here
                where.update((id(t), here) for t in tensors)
    return chosen


def _moved(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t, value)
