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
