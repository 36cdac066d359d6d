"""What accumulating gradients into ``.grad`` costs: the extra work of every micro-batch after the first.

After ``optimizer.zero_grad()`` (``set_to_none=True``, torch's default since 2.0) a parameter's
``.grad`` is None, and the first backward's ``AccumulateGrad`` node stores the new gradient
as ``.grad`` without copying it (``torch/csrc/autograd/functions/accumulate_grad.h``,
``accumulateGrad``: the gradient is "stolen" when ``.grad`` is undefined). Every later
backward before the next ``zero_grad`` -- micro-batches 2..M of a pipeline stage, which
``torch.distributed.pipelining`` runs as separate ``autograd.backward`` calls into the same
``.grad`` -- adds the new gradient into it in place (``variable_grad += new_grad``), and
the new gradient needs memory of its own while the old one is still held. The op profiles
time each backward after a ``zero_grad``, so they hold neither.

Measured here (``benchmarks/grad_accumulate.py``, 2026-12-05, one thread, CPU seconds): a
backward that accumulates costs ResNet-50 (64x64 images, micro-batch 8, 102 MB of
parameters) 39 ms more than one after ``zero_grad``, where an ``add_`` of every gradient
costs 18 ms: in ``torch.profiler`` the adds took 23 ms and the convolutions' backward 23 ms
more (they write their weight gradients into memory the allocator has not handed out
before: the old gradients still hold the blocks a ``zero_grad`` would have freed). GPT-2
(width 384, micro-batch 16, 43 MB): 8.5 ms more, its adds 7.6 ms. So the cost is not the
add's bandwidth alone, and it is measured whole: :func:`accumulate_seconds` times the
model's backward on a micro-batch with and without gradients already in ``.grad``,
interleaved, and keeps the median difference, but never less than the adds themselves
(an ``add_`` of every gradient, timed alone: a difference of two backwards is noisy, the
adds are certain to be paid). The micro-batch profile (:mod:`graphs.profile.batch_scaling`)
stores it as ``graph.graph["batch_scaling"]["accumulate_s"][kind]``. The simulator shares
it among the ops by parameter bytes (:mod:`envs.sim.grad_accumulation`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from graphs.profile.in_situ import differentiable_outputs, timed_backward
from graphs.profile.op_timing import median_loop

#: Interleaved rounds of :func:`accumulate_seconds` (at least :data:`MIN_ROUNDS`; more, up to
#: :data:`MAX_ROUNDS`, while they take under :data:`ROUNDS_SECONDS`).
MIN_ROUNDS, MAX_ROUNDS, ROUNDS_SECONDS = 5, 25, 3.0


def _backward_seconds(gm: fx.GraphModule, inputs: Sequence[Any], device: torch.device, accumulate: bool) -> float:
    """Seconds of one backward of ``gm`` on ``inputs``: after ``zero_grad`` (``.grad`` None), or
    into the gradients an untimed step left (``accumulate``)."""
    params = list(gm.parameters())
    for p in params:
        p.grad = None
    if accumulate:
        outputs = differentiable_outputs(gm(*inputs))
        if outputs:
            timed_backward(outputs, device)
    outputs = differentiable_outputs(gm(*inputs))
    return timed_backward(outputs, device) if outputs else 0.0


def _adds_seconds(grads: Sequence[torch.Tensor], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of an ``add_`` of a fresh tensor into each of ``grads`` (AccumulateGrad's add)."""
    news = [g.clone() for g in grads]

    def add_all() -> None:
        for g, n in zip(grads, news):
            g.add_(n)

    return median_loop(add_all, device, repeats, 1)


def accumulate_seconds(gm: fx.GraphModule, inputs: Sequence[Any], device: torch.device) -> float:
    """What a backward of ``gm`` on ``inputs`` costs more when it adds into ``.grad`` than after
    ``zero_grad``, on ``device``'s clock (module doc): the median over interleaved rounds, at
    least the adds' own seconds. The caller keeps the buffers
    (:func:`graphs.buffers.preserved_buffers`); ``.grad`` is left as it was.

    >>> import torch.nn as nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1)))
    >>> accumulate_seconds(gm, (torch.randn(8, 64),), torch.device("cpu")) > 0.0
    True
    """
    params = list(gm.parameters())
    saved = [p.grad for p in params]
    try:
        with torch.enable_grad():
            _backward_seconds(gm, inputs, device, False)
            _backward_seconds(gm, inputs, device, True)
            adds = _adds_seconds([p.grad for p in params if p.grad is not None], device)
            extra: list[float] = []
            start = time.perf_counter()
            while len(extra) < MIN_ROUNDS or (len(extra) < MAX_ROUNDS
                                              and time.perf_counter() - start < ROUNDS_SECONDS):
                fresh = _backward_seconds(gm, inputs, device, False)
                extra.append(_backward_seconds(gm, inputs, device, True) - fresh)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return max(statistics.median(extra), adds)
