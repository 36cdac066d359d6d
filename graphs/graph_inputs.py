"""A model's inputs as its captured graph's placeholders take them, and back.

A graph torch.fx captured has one placeholder per positional input of ``forward``. One that
torch.export captured has one per *leaf* of the inputs: ``forward(self, views, task)`` called
with ``((a, b), "cls")`` gives placeholders ``views_0, views_1, task``, and its generated
``forward`` flattens the nested inputs itself (``fx_pytree.tree_flatten_spec``). The runtimes
that run the graph node by node (the rank runtime, pipeline stages) hand values to placeholders
by name, so they need the leaves (:func:`placeholder_values`); the model's loss,
``loss_fn(output, *inputs)``, needs the inputs as the model takes them (:func:`model_args`).
Paired by position with the top-level inputs, a nested input reached an op whole ("aten::linear()
Expected a value of type 'Tensor' for argument 'input' but instead found type 'tuple'") and the
last stage's loss missed an input (KeyError).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch.utils._pytree import TreeSpec, tree_unflatten

__all__ = ["input_spec", "model_args", "placeholder_values"]


def placeholder_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """``inputs`` (the model's positional inputs) by the name of the placeholder that takes each:
    the inputs themselves for an fx graph, their leaves for a graph that flattens them.

    >>> import torch
    >>> class Pair(torch.nn.Module):
    ...     def forward(self, views):
    ...         return views[0] + views[1]
    >>> x = torch.ones(1)
    >>> sorted(placeholder_values(torch.export.export(Pair(), ((x, x),)).module(), ((x, x),)))
    ['views_0', 'views_1']
    """
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(names, gm.graph.process_inputs(*inputs)))


def input_spec(gm: fx.GraphModule) -> TreeSpec | None:
    """The tree structure ``gm``'s forward flattens its inputs by (None: it takes them as they are)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return None if info is None else info.in_spec


def model_args(spec: TreeSpec | None, values: Sequence[Any]) -> tuple:
    """The model's positional inputs from its placeholders' values in order: the inverse of
    :func:`placeholder_values` for a graph whose :func:`input_spec` is ``spec``."""
    if spec is None:
        return tuple(values)
    args, _ = tree_unflatten(list(values), spec)
    return tuple(args)
