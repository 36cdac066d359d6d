"""The placed graph follows ``.eval()`` as the original model does.

A graph is captured in training mode; ``placed.eval()`` must then compute what the model
computes in eval mode, or say it cannot. Three cases, decided at capture:

* **The same ops with other constants** (:data:`graphs.eval_arguments.EvalArguments`): torch.export bakes
  ``training=True`` into ``aten.batch_norm`` and the dropouts (:func:`graphs.eval_arguments.export_eval_arguments`);
  fx runs ``F.dropout(h, p, self.training)`` while tracing (:func:`graphs.eval_arguments.fx_eval_arguments`, from
  a trace in eval mode). The eval forward is the graph with the eval mode's constants.
* **Another graph**: ``if self.training:`` took another branch (stochastic depth, an
  auxiliary head). The model traced (fx) or exported (torch.export, :func:`graphs.eval_arguments.export_eval_plan`;
  also for an fx model fx cannot trace in eval mode, then for the example's input shapes only)
  in eval mode is kept as a second graph (:func:`follow_eval_graph`) and run by an
  interpreter where its data is (:class:`DataFollowingInterpreter`): the placed model's
  parameters stay where the placement put them, and each eval op runs where its module's
  parameters, the tensor it updates, or the placed training op of its name are, else where
  its latest input is. State only the eval graph reads, which no placement places, goes
  where its data is at apply time (:func:`eval_only_state`).
* **Neither** (a value that changes from one trace to the next, an eval graph reading state
  the model does not have): eval mode is refused with the reason (:func:`refuse_eval_mode`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import nn
from torch.utils import _pytree as pytree

from graphs.errors import CaptureError
from graphs.eval_arguments import EvalArguments
from graphs.module_attributes import _resolve, ensure_module, keep_plain_attributes
from graphs.ops import argument, mutated_args


def _refuse_other_modes(gm: fx.GraphModule, modes: dict[str, bool]) -> None:
    """Raise where a module of ``modes`` (:func:`graphs.eval_arguments.export_module_modes`, and the modules whose
    ``training`` forward() read while traced: :func:`graphs.capture.modes_on`) is not in the mode
    the graph computes for it: the captured one in training mode, eval mode in eval mode."""
    for path, flag in modes.items():
        want = flag and gm.training
        module: nn.Module = gm
        for part in path.split("."):  # not get_submodule: 8 us a module, on every step
            module = module._modules[part]  # type: ignore[assignment]
        if module.training != want:
            raise CaptureError(
                f"module {path!r} is in {'training' if module.training else 'eval'} mode while the placed model "
                f"computes it in {'training' if want else 'eval'} mode: the capture baked the module's mode into "
                "the graph (torch.export into its ops, and either tracer where forward() reads self.training), and "
                "the placed graph follows .train()/.eval() of the whole model only. Set the mode on the whole "
                "placed model, or set it on the module of your model before capturing it (a BatchNorm frozen there "
                "stays frozen)")

def follow_eval_mode(gm: fx.GraphModule, eval_arguments: EvalArguments | None = None) -> bool:
    """Make ``gm`` (traced in training mode) compute the eval mode's ops when ``gm.training``
    is False; returns whether any op differs between the modes.

    Where ``gm`` carries a refusal (``placer_eval_refusal``, :func:`refuse_eval_mode`), the eval
    forward raises it; where it carries an eval graph (``placer_eval_graph``,
    :func:`follow_eval_graph`), the eval forward runs it (:class:`DataFollowingInterpreter`).
    Otherwise it is the same graph with ``eval_arguments`` (default: what ``gm`` carries as
    ``placer_eval_arguments``, recorded at capture: :func:`graphs.eval_arguments.export_eval_arguments`,
    :func:`graphs.eval_arguments.fx_eval_arguments`) put in place of the training mode's constants: ``aten.batch_norm`` then normalises by the running statistics
    and leaves them alone, dropout is the identity, as ``nn.BatchNorm`` and ``nn.Dropout`` do
    in eval mode. Forward runs one or the other by ``self.training``, as the original model
    does. Nodes are found by name, so it applies to the placed graph too (``apply`` keeps the
    captured nodes' names). It lives on the module's own class (fx gives each GraphModule
    one), so the module still pickles as its graph; a ``recompile()``, a copy and a deep copy
    (an EMA copy of the model) install it again on what they rebuild. Where ``gm`` carries
    ``placer_module_modes`` (:func:`graphs.eval_arguments.export_module_modes`), every forward first checks them.
    """
    from torch.fx.graph_module import _forward_from_src

    refusal: str | None = gm.__dict__.get("placer_eval_refusal")
    eval_graph: fx.Graph | None = gm.__dict__.get("placer_eval_graph")
    eval_forward: Callable[..., Any]
    if refusal is not None:
        eval_forward = _refusing(refusal)
    elif eval_graph is not None:
        eval_forward = _interpreting(eval_graph)
    else:
        if eval_arguments is None:
            eval_arguments = getattr(gm, "placer_eval_arguments", None) or {}
        gm.placer_eval_arguments = eval_arguments  # type: ignore[assignment]
        if (not any(n.name in eval_arguments for n in gm.graph.nodes) and not gm.__dict__.get("placer_module_modes")
                and not _placer_hooks(gm) and not _reads_plain_tensors(gm)):
            return False
        # A copy of the graph, edited: editing gm's own nodes, even and back, would reorder the
        # users of their inputs (Node.args' setter re-adds them last).
        graph = fx.Graph(owning_module=gm)
        graph._codegen = copy.deepcopy(gm.graph._codegen)  # torch.export's pytree in/out
        values: dict[fx.Node, fx.Node] = {}
        output = graph.graph_copy(gm.graph, values)
        graph.output(output)
        for n in graph.nodes:
            if n.name in eval_arguments:
                args, kwargs = list(n.args), dict(n.kwargs)
                for key, value in eval_arguments[n.name].items():
                    if isinstance(key, int):
                        args[key] = value
                    else:
                        kwargs[key] = value
                n.args, n.kwargs = tuple(args), kwargs
        code = graph.python_code(root_module="self")
        eval_forward = _forward_from_src(code.src, code.globals)
    cls = type(gm)
    train_forward = getattr(cls.forward, "placer_train_forward", cls.forward)  # installed twice: one layer

    def forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        modes = self.__dict__.get("placer_module_modes")
        if modes:
            _refuse_other_modes(self, modes)
        return (train_forward if self.training else eval_forward)(self, *args, **kwargs)

    def recompile(self: fx.GraphModule) -> Any:
        code = fx.GraphModule.recompile(self)
        follow_eval_mode(self)
        return code

    def following(make_twin: Callable[..., fx.GraphModule]) -> Callable[..., fx.GraphModule]:
        """``copy.copy`` / ``copy.deepcopy`` (an EMA copy): fx builds a new GraphModule, given the eval forward too."""

        def twin_of(self: fx.GraphModule, *memo: Any) -> fx.GraphModule:
            twin = make_twin(self, *memo)
            keep_plain_attributes(twin, _buffer_names(self))
            _register_hooks(twin, _placer_hooks(self))
            # What placer put on the module (a refusal, the placement the eval graph follows, its
            # output device): fx's rebuild keeps only the graph's attributes.
            for key, value in self.__dict__.items():
                if key.startswith("placer_") and key != "placer_eval_graph" and key not in twin.__dict__:
                    twin.__dict__[key] = copy.deepcopy(value, memo[0]) if memo else value
            held = self.__dict__.get("placer_eval_graph")
            if held is not None:
                # fx's rebuild keeps only what the training graph reads: the eval graph, and
                # what it alone reads, come along here (deep-copied with the same memo).
                twin.placer_eval_graph = copy.deepcopy(held, memo[0]) if memo else held
                _carry_attributes(self, twin, held, memo[0] if memo else None)
            follow_eval_mode(twin, getattr(self, "placer_eval_arguments", None))
            return twin

        return twin_of

    def reduce(self: fx.GraphModule) -> Any:  # pickle, torch.save: fx re-traces the code on load
        if _rebuild_needs_arguments(self):
            return _by_nodes(self)
        rebuild, (body, *rest) = fx.GraphModule.__reduce__(self)
        body = dict(body)
        held = body.pop("placer_eval_graph", None)
        # fx pickles a GraphModule as its code: the eval graph travels as one, over the same
        # modules (one pickle, so they stay shared).
        carrier = fx.GraphModule(self, held) if held is not None else None
        return (_rebuilt_following_eval, (rebuild, (body, *rest), carrier, _buffer_names(self), _placer_hooks(self)))

    forward.placer_train_forward = train_forward  # type: ignore[attr-defined]
    cls.__reduce__ = reduce  # type: ignore[method-assign]
    cls.__copy__ = following(fx.GraphModule.__copy__)  # type: ignore[method-assign]
    cls.__deepcopy__ = following(fx.GraphModule.__deepcopy__)  # type: ignore[method-assign]
    cls.forward = forward
    cls.recompile = recompile  # type: ignore[method-assign]
    return True


def _reads_plain_tensors(gm: fx.GraphModule) -> bool:
    """Whether a ``get_attr`` of ``gm`` reads a tensor that is not one of its buffers or parameters
    (fx's constant of ``torch.tensor([...])`` in forward): fx's own copies and pickles register it
    as a buffer (:func:`graphs.module_attributes.keep_plain_attributes`), so those of ``gm`` need
    :func:`follow_eval_mode`'s, which keep it plain (a deep copy of a placed model had
    ``_tensor_constant0`` in its ``state_dict()``, which the original refused to load)."""
    state = {n for n, _ in itertools.chain(gm.named_buffers(remove_duplicate=False),
                                            gm.named_parameters(remove_duplicate=False))}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and str(n.target) not in state:
            with contextlib.suppress(AttributeError):
                if isinstance(_resolve(gm, str(n.target)), torch.Tensor):
                    return True
    return False


def _rebuilt_following_eval(rebuild: Any, args: tuple, carrier: fx.GraphModule | None = None,
                            buffers: list[str] | None = None,
                            hooks: Sequence[tuple[Callable[..., Any], bool]] = ()) -> fx.GraphModule:
    """Unpickling a module :func:`follow_eval_mode` made: fx's rebuild, its constants plain
    attributes again (``buffers``: the module's own), placer's own forward pre-hooks again
    (``hooks``), then the eval forward again."""
    return _following_again(rebuild(*args), carrier, buffers, hooks)


def _following_again(gm: fx.GraphModule, carrier: fx.GraphModule | None, buffers: list[str] | None,
                     hooks: Sequence[tuple[Callable[..., Any], bool]]) -> fx.GraphModule:
    """What an unpickled ``gm`` gets back, however it was rebuilt: its constants plain attributes
    (``buffers``: the module's own), placer's hooks, the eval graph ``carrier`` holds and what it
    alone reads, then the eval forward."""
    if buffers is not None:
        keep_plain_attributes(gm, buffers)
    _register_hooks(gm, hooks)
    if carrier is not None:
        gm.placer_eval_graph = carrier.graph  # type: ignore[assignment]
        _carry_attributes(carrier, gm, carrier.graph, None)
    follow_eval_mode(gm)
    return gm


def _rebuild_needs_arguments(gm: fx.GraphModule) -> bool:
    """Whether fx's own unpickling fails on ``gm``: it builds the tracer class the graph was made
    with, without arguments, and torch.export's (``_ModuleStackTracer``) needs a ``scope_root``."""
    tracer = getattr(gm, "_tracer_cls", None)
    if tracer is None:
        return False
    params = list(inspect.signature(tracer.__init__).parameters.values())[1:]
    return any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def _by_nodes(gm: fx.GraphModule) -> tuple[Callable[..., fx.GraphModule], tuple]:
    """``gm`` pickled node by node (:class:`graphs.portable_graph.PortableGraph`, which keeps
    the node names eval mode's arguments are keyed by), with placer's attributes, its hooks
    and its eval graph (over the same modules: one pickle, so they stay shared)."""
    from graphs.portable_graph import PortableGraph

    held = gm.__dict__.get("placer_eval_graph")
    carrier = PortableGraph.of(fx.GraphModule(gm, held)) if held is not None else None
    placer = {k: v for k, v in gm.__dict__.items() if k.startswith("placer_") and k != "placer_eval_graph"}
    return _rebuilt_from_nodes, (PortableGraph.of(gm), placer, carrier, _buffer_names(gm), _placer_hooks(gm))


def _rebuilt_from_nodes(portable: Any, placer: dict[str, Any], carrier: Any, buffers: list[str],
                        hooks: Sequence[tuple[Callable[..., Any], bool]]) -> fx.GraphModule:
    """Unpickling a module :func:`_by_nodes` pickled: the same graph, then what
    :func:`_rebuilt_following_eval` restores."""
    gm = portable.module()
    gm.__dict__.update(placer)
    return _following_again(gm, carrier.module() if carrier is not None else None, buffers, hooks)


def _placer_hooks(gm: nn.Module) -> list[tuple[Callable[..., Any], bool]]:
    """placer's own forward pre-hooks on ``gm`` (functions marked ``placer_hook``, such as
    :func:`graphs.capture.pin_constant_inputs`'s), each with whether it takes keyword arguments:
    fx's rebuilds (a copy, a deep copy, a pickle) keep no hooks, so they are registered again."""
    return [(hook, key in gm._forward_pre_hooks_with_kwargs) for key, hook in gm._forward_pre_hooks.items()
            if getattr(hook, "placer_hook", False)]


def _register_hooks(gm: nn.Module, hooks: Sequence[tuple[Callable[..., Any], bool]]) -> None:
    present = list(gm._forward_pre_hooks.values())
    for hook, with_kwargs in hooks:
        if hook not in present:
            gm.register_forward_pre_hook(hook, with_kwargs=with_kwargs)


def _buffer_names(gm: fx.GraphModule) -> list[str]:
    return [n for n, _ in gm.named_buffers(remove_duplicate=False)]


def follow_eval_graph(gm: fx.GraphModule, eval_graph: fx.Graph, source: nn.Module | None = None) -> None:
    """Make ``gm`` run ``eval_graph`` (the model traced in eval mode, where ``if self.training:``
    took another branch) when ``gm.training`` is False.

    ``eval_graph`` reads ``gm``'s own parameters, buffers and modules, so training in one mode
    and evaluating in the other share one state; what only the eval graph reads (a module the
    training branch skips) is taken from ``source`` (the captured model).

    Raises:
        CaptureError: the eval graph reads an attribute neither ``gm`` nor ``source`` has.
    """
    missing = _carry_attributes(source, gm, eval_graph, None) if source is not None else _unresolved(gm, eval_graph)
    if missing:
        raise CaptureError(f"the model's eval mode reads {missing[0]!r}, which the captured graph does not have")
    gm.placer_eval_graph = eval_graph  # type: ignore[assignment]
    gm.placer_eval_arguments = {}  # type: ignore[assignment]
    follow_eval_mode(gm)

def _unresolved(root: nn.Module, graph: fx.Graph) -> list[str]:
    """The targets of ``graph`` that ``root`` lacks, or holds only as a bare ``nn.Module``: the
    path :func:`graphs.capture.complete_state` (or fx's rebuild) made to hold the parameters of
    a module the training graph never calls, which has no forward to call."""
    out = []
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):
            try:
                value = _resolve(root, str(n.target))
            except AttributeError:
                out.append(str(n.target))
                continue
            if n.op == "call_module" and type(value) is nn.Module:
                out.append(str(n.target))
    return out


def _carry_attributes(src: nn.Module | None, dst: nn.Module, graph: fx.Graph, memo: dict | None) -> list[str]:
    """Put on ``dst`` what ``graph`` reads and ``dst`` lacks, from ``src`` (deep-copied with
    ``memo`` when given); returns the targets neither has."""
    missing = []
    for target in _unresolved(dst, graph):
        try:
            value = _resolve(src, target) if src is not None else None
        except AttributeError:
            value = None
        if value is None:
            missing.append(target)
            continue
        if memo is not None:
            value = copy.deepcopy(value, memo)
        path, _, field = target.rpartition(".")
        owner = ensure_module(dst, path)
        if isinstance(value, nn.Module):
            owner.add_module(field, value)  # in the bare module's place: its tensors are this one's
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(field, value)
        else:  # a plain tensor (fx's constants): state the model does not have stays out of state_dict
            object.__setattr__(owner, field, value)
    return missing


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


def refuse_eval_mode(gm: fx.GraphModule, reason: str) -> None:
    """Refuse a forward of ``gm`` in eval mode, saying ``reason``: a graph fx traced through
    ``if self.training:`` keeps the training branch (:func:`graphs.capture._mode_baked_by_fx`),
    and after ``placed.eval()`` ran it with no error (walkthrough). The refusal is the eval
    forward :func:`follow_eval_mode` installs, so copies, deep copies (an EMA copy) and pickles
    refuse too (review: a forward pre-hook, which fx's rebuilds drop, let them run the training
    branch)."""
    gm.placer_eval_refusal = reason  # type: ignore[assignment]
    follow_eval_mode(gm)


def _refusing(reason: str) -> Callable[..., Any]:
    """The eval forward of :func:`refuse_eval_mode`."""

    def eval_forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        raise CaptureError(f"{reason}; evaluate with your original model, loading the trained weights back "
                           "with model.load_state_dict(placed.state_dict())")

    return eval_forward
