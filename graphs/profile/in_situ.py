"""Timing every node where it really runs: inside whole forward + backward passes of the graph.

A node timed alone in a loop runs with hot caches and a warm dispatcher and read up to 3x
faster than inside the model; its isolated backward pays the autograd engine's set-up once
per op, where a real backward pays it once. Timed in place — one whole forward, then one
whole backward, as in a training step — each node costs what the step pays.

Forward: a generated copy of the graph (:func:`timed_module`, not an Interpreter, whose
own Python between nodes made the nodes 20-50% slower than in the model) reads the clock
after every compute node (synchronised on CUDA); a node's forward is the interval since
the previous read. Backward: after the whole forward, every autograd node an fx node
created is found (walking ``grad_fn.next_functions`` from its outputs, fx nodes in graph
order, stopping at autograd nodes an earlier fx node already claimed) and gets a pre-hook
that reads the clock. The whole backward then runs from the graph's outputs (gradient 1);
the interval from one autograd node's start to the next one's (the last one's: to the end
of the backward) is charged to the fx node that owns the first. An interval covers the
autograd node's kernel *and* the engine's work after it — adding its gradients into the
buffers of the next nodes (a weight used at every step of an unrolled RNN receives one
gradient per use, and the engine sums them there: for the 32k-word embeddings and softmax
of the paper NMT, 50 dense gradients each) and scheduling — which a node's kernel time
alone misses. An optional callback runs after every backward, on its fresh gradients:
the optimizer updates are timed there (:mod:`graphs.profile.optimizer_timing`).

The timer's own cost is subtracted per timed region (forward: :func:`clock_overhead`;
backward: the hooks' cost per autograd node, measured on the same graph as the difference
between each hooked backward and an unhooked one run right after it). The median over
``repeats`` runs (after one warm-up run; more for a fast graph) is kept. Every hook is
removed after its run: the autograd nodes of parameters (``AccumulateGrad``) live as long
as the parameters, and hooks left on them piled up run after run (measured: the small
ResNet-50's hooked backward grew from 8.5 to 14.1 ms over five runs). Parameters'
``.grad`` are restored afterwards, so the caller's model is left as it was.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from graphs.profile.op_timing import clock_for, clock_overhead, sync_device
from graphs.tensor_tree import map_tensors, tensors_in

COMPUTE_OPS = frozenset({"call_module", "call_function", "call_method"})

#: A graph whose rounds are fast is run for about this many seconds (at most MAX_ROUNDS
#: rounds), however few ``repeats`` were asked for.
MIN_SECONDS = 1.0
MAX_ROUNDS = 30
#: A graph whose warm-up round took longer than this many seconds gets fewer timed rounds:
#: as many as fill about :data:`SLOW_SECONDS` (one at least). The 8-layer paper NMT's round
#: (a timed and a plain forward + backward at batch 128) took ~190 s on this project's 2-core
#: machine, and six rounds of it 19 minutes before any search (2026-12-06); its ops last
#: milliseconds, so one more sample of each moves their medians little.
SLOW_ROUND_S = 20.0
SLOW_SECONDS = 120.0
#: Fewer timed rounds than this leave the hooks' cost (a difference of two whole backwards)
#: to noise: it is then measured on a small reference graph (:func:`reference_hook_seconds`).
MIN_HOOK_PAIRS = 3


class _BackwardTimer:
    """Hooks the autograd nodes an fx node created and charges the backward's time intervals to it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = clock_for(device)
        self.backward: dict[str, float] = {}
        self.autograd_nodes: dict[str, int] = {}
        self._claimed: set[Any] = set()
        self._handles: list[Any] = []
        self._current: str | None = None
        self._since = 0.0

    def release(self) -> None:
        """Remove every hook and drop the references to this run's autograd graph (timings stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._claimed.clear()
        self._current = None

    def hook(self, name: str, grad_fns: Sequence[Any]) -> None:
        """Claim the autograd nodes reachable from ``grad_fns`` not claimed by an earlier node."""
        stack = list(grad_fns)
        count = 0
        while stack:
            fn = stack.pop()
            if fn is None or fn in self._claimed:
                continue
            self._claimed.add(fn)
            count += 1
            self._handles.append(fn.register_prehook(self._pre(name)))
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        self.autograd_nodes[name] = self.autograd_nodes.get(name, 0) + count
        self.backward.setdefault(name, 0.0)

    def _pre(self, name: str) -> Callable[[Any], None]:
        def hook(grad_outputs: Any) -> None:
            sync_device(self.device)
            self._switch(name, self.clock())
        return hook

    def _switch(self, name: str | None, now: float) -> None:
        if self._current is not None:
            self.backward[self._current] += now - self._since
        self._current = name
        self._since = now

    def finish(self) -> None:
        """Close the last interval: call right after the backward returns."""
        sync_device(self.device)
        self._switch(None, self.clock())


class _Ticker:
    """The clock the timed GraphModule reads after every compute node (one per forward run)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = clock_for(device)
        self.forward: dict[str, float] = {}
        self.grad_fns: list[tuple[str, list[Any]]] = []
        self.last = 0.0

    def start(self) -> None:
        sync_device(self.device)
        self.last = self.clock()

    def tick(self, name: str, value: Any) -> None:
        sync_device(self.device)
        now = self.clock()
        self.forward[name] = now - self.last
        # Only the autograd nodes are kept here; hooking them (a graph walk) waits until
        # the forward is over, so that it does not disturb the timing of the next nodes.
        self.grad_fns.append((name, [t.grad_fn for t in tensors_in(value) if t.grad_fn is not None]))
        self.last = self.clock()


