"""The constants by which a graph captured in training mode computes eval mode, found at capture.

torch.export bakes each module's training flag into its ops (``aten.batch_norm``'s, the
dropouts', the recurrent layers'), and fx runs ``F.dropout(h, p, self.training)`` with the
flag it traced: the same graph computes eval mode with other constants
(:data:`EvalArguments`), read off the ops (:func:`export_eval_arguments`) or off a second
trace in eval mode (:func:`fx_eval_arguments`, :func:`export_eval_plan`), which says too
where the structure differs and no swap of constants can follow. It stands apart from
:mod:`graphs.eval_mode`, which installs the eval forward these constants make and keeps it
through copies and pickles, and from :mod:`graphs.eval_interpreter`, which runs an eval
graph of another structure: this module only compares graphs and reads their flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.module_attributes import _resolve

#: aten ops of a torch.export graph whose argument at this index is the module's training flag.
_TRAINING_ARGUMENT = {
    "aten.batch_norm.default": 5,
    "aten.dropout.default": 2,
    "aten.feature_dropout.default": 2,
    "aten.alpha_dropout.default": 2,
    "aten.feature_alpha_dropout.default": 2,
    "aten.instance_norm.default": 5,  # use_input_stats (= training where running statistics are kept)
    "aten.lstm.input": 6, "aten.gru.input": 6, "aten.rnn_tanh.input": 6, "aten.rnn_relu.input": 6,  # train
    "aten.lstm.data": 7, "aten.gru.data": 7, "aten.rnn_tanh.data": 7, "aten.rnn_relu.data": 7,
    "aten.rrelu.default": 3,
}


#: ``{node name: {argument position or keyword: its value in eval mode}}``: the constants of a
#: graph traced in training mode that the same graph takes in eval mode (:func:`graphs.eval_mode.follow_eval_mode`).
EvalArguments = dict[str, dict[int | str, Any]]


def export_eval_arguments(gm: fx.GraphModule) -> EvalArguments:
    """The eval-mode constants of a torch.export graph traced in training mode: every training
    flag baked as ``True`` (:func:`_training_flags`) becomes ``False``, and every
    ``num_batches_tracked.add_(1)`` adds 0 (BatchNorm counts its batches in training mode only)."""
    found: EvalArguments = {n.name: {key: False} for n, key, flag in _training_flags(gm) if flag}
    for n in gm.graph.nodes:
        if (n.op == "call_function" and str(n.target) == "aten.add_.Tensor" and len(n.args) == 2 and n.args[1] == 1
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"
                and str(n.args[0].target).endswith("num_batches_tracked")):
            found[n.name] = {1: 0}
    return found


def _training_flags(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, int | str, bool]]:
    """Each op of a torch.export graph whose training flag (:data:`_TRAINING_ARGUMENT`) changes
    what it computes: the node, where the flag is (by position, or by keyword where the call
    names it: rrelu's ``training=True``) and its value. A BatchNorm without running statistics
    normalises by the batch in both modes, and a dropout that drops nothing (:func:`_no_dropout`)
    computes the same in both: left out."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        target = str(n.target)
        i = _TRAINING_ARGUMENT.get(target)
        if i is None:
            continue
        argument = n.target._schema.arguments[i]
        key: int | str = i if len(n.args) > i else argument.name
        flag = n.args[key] if isinstance(key, int) else n.kwargs.get(key, argument.default_value)
        no_running = target in ("aten.batch_norm.default", "aten.instance_norm.default") and n.args[3] is None
        if isinstance(flag, bool) and not no_running and not _no_dropout(n):
            yield n, key, flag


def _no_dropout(n: fx.Node) -> bool:
    """Whether ``n``, a dropout or a recurrent layer, drops nothing in training mode either, so
    its flag changes no value: a dropout of ``p=0``, an RNN of ``dropout=0`` or of one layer
    (its dropout is between layers). Refusing ``lstm.eval()`` on such a layer stopped every
    validation pass of a model for nothing (walkthrough)."""
    arguments = {a.name: (n.args[i] if i < len(n.args) else n.kwargs.get(a.name, a.default_value))
                 for i, a in enumerate(n.target._schema.arguments)}  # type: ignore[union-attr]
    if "num_layers" in arguments and arguments["num_layers"] == 1:
        return True
    rate = arguments.get("dropout", arguments.get("p"))
    return isinstance(rate, (int, float)) and rate == 0


def export_module_modes(gm: fx.GraphModule, model: nn.Module) -> dict[str, bool]:
    """``{module path: its training flag}`` for the modules of ``gm`` (torch.export, traced from
    ``model`` in its current modes) whose ops baked their own flag (a BatchNorm, an LSTM, a
    block's ``F.dropout(h, p, self.training)``): the graph computes that mode whatever the
    module's flag says later, so :func:`graphs.eval_mode.follow_eval_mode` refuses a forward where it says
    otherwise (:func:`graphs.eval_mode._refuse_other_modes`). A flag that is not the module's (``training=False``
    written in a training module) is left out."""
    from graphs.placement_graph import owning_module

    modes: dict[str, bool] = {}
    for n, _, flag in _training_flags(gm):
        path = owning_module(n)
        try:
            own = model.get_submodule(path).training if path else None
            gm.get_submodule(path)  # a module without state (a Dropout) is not on the graph's module
        except AttributeError:
            continue
        if own is flag:
            modes[path] = flag
    return modes



def fx_eval_arguments(train: fx.Graph, eval_: fx.Graph) -> EvalArguments | None:
    """The eval-mode constants of an fx graph, from its trace in eval mode: where the two graphs
    have the same nodes, ops, targets and inputs and differ only in constant arguments
    (``F.dropout(h, p, self.training)``: ``training`` True, then False), those constants; None
    where the structure differs (``if self.training:`` took another branch), which no swap of
    constants can follow."""
    nodes, twins = list(train.nodes), list(eval_.nodes)
    if len(nodes) != len(twins):
        return None
    return _constants_between(list(zip(nodes, twins)), lambda a, b: a.name == b.name)


def export_eval_plan(train: fx.GraphModule, eval_: fx.GraphModule) -> EvalArguments | None:
    """The constants that make ``train`` (torch.export, training mode) compute ``eval_`` (the
    same model exported in eval mode), or None where the two graphs run other ops (``if
    self.training:`` took another branch) and ``eval_`` itself must run.

    The graphs are compared node by node in program order, names aside (they shift when a
    branch drops nodes). BatchNorm's ``num_batches_tracked.add_(1)``, absent in eval mode,
    adds 0 instead (:func:`export_eval_arguments`); every other constant that differs, a
    training flag of any op, takes its eval-mode value.
    """
    counters = {name for name, swap in export_eval_arguments(train).items() if swap == {1: 0}}
    nodes = [n for n in train.graph.nodes if n.name not in counters]
    twins = list(eval_.graph.nodes)
    if len(nodes) != len(twins):
        return None

    def same_tensor(a: fx.Node, b: fx.Node) -> bool:  # a tensor forward() makes: one name, maybe two values
        if a.op != "get_attr":
            return True
        x, y = _resolve(train, str(a.target)), _resolve(eval_, str(b.target))
        return x is y or not isinstance(x, torch.Tensor) or _same_tensor(x, y)

    found = _constants_between(list(zip(nodes, twins)), same_tensor)
    return None if found is None else {**{name: {1: 0} for name in counters}, **found}


def _constants_between(pairs: list[tuple[fx.Node, fx.Node]],
                       alike: Callable[[fx.Node, fx.Node], bool]) -> EvalArguments | None:
    """The constant arguments by which the second node of each pair differs from the first, or
    None where a pair differs otherwise: its op, target, argument count, ``alike``, or which
    earlier node of its graph an input is (by position in ``pairs``)."""
    at_x = {a: i for i, (a, _) in enumerate(pairs)}
    at_y = {b: i for i, (_, b) in enumerate(pairs)}
    found: EvalArguments = {}
    for a, b in pairs:
        if (a.op != b.op or a.target != b.target or len(a.args) != len(b.args) or set(a.kwargs) != set(b.kwargs)
                or not alike(a, b)):
            return None
        slots: list[tuple[int | str, Any, Any]] = [*zip(range(len(a.args)), a.args, b.args),
                                                    *((k, a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
        for key, x, y in slots:
            if fx.node.map_arg(x, lambda n: ("node", at_x.get(n, -1))) == fx.node.map_arg(y, lambda n: ("node", at_y.get(n, -1))):
                continue
            if a.op == "output" or _holds_node(x) or _holds_node(y):
                return None
            found.setdefault(a.name, {})[key] = y
    return found


def _same_tensor(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and bool(torch.equal(a, b)))


def _holds_node(value: Any) -> bool:
    held: list[fx.Node] = []
    fx.node.map_arg(value, held.append)
    return bool(held)

