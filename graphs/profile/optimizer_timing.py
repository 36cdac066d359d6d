"""Each node's share of the optimizer step: the model's own optimizer, timed on that node's parameters.

A training step ends with ``optimizer.step()``; on a small model it is 15-40% of the step
(measured: ResNet-50 small with SGD+momentum 2.2 of 12.6 ms, GPT-2 small with AdamW 1.0 of
2.6 ms). Its cost belongs to the nodes that own parameters: a parameter is updated where
it lives, and it lives with the node that owns it (the first node that uses it, the rule of
``param_bytes`` in :mod:`graphs.placement_graph`).

How it is timed: the model's own optimizer (``optimizer_fn(params)``, the model file's
``get_optimizer``) is built over just one node's trainable parameters and stepped. In the
in-situ profile (default, :class:`InSituOptimizerTimer`) that happens on the real
parameters right after each real backward of the profiling runs, on its fresh gradients,
and the parameters are restored afterwards; in the isolated profile
(:func:`optimizer_times`) on copies with random gradients, in a loop. After a warm-up step
(which creates lazy state, e.g. Adam's moments) the median of ``repeats`` steps is the
node's time, minus the optimizer's fixed per-step cost (Python set-up a real step pays
once, not once per node; solved from the node steps and one whole step, see
:func:`optimizer_times`).

Why not time the whole step and split it by parameter bytes: torch's CPU optimizers loop
over the tensors one by one, and a tensor's update costs a fixed few microseconds plus
its bytes, so a split by bytes gives a 4-element BatchNorm bias nothing although it
costs about as much as a small convolution's weight. Measured on the small zoo (whole
step split by bytes vs each node's timed update, four runs): a median error per node of
52-166% (ResNet-50 94-96%, Inception-V3 98%, GPT-2 59-96%, NMT 71-89%, RNNLM 52-166%,
MoE 62-75%),
while the node times plus one fixed cost add up to the whole step within a few percent
(``benchmarks/bench_capture.py`` compares them with the step's optimizer phase).
Profiling trains nothing.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphs.placement_graph import fetch_attr
from graphs.profile.op_timing import clock_for, inner_loops, median_loop, sync_device, timed_once

# torch.optim optimizers take any tensors (ParamsT); profiling builds them over parameters and scratch tensors.
OptimizerFn = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def _trainable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and (t.is_floating_point() or t.is_complex())


def node_parameters(gm: fx.GraphModule) -> dict[str, list[torch.Tensor]]:
    """The trainable parameters each node owns: a parameter belongs to the first node that uses it.

    Same ownership as ``param_bytes`` (call_module: the module's parameters; get_attr: the
    tensor), restricted to tensors that require grad (buffers and frozen weights are not
    updated). Nodes owning none are absent.
    """
    seen: set[int] = set()
    owned: dict[str, list[torch.Tensor]] = {}
    for node in gm.graph.nodes:
        tensors: list[torch.Tensor]
        if node.op == "call_module":
            tensors = list(gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            value = fetch_attr(gm, str(node.target))
            tensors = [value] if isinstance(value, torch.Tensor) else []
        else:
            continue
        mine = []
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if _trainable(t):
                mine.append(t)
        if mine:
            owned[node.name] = mine
    return owned


def _probe(optimizer_fn: OptimizerFn) -> torch.optim.Optimizer:
    return optimizer_fn([torch.nn.Parameter(torch.zeros(1))])


def optimizer_kind(optimizer_fn: OptimizerFn) -> str:
    """The optimizer's short name: ``"sgd"``, ``"sgd_momentum"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ...

    The lower-cased class name, split by the settings that change its state size: SGD by
    momentum, Adam and AdamW by ``amsgrad`` (``"adam_amsgrad"``), RMSprop by ``centered``
    and ``momentum`` (``"rmsprop_centered_momentum"``). These are the keys of
    ``envs.sim.optimizer_state.OPTIMIZER_STATE_FACTOR``.
    """
    opt = _probe(optimizer_fn)
    name = type(opt).__name__.lower()
    if name == "sgd":
        return "sgd_momentum" if opt.defaults.get("momentum", 0) else "sgd"
    if name in ("adam", "adamw") and opt.defaults.get("amsgrad"):
        return f"{name}_amsgrad"
    if name == "rmsprop":
        extra = [word for word, on in (("centered", opt.defaults.get("centered")),
                                       ("momentum", opt.defaults.get("momentum", 0))) if on]
        return "_".join([name, *extra])
    return name


def optimizer_key(optimizer_fn: OptimizerFn) -> str:
    """Short stable hash of the optimizer's class and settings (a profile cache key part)."""
    opt = _probe(optimizer_fn)
    settings = sorted((k, repr(v)) for k, v in opt.defaults.items())
    text = f"{type(opt).__module__}.{type(opt).__qualname__}{settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _copies(params: list[torch.Tensor], device: torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    copies = []
    for p in params:
        c = p.detach().to(device, copy=True).requires_grad_(True)
        # Small gradients: repeated steps must not blow the copies up (the time does not
        # depend on the values for these dense kernels).
        c.grad = (torch.randn(c.shape, generator=generator, dtype=c.dtype) * 1e-3).to(device)
        copies.append(c)
    return copies


