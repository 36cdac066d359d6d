"""A stable fingerprint of a captured model.

A placement (or a cached profile) saved for one model must be refused on another. The
fingerprint hashes what a placement depends on: the graph structure (node names, ops,
targets, edges), the parameters' and buffers' names, shapes and dtypes, and the shapes
and dtypes of the example inputs (node costs and tensor sizes follow from them). It does
not depend on weight values, the process, or dict ordering.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.placement_graph import target_text

FINGERPRINT_LENGTH = 16


def _input_signature(example_inputs: Iterable[Any]) -> list:
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ["tensor", list(value.shape), str(value.dtype)]
        if isinstance(value, (list, tuple)):
            return [describe(v) for v in value]
        if isinstance(value, dict):
            return {str(k): describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        return type(value).__name__
    return [describe(v) for v in example_inputs]


def model_fingerprint(gm: fx.GraphModule, model: nn.Module, example_inputs: Iterable[Any]) -> str:
    """Short sha256 hex digest of structure + parameter shapes + input shapes (see module doc)."""
    structure = [
        [n.name, n.op, target_text(n.target), [i.name for i in n.all_input_nodes]]
        for n in gm.graph.nodes
    ]
    tensors = sorted(
        [name, list(t.shape), str(t.dtype)]
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    )
    payload = json.dumps(
        {"graph": structure, "tensors": tensors, "inputs": _input_signature(example_inputs)},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def _constant(value: Any) -> Any:
    """A node argument as stable JSON: other nodes by name, tensors by shape and dtype, numbers,
    strings and torch enums by value, containers element by element, anything else by type."""
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype)]
    if isinstance(value, (list, tuple)):
        return [_constant(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _constant(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, slice):
        return ["slice", _constant(value.start), _constant(value.stop), _constant(value.step)]
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                           torch.layout)):
        return repr(value)
    return type(value).__qualname__


def computation_key(gm: fx.GraphModule) -> str:
    """Short hash of what the ops compute beyond :func:`model_fingerprint`: each called module's
    configuration (``extra_repr`` and its plain attributes: a convolution's stride, an embedding's
    ``sparse``, a norm's ``eps``, the training flag), the constant arguments of every node, and which parameters are trained.

    Two models with one fingerprint can still run other kernels: ``EmbeddingBag(sparse=True)``
    against the dense one (a stale profile gave the sparse tables the dense backward, 19 ms
    against 0.05), layers frozen since the last run (their backward and optimizer times).
    Profiles are cached under both (:mod:`graphs.profile.cache`); a placement needs only the
    fingerprint, as it names nodes.
    """
    modules = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            module = gm.get_submodule(str(n.target))
            # extra_repr misses some settings (EmbeddingBag's ``sparse``): its plain attributes too
            settings = {k: _constant(v) for k, v in sorted(vars(module).items())
                        if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str, tuple)))}
            modules.append([n.name, type(module).__qualname__, module.extra_repr(), settings])
    constants = [[n.name, _constant(n.args), _constant(n.kwargs)] for n in gm.graph.nodes]
    trained = sorted(name for name, p in gm.named_parameters() if p.requires_grad)
    payload = json.dumps({"modules": modules, "constants": constants, "trained": trained},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
