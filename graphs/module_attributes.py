"""Attributes of a GraphModule that fx's rebuilds get wrong: constants and submodule paths.

``fx.GraphModule`` registers every tensor a ``get_attr`` reads as a persistent buffer when it
builds, copies or unpickles a module; a constant (``h + torch.full((10,), 0.25)``) then shows
up in ``state_dict()`` as state the model does not have (:func:`keep_plain_attributes`). And
it keeps only what its graph reads, so state put back on it needs its submodule path
(:func:`ensure_module`), and reading it back takes the attribute at a dotted target
(:func:`_resolve`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn


def keep_plain_attributes(gm: fx.GraphModule, buffers: Iterable[str]) -> None:
    """Keep the tensors a ``get_attr`` of ``gm`` reads that are not among ``buffers``
    (qualified names) as plain attributes, not buffers.

    ``fx.GraphModule`` (building it, deep-copying it) registers every tensor a ``get_attr``
    reads as a persistent buffer, so fx's own constants (``h + torch.full((10,), 0.25)``),
    torch.export's lifted ones and a model's plain tensor attributes became state the model
    does not have: ``placed.state_dict()`` no longer loaded into the model with
    ``strict=True``, and the numerical check refused every placement for "state on one side
    only" (walkthrough). A plain attribute is read by ``get_attr`` and moved by ``apply``
    all the same.
    """
    state = set(buffers)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) in state:
            continue
        path, _, field = str(node.target).rpartition(".")
        try:
            owner = gm.get_submodule(path) if path else gm
        except AttributeError:
            continue
        if field in owner._buffers:
            value = owner._buffers.pop(field)
            owner._non_persistent_buffers_set.discard(field)
            object.__setattr__(owner, field, value)


def ensure_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at ``path`` (dotted), made of empty ``nn.Module`` s where missing."""
    current = root
    for part in path.split(".") if path else []:
        child = getattr(current, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            current.add_module(part, child)
        current = child
    return current


def _resolve(root: nn.Module, target: str) -> Any:
    return operator.attrgetter(target)(root)
