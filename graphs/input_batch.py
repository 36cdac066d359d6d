"""The batch of a model's inputs: its size, the dimension that holds it, and slices of it.

The inputs' batch is their dim 0 unless the model file says otherwise with a module-level
``batch_dim`` (:mod:`graphs.model_file`). DDP replicas and pipeline micro-batches take equal
slices of every input tensor that holds the batch, along that dimension or the one other of the
batch's size (:func:`batch_axis`); every other input is given whole to each.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_map

from graphs.errors import ModelFileError
from graphs.tensor_tree import tensors_in


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a (possibly nested) structure: tuple, list, dict, ModelOutput, dataclass
    (:func:`graphs.tensor_tree.tensors_in`); None when it holds none.

    >>> first_tensor((3, {"ids": torch.zeros(2)})).shape, first_tensor([1, "a"])
    (torch.Size([2]), None)
    """
    return next(iter(tensors_in(value)), None)


def batch_size_of(example_inputs: Any, dim: int = 0) -> int | None:
    """The batch size of a model's example inputs: dim ``dim`` (the model's batch dimension,
    :attr:`ModelSpec.batch_dim`) of the first tensor (or array) that has one, in a (possibly
    nested) tuple, list or dict; None when there is none.

    >>> batch_size_of(({"ids": [torch.zeros(8, 4)]}, torch.zeros(2))), batch_size_of((3,))
    (8, None)
    >>> batch_size_of((torch.zeros(12, 32),), dim=1)
    32
    """
    stack = [example_inputs]
    while stack:
        x = stack.pop(0)
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) > dim:
            return int(shape[dim])
        if isinstance(x, (list, tuple)):
            stack = list(x) + stack
        elif isinstance(x, dict):
            stack = list(x.values()) + stack
    return None


def batch_axis(x: Any, batch: int, dim: int = 0) -> int | None:
    """The dimension along which ``x`` holds the batch of ``batch`` samples: ``dim`` (the model's
    batch dimension) where it has that size, else the one other dimension of that size (a
    recurrent state passed in as ``(layers, batch, hidden)`` beside ``(batch, time)`` tokens, as
    truncated backpropagation through time does); None for a value that is not a tensor, or
    holds no dimension, or several others, of that size: given whole to every part.

    >>> batch_axis(torch.zeros(12, 32), 32, dim=1), batch_axis(torch.zeros(2, 32, 8), 32)
    (1, 1)
    >>> batch_axis(torch.zeros(12, 32), 7) is None, batch_axis(torch.zeros(3, 32, 32), 32) is None
    (True, True)
    """
    if not isinstance(x, torch.Tensor):
        return None
    if x.dim() > dim and x.shape[dim] == batch:
        return dim
    others = [d for d, size in enumerate(x.shape) if size == batch]
    return others[0] if len(others) == 1 else None


def carries_batch(x: Any, batch: int, dim: int = 0) -> bool:
    """Whether ``x`` is a tensor that holds the batch of ``batch`` samples (:func:`batch_axis`):
    the values that replicas and micro-batches cut (every other input is given whole to each).

    >>> carries_batch(torch.zeros(12, 32), 32, dim=1), carries_batch(torch.zeros(12, 32), 7)
    (True, False)
    """
    return batch_axis(x, batch, dim) is not None


def batch_slice(inputs: Any, batch: int, start: int, stop: int, dim: int = 0) -> Any:
    """Samples ``start:stop`` of every tensor that holds the batch, along the dimension that
    holds it (:func:`batch_axis`: ``dim``, or the one other of the batch's size), anywhere in ``inputs`` (nested tuples, lists, dicts: a pytree);
    every other value as it is. How replicas and micro-batches take their share (equal slices
    of the batch dimension, as DDP's sampler and ``torch.distributed.pipelining`` cut it).

    >>> batch_slice({"ids": torch.arange(8), "n": 3}, 8, 2, 4)
    {'ids': tensor([2, 3]), 'n': 3}
    >>> batch_slice(torch.arange(6).view(2, 3), 3, 1, 2, dim=1)
    tensor([[1],
            [4]])
    """
    def cut(x: Any) -> Any:
        axis = batch_axis(x, batch, dim)
        if axis is None:
            return x
        if x.layout != torch.strided:  # a sparse tensor has no strided view to narrow
            return _sparse_rows(x, axis, start, stop)
        return x.narrow(axis, start, stop - start)

    return tree_map(cut, inputs)


def _sparse_rows(x: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """Samples ``start:stop`` of the sparse tensor ``x`` along ``axis``, in ``x``'s layout: a
    sparse tensor (a graph's adjacency, a bag of features) cannot be ``narrow``ed ("Could not
    run 'aten::as_strided' with arguments from the 'SparseCPU' backend"), a COO copy of it can.

    >>> x = torch.eye(4).to_sparse_csr()
    >>> _sparse_rows(x, 0, 1, 3).layout, _sparse_rows(x, 0, 1, 3).to_dense().tolist()
    (torch.sparse_csr, [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    """
    coo = x if x.layout == torch.sparse_coo else x.to_sparse_coo()
    rows = torch.narrow_copy(coo, axis, start, stop - start)
    return rows if x.layout == torch.sparse_coo else rows.to_sparse(layout=x.layout)


def check_batch_dim(value: object, example_inputs: tuple, what: str = "batch_dim") -> int:
    """``value`` as the inputs' batch dimension, checked against ``example_inputs``: an integer
    >= 0 that the first input tensor has. ``what`` names where it came from in the error.

    >>> check_batch_dim(1, (torch.zeros(12, 32),))
    1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFileError(f"{what} is {value!r}; expected the inputs' batch dimension as an integer >= 0 "
                             "(batch_dim = 1 for sequence-first inputs of shape (time, batch, ...))")
    first = next((t for _, t in tensor_paths(example_inputs) if t.dim() > 0), None)
    if first is not None and first.dim() <= value:
        raise ModelFileError(f"{what} is {value}, but the first input tensor has shape {tuple(first.shape)} "
                             f"({first.dim()} dimension(s)); expected a dimension it has")
    return value


def tensor_paths(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested tuple/list/dict, with where it is below ``path`` (``batch['ids']``)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from tensor_paths(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from tensor_paths(v, f"{path}[{k!r}]")
