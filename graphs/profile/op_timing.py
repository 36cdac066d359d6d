"""Timing one call on one device: clocks, synchronisation, looped medians, backward.

The primitives :mod:`graphs.profile.profiler` builds on. On the CPU the clock is this thread's CPU
time (at one thread all CPU work of a call, forward and backward, runs on the calling
thread, so CPU time is the work done, unaffected by other processes on a shared
machine); on CUDA it is wall time between synchronisations.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from graphs.cpu_allocator import retain_freed_memory
from graphs.tensor_tree import map_tensors, tensors_in

# A timed sample loops a fast op until it lasts about this long (timer overhead ~0.1 µs).
MIN_SAMPLE_SECONDS = 2e-4
MAX_INNER_LOOPS = 200


@contextmanager
def worker_conditions() -> Iterator[None]:
    """Run the block as a placed model's worker process runs: torch at one CPU thread (the
    previous count is restored afterwards) and the CPU allocator retaining freed memory
    (:func:`graphs.cpu_allocator.retain_freed_memory`, process-wide and kept: the workers that
    train the placement run with it from their start, so the profile must see what they see)."""
    retain_freed_memory()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_for(device: torch.device) -> Callable[[], float]:
    """The clock that times work on ``device``: CPU time of this thread for the CPU, wall time for CUDA.

    At one thread every CPU kernel (forward and, for CPU tensors, the autograd engine's
    backward) runs on the calling thread, so its CPU time is the work done, unaffected by
    other processes competing for the cores (on a shared 2-core machine wall time read
    3-4x higher). CUDA work runs on the device: wall time between synchronisations.
    """
    return time.thread_time if device.type == "cpu" else time.perf_counter


# --------------------------------------------------------------------------- timing one call


def median_loop(run: Callable[[], Any], device: torch.device, repeats: int, inner: int) -> float:
    clock = clock_for(device)
    samples = []
    for _ in range(repeats):
        sync_device(device)
        start = clock()
        for _ in range(inner):
            run()
        sync_device(device)
        samples.append((clock() - start) / inner)
    return statistics.median(samples)


def inner_loops(single: float) -> int:
    if single <= 0:
        return MAX_INNER_LOOPS
    return int(min(MAX_INNER_LOOPS, max(1, math.ceil(MIN_SAMPLE_SECONDS / single))))


def timed_once(run: Callable[[], Any], device: torch.device) -> float:
    clock = clock_for(device)
    sync_device(device)
    start = clock()
    run()
    sync_device(device)
    return clock() - start


def time_call(fn: Callable[..., Any], args: tuple, kwargs: dict, device: torch.device,
              repeats: int, extra_leaves: Sequence[torch.Tensor] = ()) -> tuple[float, float]:
    """Median forward and backward seconds of ``fn(*args, **kwargs)`` on ``device``.

    ``args``/``kwargs`` hold the recorded input values (any device); tensors are cloned to
    ``device`` keeping their ``requires_grad`` flag. ``extra_leaves`` are further tensors
    the backward differentiates (a module's parameters). Backward is 0 when no output
    depends on anything that requires grad.
    """
    leaves: list[torch.Tensor] = []

    def to_leaf(t: torch.Tensor) -> torch.Tensor:
        copy_ = t.detach().to(device, copy=True)
        if t.requires_grad and (t.is_floating_point() or t.is_complex()):
            copy_.requires_grad_(True)
            leaves.append(copy_)
        return copy_

    leaf_args = map_tensors(to_leaf, args)
    leaf_kwargs = map_tensors(to_leaf, kwargs)

    def activations() -> tuple[tuple, dict]:
        # Inputs that require grad enter as non-leaf tensors, like the activations of a
        # real step: in-place ops are then legal and the backward passes through them.
        as_act = lambda t: t.clone() if t.requires_grad else t  # noqa: E731
        return map_tensors(as_act, leaf_args), map_tensors(as_act, leaf_kwargs)

    with torch.enable_grad():
        fwd_args, fwd_kwargs = activations()
        run = lambda: fn(*fwd_args, **fwd_kwargs)  # noqa: E731
        run()  # warm-up: allocator, lazy init, kernel selection
        inner = inner_loops(timed_once(run, device))
        fwd = median_loop(run, device, repeats, inner)

        diff = leaves + [p for p in extra_leaves if p.requires_grad]
        if not diff:
            return fwd, 0.0
        samples = []
        inner_b = None
        for _ in range(repeats + 1):  # first round is the warm-up
            a, k = activations()
            outs = [t for t in tensors_in(fn(*a, **k)) if t.requires_grad and t.grad_fn is not None]
            if not outs:
                return fwd, 0.0
            grads = [torch.randn_like(t) if (t.is_floating_point() or t.is_complex()) else None for t in outs]
            step = lambda: torch.autograd.grad(outs, diff, grads, retain_graph=True, allow_unused=True)  # noqa: E731
            if inner_b is None:
                inner_b = inner_loops(timed_once(step, device))
                continue
            samples.append(median_loop(step, device, 1, inner_b))
        return fwd, max(statistics.median(samples) - engine_overhead(device), 0.0)


_ENGINE_OVERHEAD: dict[str, float] = {}


def engine_overhead(device: torch.device) -> float:
    """Fixed cost of one ``torch.autograd.grad`` call on ``device`` (graph task set-up, ~25 µs on a CPU).

    A real backward pays it once for the whole graph; timing each op with its own call
    would pay it once per op (doubling the backward of a small model), so it is measured
    on a minimal graph (leaf → clone) and subtracted from every op's backward.
    """
    key = str(device)
    if key not in _ENGINE_OVERHEAD:
        leaf = torch.zeros(1, device=device, requires_grad=True)
        with torch.enable_grad():
            out = leaf.clone()
            grad = torch.ones_like(out)
            step = lambda: torch.autograd.grad([out], [leaf], [grad], retain_graph=True)  # noqa: E731
            step()
            _ENGINE_OVERHEAD[key] = median_loop(step, device, 7, 100)
    return _ENGINE_OVERHEAD[key]


def clock_overhead(device: torch.device) -> float:
    """Seconds one timed region costs when it times nothing (two clock reads, plus syncs on CUDA)."""
    clock = clock_for(device)
    samples = []
    for _ in range(200):
        sync_device(device)
        start = clock()
        sync_device(device)
        samples.append(clock() - start)
    return statistics.median(samples)
