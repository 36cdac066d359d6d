"""Rule P2b: a micro-batch after the first adds its gradients into ``.grad``.

A pipeline stage runs ``M`` backwards into the same ``.grad`` per step. The first, right
after ``zero_grad`` (``set_to_none``), stores each new gradient as ``.grad``; the other
``M - 1`` add into it in place (``AccumulateGrad``; :mod:`graphs.profile.accumulate_timing`
has the source and the measurement). The op profiles time a backward after
``zero_grad``, so every op of a stage is charged here, per accumulating backward:

* on a **CPU** (the op runs on the host thread): the model's measured extra seconds of an
  accumulating backward (``graph.graph["batch_scaling"]["accumulate_s"]["cpu"]``, taken by
  the micro-batch profile), shared among the ops by parameter bytes -- measured: ResNet-50
  39 ms for 102 MB, twice its adds' 18 ms, since new gradient memory is paid for too; GPT-2
  8.5 ms for 43 MB. Where it was not measured, the roofline of an ``add_`` per tensor:
  ``tensors * launch_overhead + 3 * bytes / mem_bandwidth`` (read both, write one);
* on a **GPU**: the ``add_`` kernels -- their launches on the host (the autograd engine's
  device thread issues them), ``3 * bytes / mem_bandwidth`` on the stream. The CUDA caching
  allocator keeps freed blocks, so new gradient memory costs no page faults there.

Only ops that take part in autograd and own trained parameters pay (``param_bytes`` less
``frozen_bytes``: :func:`~envs.sim.cost_model.trained_param_bytes`, with the
optimizer's roofline counting the same bytes; ``param_tensors`` where the profiler counted
the node's trainable tensors, else 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np

from envs.hardware.cluster import Device
from envs.sim.cost_model import CostModel, node_requires_grad, param_grad_bytes


def measured_accumulate_s(graph: nx.DiGraph, kind: str) -> float | None:
    """The micro-batch profile's seconds of the extra work of an accumulating backward of the
    whole model on ``kind``, or None where it was not measured.

    >>> g = nx.DiGraph(batch_scaling={"accumulate_s": {"cpu": 0.039}})
    >>> measured_accumulate_s(g, "cpu"), measured_accumulate_s(g, "cuda")
    (0.039, None)
    """
    value = ((graph.graph.get("batch_scaling") or {}).get("accumulate_s") or {}).get(kind)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value >= 0:
        return float(value)
    return None


def _owns_gradients(attrs: Mapping[str, Any]) -> float:
    """The node's parameter bytes that get gradients (0 for a node outside autograd)."""
    if attrs.get("op") in ("placeholder", "output") or not node_requires_grad(attrs):
        return 0.0
    return param_grad_bytes(attrs)


def roofline_accumulate(attrs: Mapping[str, Any], device: Device, cost_model: CostModel) -> tuple[float, float]:
    """(host, device) seconds of one ``add_`` into each gradient of a node on ``device`` (module doc).

    >>> from envs.hardware.cluster import Device
    >>> gpu = Device("gpu0", "V100", 16 * 2**30, 14e12, 900e9)
    >>> roofline_accumulate({"op": "call_module", "param_bytes": 3e6, "param_tensors": 2}, gpu, CostModel())
    (1.2e-05, 1e-05)
    """
    nbytes = _owns_gradients(attrs)
    if nbytes <= 0:
        return 0.0, 0.0
    tensors = float(attrs.get("param_tensors") or 1)
    launches = tensors * cost_model.roofline_for(device.kind).launch_overhead_s
    work = 3.0 * nbytes / device.mem_bandwidth
    if device.kind == "cpu":
        return launches + work, 0.0
    return launches, work


def accumulate_costs(graph: nx.DiGraph, order: Sequence[str], devices: Sequence[Device],
                     cost_model: CostModel) -> np.ndarray:
    """[N, D, 2] host and device seconds each node of ``order`` pays on each of ``devices`` per
    backward that accumulates (module doc)."""
    out = np.zeros((len(order), len(devices), 2))
    owned = np.array([_owns_gradients(graph.nodes[v]) for v in order])
    total = float(owned.sum())
    for j, dev in enumerate(devices):
        measured = measured_accumulate_s(graph, dev.kind) if dev.kind == "cpu" and cost_model.use_profiles else None
        if measured is not None and total > 0:
            out[:, j, 0] = measured * owned / total
            continue
        for i, v in enumerate(order):
            if owned[i] > 0:
                out[i, j] = roofline_accumulate(graph.nodes[v], dev, cost_model)
    return out
