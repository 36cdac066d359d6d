"""Timing every node where it really runs: inside whole forward + backward passes of the graph.

A node timed alone in a loop runs with hot caches and a warm dispatcher and read up to 3x
faster than inside the model; its isolated backward pays the autograd engine's set-up once
per op, where a real backward pays it once. Timed in place — one whole forward, then one
whole backward, as in a training step — each node costs what the step pays.

Forward: each compute node's call is timed between two clock reads (synchronised on CUDA).
Backward: after the forward, every autograd node the fx node created is found (walking
``grad_fn.next_functions`` from its outputs, stopping at nodes an earlier fx node already
claimed) and gets a pre-hook and a hook that time it; an fx node's backward is the sum over
its autograd nodes. The whole backward then runs from the graph's outputs (gradient 1).
The timer's own cost is subtracted per timed region (forward), the hooks' own cost
(:func:`hook_overhead`) per autograd node (backward). The median over ``repeats`` runs
(after one warm-up run) is kept. Parameters' ``.grad`` are restored afterwards, so the
caller's model is left as it was.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any, Sequence

import torch
import torch.fx as fx

from graphs.op_timing import clock_for, clock_overhead, sync_device, tensors_in, tree_map

COMPUTE_OPS = frozenset({"call_module", "call_function", "call_method"})


class _BackwardTimer:
    """Hooks the autograd nodes an fx node created and sums their backward time under its name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = clock_for(device)
        self.backward: dict[str, float] = {}
        self.autograd_nodes: dict[str, int] = {}
        self._claimed: set[Any] = set()
        self._started: dict[Any, float] = {}

    def release(self) -> None:
        """Drop the references to this run's autograd graph (its timings stay)."""
        self._claimed.clear()
        self._started.clear()

    def hook(self, name: str, result: Any) -> None:
        """Claim the autograd nodes reachable from ``result`` not claimed by an earlier node."""
        stack = [t.grad_fn for t in tensors_in(result) if t.grad_fn is not None]
        count = 0
        while stack:
            fn = stack.pop()
            if fn is None or fn in self._claimed:
                continue
            self._claimed.add(fn)
            count += 1
            fn.register_prehook(self._pre(fn))
            fn.register_hook(self._post(fn, name))
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        self.autograd_nodes[name] = self.autograd_nodes.get(name, 0) + count

    def _pre(self, fn: Any):
        def hook(grad_outputs: Any) -> None:
            sync_device(self.device)
            self._started[fn] = self.clock()
        return hook

    def _post(self, fn: Any, name: str):
        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            sync_device(self.device)
            start = self._started.pop(fn, None)
            if start is not None:
                self.backward[name] = self.backward.get(name, 0.0) + self.clock() - start
        return hook


class _TimedRun(fx.Interpreter):
    """One forward run that times each compute node and hooks its autograd nodes for the backward."""

    def __init__(self, gm: fx.GraphModule, device: torch.device) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.device = device
        self.clock = clock_for(device)
        self.forward: dict[str, float] = {}
        self.timer = _BackwardTimer(device)

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op not in COMPUTE_OPS:
                return getattr(self, n.op)(n.target, args, kwargs)
            sync_device(self.device)
            start = self.clock()
            result = getattr(self, n.op)(n.target, args, kwargs)
            sync_device(self.device)
            self.forward[n.name] = self.clock() - start
            self.timer.hook(n.name, result)
            return result


_HOOK_OVERHEAD: dict[str, float] = {}


def hook_overhead(device: torch.device) -> float:
    """Seconds a hooked autograd node reads when it does (almost) nothing: the hooks' own cost.

    Measured on a chain of views of a one-element tensor (a view's backward is a reshape of
    one element); subtracted once per autograd node from the in-place backward times.
    """
    key = str(device)
    if key not in _HOOK_OVERHEAD:
        samples = []
        with torch.enable_grad():
            for _ in range(5):
                timer = _BackwardTimer(device)
                x = torch.zeros(1, device=device, requires_grad=True)
                y = x
                for i in range(100):
                    y = y.view(1)
                    timer.hook(str(i), y)
                torch.autograd.backward([y], [torch.ones_like(y)])
                samples.append(statistics.median(timer.backward.values()))
        _HOOK_OVERHEAD[key] = statistics.median(samples)
    return _HOOK_OVERHEAD[key]


def in_situ_times(gm: fx.GraphModule, example_inputs: Sequence[Any], device: torch.device,
                  repeats: int) -> dict[str, tuple[float, float]]:
    """Median (forward, backward) seconds of every compute node, timed in place (module doc).

    Raises whatever the graph raises when it cannot run whole on ``device`` (the caller
    falls back to isolated timing).
    """
    if device.type == "cpu":
        work, inputs = gm, tuple(example_inputs)
    else:
        work = copy.deepcopy(gm).to(device)
        inputs = tuple(tree_map(lambda t: t.to(device), tuple(example_inputs)))
    params = list(work.parameters())
    saved = [p.grad for p in params]
    runs: list[_TimedRun] = []
    try:
        with torch.enable_grad():
            for _ in range(repeats + 1):  # the first run is the warm-up
                # As after optimizer.zero_grad() (set_to_none, the default): every backward
                # allocates fresh parameter gradients, which for a large model is real time.
                for p in params:
                    p.grad = None
                run = _TimedRun(work, device)
                outputs = [t for t in tensors_in(run.run(*inputs)) if t.requires_grad and t.grad_fn is not None]
                if outputs:
                    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
                del outputs
                run.timer.release()
                runs.append(run)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    overhead = clock_overhead(device)
    per_autograd_node = hook_overhead(device)
    timed = runs[1:]
    result: dict[str, tuple[float, float]] = {}
    for name in timed[0].forward:
        fwd = statistics.median(r.forward[name] for r in timed) - overhead
        bwd = statistics.median(r.timer.backward.get(name, 0.0) for r in timed)
        if bwd > 0:
            bwd -= per_autograd_node * timed[0].timer.autograd_nodes.get(name, 0)
        result[name] = (max(fwd, 0.0), max(bwd, 0.0))
    return result