_TICKER: list[_Ticker] = []


def _tick(name: str, value: Any) -> None:
    """Called by the timed GraphModule after each compute node (see :func:`timed_module`)."""
    _TICKER[-1].tick(name, value)


def timed_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) that calls :func:`_tick` after every compute node.

    Generated code, not an :class:`torch.fx.Interpreter`: measured on the small zoo, the
    interpreter's own Python work between nodes made the nodes inside it 20-50% slower
    than in the model's forward (cold caches), while the ticks' sum stays within a few
    percent of the untimed GraphModule's forward. A node's interval runs from the previous
    tick to its own, so it also holds the generated code's glue before it (attribute
    fetches), which the real forward pays too.
    """
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)  # keeps an exported graph's pytree in/out handling
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op in COMPUTE_OPS:
            graph.call_function(_tick, (node.name, env[node]))
    return fx.GraphModule(gm, graph)


def _timed_forward(timed: fx.GraphModule, inputs: tuple, device: torch.device) -> tuple[Any, _Ticker]:
    ticker = _Ticker(device)
    _TICKER.append(ticker)
    try:
        ticker.start()
        out = timed(*inputs)
    finally:
        _TICKER.pop()
    return out, ticker


def timed_backward(outputs: list[torch.Tensor], device: torch.device, timer: _BackwardTimer | None = None) -> float:
    """Run the backward from ``outputs`` (gradient 1); its seconds on ``device``'s clock."""
    clock = clock_for(device)
    grads = [torch.ones_like(t) for t in outputs]
    sync_device(device)
    start = clock()
    torch.autograd.backward(outputs, grads)
    if timer is not None:
        timer.finish()
    sync_device(device)
    return clock() - start


def plain_step_seconds(gm: fx.GraphModule, inputs: Sequence[Any], device: torch.device) -> float:
    """Seconds of one plain forward + backward of ``gm`` on ``inputs`` (already on ``device``):
    no ticks and no hooks, the backward from the outputs with gradient 1, on ``device``'s
    clock (:func:`graphs.profile.op_timing.clock_for`), as the untimed rounds of
    :func:`in_situ_times` run it. The parameters' ``.grad`` are left as they were."""
    params = list(gm.parameters())
    saved = [p.grad for p in params]
    clock = clock_for(device)
    try:
        with torch.enable_grad():
            for p in params:
                p.grad = None
            sync_device(device)
            start = clock()
            outputs = differentiable_outputs(gm(*inputs))
            if outputs:
                timed_backward(outputs, device, None)
            sync_device(device)
            return clock() - start
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def differentiable_outputs(value: Any) -> list[torch.Tensor]:
    return [t for t in tensors_in(value) if t.requires_grad and t.grad_fn is not None]


