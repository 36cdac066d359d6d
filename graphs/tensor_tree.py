"""The tensors inside a nested value: what a model takes and returns, walked one way everywhere.

A model's inputs and outputs nest tensors in tuples, lists, dicts, named tuples, Hugging Face
``ModelOutput`` objects (containers of ``torch.utils._pytree``) and dataclasses. pytree leaves a
dataclass whole unless it was registered (``torch.export.register_dataclass``), and a model's
own output class often is not, nor a subclass of dict (an ``OrderedDict`` of its own): their
tensors would be invisible to whatever walked the output (the numerical check compared none of
them, a transfer left them on the device that made them, the memory probe did not count the
output the training loop holds). :func:`map_tensors` and :func:`tensors_in` go into those too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["map_tensors", "tensors_in"]


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it, every other leaf as it is: pytree's
    containers rebuilt by pytree, and inside what it leaves whole, dataclasses (by
    ``dataclasses.replace``) and subclasses of dict, list and tuple (as their own type where it
    can be built from its items, else as the plain one).

    >>> from collections import namedtuple
    >>> Pair = namedtuple("Pair", "a b")
    >>> map_tensors(lambda t: t + 1, {"x": [torch.zeros(1)], "p": Pair(torch.ones(1), 3)})
    {'x': [tensor([1.])], 'p': Pair(a=tensor([2.]), b=3)}
    >>> map_tensors(lambda t: t, (torch.zeros(1), torch.Size([2, 3])))[1]
    torch.Size([2, 3])
    """
    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return fn(x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: map_tensors(fn, getattr(x, f.name))
                                             for f in dataclasses.fields(x) if f.init})
        if isinstance(x, Mapping):
            return _rebuilt(x, {k: map_tensors(fn, v) for k, v in x.items()}, dict)
        if isinstance(x, (list, tuple)):
            return _rebuilt(x, [map_tensors(fn, v) for v in x], tuple if isinstance(x, tuple) else list)
        return x

    # pytree rebuilds a torch.Size as a plain tuple; one holds no tensor, so it stays as it is
    return pytree.tree_map(leaf, value, is_leaf=lambda x: isinstance(x, torch.Size))


def _rebuilt(original: Any, items: Any, plain: type) -> Any:
    try:
        return type(original)(items)
    except Exception:  # a subclass whose constructor takes something else
        return plain(items)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors inside ``value``, where :func:`map_tensors` finds them, in order; nothing rebuilt.

    >>> @dataclasses.dataclass
    ... class Out:
    ...     logits: torch.Tensor
    ...     extras: tuple
    >>> [tuple(t.shape) for t in tensors_in((torch.zeros(2), Out(torch.zeros(3, 1), ({"a": torch.zeros(4)}, 5))))]
    [(2,), (3, 1), (4,)]
    """
    found: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found.extend(t for f in dataclasses.fields(leaf) if f.init for t in tensors_in(getattr(leaf, f.name)))
        elif isinstance(leaf, Mapping):
            found.extend(t for v in leaf.values() for t in tensors_in(v))
        elif isinstance(leaf, (list, tuple)):
            found.extend(t for v in leaf for t in tensors_in(v))
    return found