class _Step:
    """An optimizer built over some tensors (with gradients), warmed up, ready to be timed step by step."""

    def __init__(self, optimizer_fn: OptimizerFn, tensors: list[torch.Tensor], device: torch.device) -> None:
        self.device = device
        self.optimizer = optimizer_fn(tensors)
        self.optimizer.step()  # warm-up: lazy state (moments), allocator, kernel selection
        self.inner = inner_loops(timed_once(self.optimizer.step, device))

    def sample(self) -> float:
        """Seconds of one step (a fast step is looped, see :func:`graphs.profile.op_timing.inner_loops`)."""
        return median_loop(self.optimizer.step, self.device, 1, self.inner)


def time_step(optimizer_fn: OptimizerFn, params: list[torch.Tensor], device: torch.device,
              repeats: int) -> float:
    """Median seconds of one ``optimizer_fn(copies).step()`` over copies of ``params`` on ``device``."""
    step = _Step(optimizer_fn, _copies(params, device, torch.Generator().manual_seed(0)), device)
    return statistics.median(step.sample() for _ in range(repeats))


@dataclass
class OptimizerTimes:
    """Optimizer update seconds per parameter-owning node on one device, plus the step's fixed cost."""

    per_node: dict[str, float]
    fixed: float
    whole: float
    kind: str
    failures: list[str] = field(default_factory=list)
    failed_nodes: set[str] = field(default_factory=set)


