"""The simulators' memory rules beyond the sums of parameters, gradients, optimizer state and
saved activations: the backward's working set, what the training loop still holds at the
optimizer step, and the step's temporaries. Every simulator (one process, ranks, pipelines,
DDP) and the baselines' memory model apply them alike; each rule names the measurement behind
it (benchmarks/results/memory.md)."""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx
import numpy as np

from envs.sim.cost_model import node_requires_grad

__all__ = ["BACKWARD_WORK_FACTOR", "gradient_parts", "gradient_bytes", "loop_held_bytes", "step_temporaries",
           "device_max"]


#: The backward's working set on a device, in gradients of its largest op: the autograd
#: engine holds an op's output gradient (an ``InputBuffer``) while the op's backward
#: allocates its input gradients, so about twice the largest of them is alive beyond the
#: saved activations (for a language model's logits: the loss's gradient and the logits').
#: A parameter used by several ops (a tied embedding) gets a second gradient that is summed
#: into the first: measured alone on the CPU allocator, an SGD step of an nn.Embedding peaks
#: at 2.01x its parameter bytes, a Linear at 2.09x, the embedding tied to a head at 3.01x.
#: Measured on one CPU (benchmarks/bench_memory.py, benchmarks/results/memory.md): without
#: this set the simulated peak of the zoo language models at batch 64 was 0.5-0.65x the
#: allocator's, and GPT-2 (paper widths, seq 128, tied head) 0.95x; with it 1.0-1.3x.
BACKWARD_WORK_FACTOR = 2.0


def gradient_parts(attrs: Mapping[str, object]) -> tuple[float, float]:
    """Bytes of the gradients a node's backward adds: ``(its output's, that of its parameters
    other nodes share)`` (``shared_param_bytes``, summed with theirs); the first shrinks with
    the batch, the second does not.

    0 for nodes autograd does not differentiate, the model's inputs and the output node;
    an unshared parameter's gradient is already counted with ``param_bytes``.
    """
    if not node_requires_grad(attrs) or attrs.get("op") in ("placeholder", "output"):
        return 0.0, 0.0

    def number(key: str) -> float:
        value = attrs.get(key)
        return float(value) if isinstance(value, (int, float)) else 0.0

    out = 0.0 if attrs.get("op") == "get_attr" else number("out_bytes")
    return out, number("shared_param_bytes")


def gradient_bytes(attrs: Mapping[str, object]) -> float:
    """Bytes of the largest gradient a node's backward adds (:func:`gradient_parts`)."""
    return max(gradient_parts(attrs))


def loop_held_bytes(graph: nx.DiGraph, node: str) -> float:
    """Bytes the training loop still holds of ``node`` at the optimizer step: a placeholder's
    output (the batch) and what the output node returns (the model's output, the bytes of the
    edges into it); 0 for any other node (``OpArrays.loop_held``)."""
    attrs = graph.nodes[node]
    if attrs.get("op") == "placeholder":
        return float(attrs.get("out_bytes") or 0)
    if attrs.get("op") == "output":
        return float(sum(float(d.get("bytes") or 0) for _, _, d in graph.in_edges(node, data=True)))
    return 0.0


def step_temporaries(is_cpu: np.ndarray, largest: np.ndarray, foreach_sum: np.ndarray) -> np.ndarray:
    """The optimizer step's temporaries per device ([..., D]): on a CPU torch.optim's
    per-parameter loop, ``largest`` (the device's largest op's ``step_work``); on a GPU its
    default foreach implementation, ``foreach_sum`` (the sum of the device's ops'
    ``foreach_work``), or the loop's when larger (a ``foreach=False`` optimizer)."""
    return np.where(np.asarray(is_cpu, dtype=bool), largest, np.maximum(largest, foreach_sum))


def device_max(rows: np.ndarray, work: np.ndarray, n_devices: int) -> np.ndarray:
    """[B, D] the largest ``work`` among the slots each row of ``rows`` ([B, G] device
    indices) puts on each device, 0 where none: the backward working set per device."""
    rows = np.atleast_2d(np.asarray(rows))
    out = np.zeros((rows.shape[0], n_devices))
    cols = np.flatnonzero(work > 0)
    if cols.size == 0:
        return out
    cols = cols[np.argsort(-work[cols], kind="stable")]
    sub = rows[:, cols]
    picked = np.arange(sub.shape[0])
    for d in range(n_devices):
        hit = sub == d
        first = np.argmax(hit, axis=1)  # columns by decreasing work: the first hit is the largest
        out[:, d] = np.where(hit[picked, first], work[cols][first], 0.0)
    return out
