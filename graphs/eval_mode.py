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
  interpreter where its data is (:class:`graphs.eval_interpreter.DataFollowingInterpreter`): the placed model's
  parameters stay where the placement put them, and each eval op runs where its module's
  parameters, the tensor it updates, or the placed training op of its name are, else where
  its latest input is. State only the eval graph reads, which no placement places, goes
  where its data is at apply time (:func:`graphs.eval_interpreter.eval_only_state`).
* **Neither** (a value that changes from one trace to the next, an eval graph reading state
  the model does not have): eval mode is refused with the reason (:func:`refuse_eval_mode`).

This module installs the eval forward on the captured module's class and keeps it through
``recompile()``, copies, deep copies and pickles; the constants are found by
:mod:`graphs.eval_arguments`, and the second graph is run by :mod:`graphs.eval_interpreter`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.errors import CaptureError
from graphs.eval_arguments import EvalArguments
from graphs.eval_interpreter import _interpreting
from graphs.module_attributes import _resolve, ensure_module, keep_plain_attributes


def _refuse_other_modes(gm: fx.GraphModule, modes: dict[str, bool]) -> None:
    """Raise where a module of ``modes`` (:func:`graphs.eval_arguments.export_module_modes`, and the modules whose
    ``training`` forward() read while traced: :func:`graphs.module_modes.modes_on`) is not in the mode
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
    :func:`follow_eval_graph`), the eval forward runs it (:class:`graphs.eval_interpreter.DataFollowingInterpreter`).
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
    :func:`graphs.forward_checks.pin_constant_inputs`'s), each with whether it takes keyword arguments:
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
    path :func:`graphs.state_completion.complete_state` (or fx's rebuild) made to hold the parameters of
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


def refuse_eval_mode(gm: fx.GraphModule, reason: str) -> None:
    """Refuse a forward of ``gm`` in eval mode, saying ``reason``: a graph fx traced through
    ``if self.training:`` keeps the training branch (:func:`graphs.eval_capture.mode_baked_by_fx`),
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