def optimizer_times(gm: fx.GraphModule, optimizer_fn: OptimizerFn, device: torch.device,
                    repeats: int) -> OptimizerTimes:
    """Time every parameter-owning node's optimizer update (module doc).

    Each node's step is timed alone, and one step over all the parameters; the samples are
    taken in rounds (every step once per round, ``repeats`` rounds, medians kept), so all
    of them see the same load on a shared machine. A timed node step is ``F + its tensors'
    work`` and the whole step ``F + all tensors' work``, so the fixed per-step cost is
    ``F = (sum of node steps - whole step) / (nodes - 1)``: solved on this graph, not
    guessed, and capped so that every node keeps at least the cost of as many one-element
    tensors as it owns (a one-element tensor's update, from steps over 1 and 9 of them in
    the same rounds, is the least any tensor's update costs). Each node keeps ``its step -
    F``, so the node times plus one ``F`` add up to the whole step; ``F`` is reported apart
    (``fixed``). A node whose update cannot be timed (an optimizer that refuses a subset of
    the parameters, say) is left out and reported in ``failures``; the cost model then
    estimates it.
    """
    generator = torch.Generator().manual_seed(0)
    failures: list[str] = []
    failed: set[str] = set()
    copies: dict[str, list[torch.Tensor]] = {}
    steps: dict[str, _Step] = {}
    for name, params in node_parameters(gm).items():
        try:
            copies[name] = _copies(params, device, generator)
            steps[name] = _Step(optimizer_fn, copies[name], device)
        except Exception as exc:  # noqa: BLE001 - one node must not stop profiling
            copies.pop(name, None)
            failed.add(name)
            failures.append(f"{name}: optimizer step not timed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}")
    kind = optimizer_kind(optimizer_fn)
    if not steps:
        return OptimizerTimes({}, 0.0, 0.0, kind, failures, failed)
    # The whole step updates the same copies as the node steps (its own state): no second copy.
    extra = {"(whole)": _Step(optimizer_fn, [t for name in steps for t in copies[name]], device)}
    if len(steps) >= 2:
        tiny = [torch.zeros(1, device=device, requires_grad=True) for _ in range(9)]
        for t in tiny:
            t.grad = torch.full_like(t, 1e-3)
        extra["(1 tiny)"] = _Step(optimizer_fn, tiny[:1], device)
        extra["(9 tiny)"] = _Step(optimizer_fn, tiny, device)
    rounds: dict[str, list[float]] = {key: [] for key in [*steps, *extra]}
    every = {**steps, **extra}
    for _ in range(repeats):
        for key, step in every.items():
            rounds[key].append(step.sample())
    raw = {key: statistics.median(samples) for key, samples in rounds.items()}
    whole = raw.pop("(whole)")
    per_tensor = max((raw.pop("(9 tiny)", 0.0) - raw.pop("(1 tiny)", 0.0)) / 8, 0.0)
    per_node, fixed = _shares(raw, whole, per_tensor, {name: len(copies[name]) for name in steps})
    return OptimizerTimes(per_node, fixed, whole, kind, failures, failed)


def _shares(raw: dict[str, float], whole: float, per_tensor: float,
            tensors: dict[str, int]) -> tuple[dict[str, float], float]:
    """Each node's share (its step minus the fixed cost F) and F; see :func:`optimizer_times`."""
    fixed = 0.0
    if len(raw) >= 2:
        cap = min(raw[name] - per_tensor * tensors[name] for name in raw)
        fixed = min(max((sum(raw.values()) - whole) / (len(raw) - 1), 0.0), max(cap, 0.0))
    return {name: raw[name] - fixed for name in raw}, fixed


def _share_state(whole: torch.optim.Optimizer, parts: Iterable[torch.optim.Optimizer]) -> None:
    """Make ``whole`` use the per-parameter state of the optimizers in ``parts`` (one state per parameter).

    A training step has one optimizer state per parameter, touched once a step. Two
    optimizers over the same parameters keep two, each touched every other run, and on
    this VM memory left untouched for ~20 s costs up to 5x more to touch again (measured:
    an 800 MB ``add_`` took 35-44 ms hot and 205 ms after 20 s idle), so state kept apart
    made the timed updates slower than the real step's. The state dicts themselves are
    shared (an optimizer that creates its state lazily fills the shared dict in place).
    """
    for part in parts:
        for group in part.param_groups:
            for p in group["params"]:
                whole.state[p] = part.state[p]


