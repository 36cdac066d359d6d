"""Whole CPU training steps timed by phase (forward, loss, backward, optimizer step) at one thread.

:func:`measure_step_parts` (:class:`StepTimes`) and :func:`measure_training_step` (its total)
time the model itself, not its graph: the reference the sum of profiled node times is checked
against (benchmarks/bench_capture.py).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphs.model_file import default_loss, default_optimizer
from graphs.profile.errors import ProfileError
from graphs.profile.op_timing import worker_conditions


@dataclass(frozen=True)
class StepTimes:
    """Median seconds of each phase of a training step (each phase's median taken on its own)."""

    forward: float
    loss: float
    backward: float
    optimizer: float
    total: float  # median of the whole steps (not the sum of the phase medians)


def measure_step_parts(model: nn.Module, example_inputs: Sequence[Any],
                       loss_fn: Callable[..., torch.Tensor] | None = None, repeats: int = 5,
                       optimizer_fn: Callable[[Any], torch.optim.Optimizer] | None = None,
                       warmup: int = 2, clock: str = "cpu") -> StepTimes:
    """Time CPU training steps (forward, loss, backward, optimizer step) at one thread, by phase.

    Runs on a deep copy of ``model`` so the caller's parameters are not trained.
    ``clock="cpu"`` counts this thread's CPU time (the clock node profiles use on the CPU,
    see :func:`graphs.profile.op_timing.clock_for`); ``clock="wall"`` the elapsed time.
    ``loss_fn(output, *inputs)`` defaults to :func:`graphs.model_file.default_loss`,
    ``optimizer_fn(params)`` to SGD (the model-file defaults).
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"repeats must be a positive integer, got {repeats!r}")
    if clock not in ("cpu", "wall"):
        raise ProfileError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    loss_fn = loss_fn or default_loss
    work = copy.deepcopy(model)
    optimizer = (optimizer_fn or default_optimizer)(work.parameters())

    def step() -> tuple[float, float, float, float]:
        optimizer.zero_grad(set_to_none=True)
        t0 = timer()
        output = work(*example_inputs)
        t1 = timer()
        loss = loss_fn(output, *example_inputs)
        t2 = timer()
        loss.backward()
        t3 = timer()
        optimizer.step()
        t4 = timer()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    samples = []
    with worker_conditions():
        for _ in range(warmup):
            step()
        for _ in range(repeats):
            samples.append(step())
    forward, loss, backward, update = (statistics.median(column) for column in zip(*samples))
    return StepTimes(forward, loss, backward, update, total=statistics.median(sum(row) for row in samples))


def measure_training_step(model: nn.Module, example_inputs: Sequence[Any],
                          loss_fn: Callable[..., torch.Tensor] | None = None, repeats: int = 5,
                          optimizer_fn: Callable[[Any], torch.optim.Optimizer] | None = None,
                          warmup: int = 2, clock: str = "cpu") -> float:
    """Median seconds of one CPU training step (forward, loss, backward, optimizer step) at one thread.

    See :func:`measure_step_parts` (this is its ``total``).
    """
    return measure_step_parts(model, example_inputs, loss_fn, repeats, optimizer_fn, warmup, clock).total