class _ReferenceChain(torch.nn.Module):
    """Small layers, many autograd nodes: a graph whose rounds take milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.sum()


def reference_hook_seconds(device: torch.device) -> float:
    """The hooks' cost per autograd node on ``device``, measured by :func:`in_situ_times` on a
    small chain of layers, whose rounds are fast enough to repeat. What a hook costs is the
    engine's and the clock's, not the graph's: measured on the graph itself where its rounds
    allow (on rnnlm and nmt at test size 3.7-3.9 us per node here, 2026-12-06), else here."""
    torch.manual_seed(0)
    chain = fx.symbolic_trace(_ReferenceChain().to(device))
    stats: dict[str, Any] = {}
    in_situ_times(chain, (torch.randn(4, 8, device=device),), device, 5, stats)
    return float(stats["hook_seconds"])


def in_situ_times(gm: fx.GraphModule, example_inputs: Sequence[Any], device: torch.device,
                  repeats: int, stats: dict[str, Any] | None = None,
                  after_backward: Callable[[fx.GraphModule, bool, bool], None] | None = None
                  ) -> dict[str, tuple[float, float]]:
    """Median (forward, backward) seconds of every compute node, timed in place (module doc).

    ``repeats`` timed runs (forward ticks + hooked backward; more for a fast graph, up to
    :data:`MAX_ROUNDS` within about :data:`MIN_SECONDS`; fewer for a slow one, as many as fill
    :data:`SLOW_SECONDS`, with the hooks' cost then from :func:`reference_hook_seconds`) alternate with as many untimed ones (plain forward + backward); the hooks' cost per autograd node is
    median(hooked - plain backward, paired by round) / autograd nodes, measured on this graph, and
    is subtracted from each node's backward. Raises whatever the graph raises when it
    cannot run whole on ``device`` (the caller falls back to isolated timing). ``stats``,
    when given, receives ``autograd_nodes`` (backward ops of one step) and
    ``hook_seconds`` (the hooks' measured cost per autograd node). ``after_backward(gm,
    timed_run, record)``, when given, runs after every backward with the fresh gradients
    (the graph actually run, whether the run was a timed one, whether this is a recorded
    round rather than the warm-up): the optimizer updates are timed there
    (:class:`graphs.profile.optimizer_timing.InSituOptimizerTimer`).
    """
    if device.type == "cpu":
        work, inputs = gm, tuple(example_inputs)
    else:
        work = copy.deepcopy(gm).to(device)
        inputs = tuple(map_tensors(lambda t: t.to(device), tuple(example_inputs)))
    timed_gm = timed_module(work)
    params = list(work.parameters())
    saved = [p.grad for p in params]
    tickers: list[_Ticker] = []
    timers: list[_BackwardTimer] = []
    hooked: list[float] = []
    plain: list[float] = []
    try:
        with torch.enable_grad():
            rounds = repeats + 1  # the first round is the warm-up
            i = 0
            while i < rounds:
                round_start = time.perf_counter()
                # As after optimizer.zero_grad() (set_to_none, the default): every backward
                # allocates fresh parameter gradients, which for a large model is real time.
                for p in params:
                    p.grad = None
                out, ticker = _timed_forward(timed_gm, inputs, device)
                outputs = differentiable_outputs(out)
                del out
                timer = _BackwardTimer(device)
                for name, fns in ticker.grad_fns:
                    timer.hook(name, fns)
                ticker.grad_fns.clear()
                try:
                    seconds = timed_backward(outputs, device, timer) if outputs else 0.0
                finally:
                    timer.release()
                del outputs
                if after_backward is not None:
                    after_backward(work, True, i > 0)
                for p in params:
                    p.grad = None
                outputs = differentiable_outputs(work(*inputs))
                untimed = timed_backward(outputs, device, None) if outputs else 0.0
                del outputs
                if after_backward is not None:
                    after_backward(work, False, i > 0)
                if i > 0:
                    tickers.append(ticker)
                    timers.append(timer)
                    hooked.append(seconds)
                    plain.append(untimed)
                else:
                    spent = time.perf_counter() - round_start
                    if spent > SLOW_ROUND_S:
                        # A slow graph gets fewer: minutes of profiling before any search.
                        rounds = 1 + max(1, min(repeats, math.ceil(SLOW_SECONDS / spent)))
                    elif repeats > 1:
                        # A fast graph gets more rounds: the hooks' cost is a difference of two
                        # noisy totals, and medians over ~1 s of rounds steady it on a shared machine.
                        rounds += max(0, min(MAX_ROUNDS, int(MIN_SECONDS / max(spent, 1e-9))) - repeats)
                i += 1
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    overhead = clock_overhead(device)
    autograd_nodes = timers[0].autograd_nodes
    total_nodes = sum(autograd_nodes.values())
    per_autograd_node = 0.0
    if total_nodes and len(hooked) < MIN_HOOK_PAIRS:
        per_autograd_node = reference_hook_seconds(device)
    elif total_nodes:
        # Each timed run is paired with the untimed run right after it, so a load change
        # between rounds (a shared machine) cancels out of the difference.
        per_autograd_node = max(statistics.median(h - p for h, p in zip(hooked, plain)) / total_nodes, 0.0)
    if stats is not None:
        stats.update(autograd_nodes=total_nodes, hook_seconds=per_autograd_node)
    result: dict[str, tuple[float, float]] = {}
    for name in tickers[0].forward:
        fwd = statistics.median(t.forward[name] for t in tickers) - overhead
        bwd = statistics.median(t.backward.get(name, 0.0) for t in timers)
        if bwd > 0:
            bwd -= per_autograd_node * autograd_nodes.get(name, 0)
        result[name] = (max(fwd, 0.0), max(bwd, 0.0))
    return result