class InSituOptimizerTimer:
    """Times the optimizer updates inside the in-situ runs, right after a real backward.

    An update timed in a loop runs with its parameters, gradients and state hot in the
    cache; in a training step it runs after the backward has swept the activations
    through the cache (measured on the small zoo: the step right after a backward
    costs 5-45% more than the same step repeated). So :func:`graphs.profile.in_situ.in_situ_times`
    calls :meth:`after_backward` after each backward: after a timed run every node's own
    optimizer (the model's optimizer over the node's parameters) steps once, timed; after
    an untimed run one optimizer over all parameters steps (the whole step), timed, then
    two over 1 and 9 one-element tensors (the least a tensor's update costs). The
    gradients are the real ones of that backward. The whole optimizer shares the node
    optimizers' per-parameter state (:func:`_share_state`): one state per parameter, as in
    a training step (two copies made the whole step of the paper RNNLM ~1.7x slower in
    user time than the real step's: medians ~1250 vs ~730 ms). Node shares and the fixed per-step cost
    come out as in :func:`optimizer_times`. The parameters are restored (:meth:`restore`)
    after the runs: profiling trains nothing.
    """

    def __init__(self, optimizer_fn: OptimizerFn, device: torch.device) -> None:
        self.optimizer_fn = optimizer_fn
        self.device = device
        self.clock = clock_for(device)
        self.kind = optimizer_kind(optimizer_fn)
        self.owned: dict[str, list[torch.Tensor]] | None = None
        self.nodes: dict[str, torch.optim.Optimizer] = {}
        self.whole: torch.optim.Optimizer | None = None
        self.tiny: list[torch.optim.Optimizer] = []
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.samples: dict[str, list[float]] = {}
        self.failures: list[str] = []
        self.failed: set[str] = set()

    def _build(self, gm: fx.GraphModule) -> None:
        self.owned = node_parameters(gm)
        self.saved = [(p, p.detach().clone()) for params in self.owned.values() for p in params]
        for name, params in self.owned.items():
            try:
                self.nodes[name] = self.optimizer_fn(params)
            except Exception as exc:  # noqa: BLE001 - one node must not stop profiling
                self.failed.add(name)
                self.failures.append(f"{name}: optimizer step not timed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
        if self.nodes:
            self.whole = self.optimizer_fn([p for name in self.nodes for p in self.owned[name]])
            _share_state(self.whole, self.nodes.values())
            tiny = [torch.zeros(1, device=self.device, requires_grad=True) for _ in range(9)]
            for t in tiny:
                t.grad = torch.full_like(t, 1e-3)
            self.tiny = [self.optimizer_fn(tiny[:1]), self.optimizer_fn(tiny)]

    def _timed(self, key: str, optimizer: torch.optim.Optimizer, record: bool) -> None:
        sync_device(self.device)
        start = self.clock()
        try:
            optimizer.step()
        except Exception as exc:  # noqa: BLE001 - e.g. an optimizer that needs a closure
            if key in self.nodes:
                del self.nodes[key]
                self.failed.add(key)
                self.failures.append(f"{key}: optimizer step not timed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
            return
        sync_device(self.device)
        if record:
            self.samples.setdefault(key, []).append(self.clock() - start)

    def after_backward(self, gm: fx.GraphModule, timed_run: bool, record: bool) -> None:
        """Step the node optimizers (after a timed run) or the whole one (after an untimed run),
        then put the parameters back: every run computes with the model's own weights.

        Left to accumulate, up to 60 steps on the profile's gradient of ones drove a
        bidirectional LSTM tagger's gates into saturation and its arithmetic into denormal
        floats (slow on x86 CPUs): its LSTM profiled at 50 + 345 ms, 18 + 31 ms with the
        denormals flushed, against a real training step of 53 ms at one thread.
        """
        if self.owned is None:
            self._build(gm)
        if timed_run:
            for name, optimizer in list(self.nodes.items()):
                self._timed(name, optimizer, record)
        elif self.whole is not None:
            self._timed("(whole)", self.whole, record)
            self._timed("(1 tiny)", self.tiny[0], record)
            self._timed("(9 tiny)", self.tiny[1], record)
        self._put_back()

    def _put_back(self) -> None:
        with torch.no_grad():
            for param, value in self.saved:
                param.copy_(value)

    def restore(self) -> None:
        """Put the parameters back as they were before the first step."""
        self._put_back()
        self.saved = []

    def result(self) -> OptimizerTimes:
        """Node shares, fixed cost and whole step from the medians of the recorded steps."""
        raw = {key: statistics.median(values) for key, values in self.samples.items()
               if key in self.nodes or key.startswith("(")}
        per_tensor = max((raw.pop("(9 tiny)", 0.0) - raw.pop("(1 tiny)", 0.0)) / 8, 0.0)
        if "(whole)" not in raw:  # the whole step could not run: no fixed cost can be solved
            return OptimizerTimes(raw, 0.0, sum(raw.values()), self.kind, list(self.failures), set(self.failed))
        whole = raw.pop("(whole)")
        per_node, fixed = _shares(raw, whole, per_tensor, {n: len((self.owned or {})[n]) for n in raw})
        return OptimizerTimes(per_node, fixed, whole, self.kind, list(self.failures), set(self.failed))
