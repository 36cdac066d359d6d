"""Profiling: each node's real forward, backward and optimizer-update time on each device kind.

Two methods for forward and backward (docs/contracts.md, design "Costs"); both run the
captured graph on the example inputs with autograd on.

``method="in_situ"`` (default, :mod:`graphs.profile.in_situ`): ``repeats`` whole forward +
backward runs of the graph (after a warm-up run) time every compute node where it really
runs — its forward by clock ticks in a generated copy of the graph, and its backward as
the time from each autograd node it created to the next one, read by autograd hooks.
Measured here, node times taken in place add up to the real step; taken alone in a loop,
forwards read up to 3x too fast (hot caches) and backwards up to 2x too slow (the
engine's set-up paid once per op).

Optimizer updates (:mod:`graphs.profile.optimizer_timing`, both methods): the model's own
optimizer stepped over copies of each parameter-owning node's parameters (``opt_time``).

``method="isolated"`` (and the fallback when the whole graph cannot run on a device, e.g.
a model that creates CPU tensors while on CUDA; the reason is reported in
``profile_info``): one run under a :class:`torch.fx.Interpreter` records every node's real
inputs; each distinct *signature* —
the op (module type, ``extra_repr``, parameter shapes, or the function / method), the
shapes, dtypes, strides and autograd flags of its tensor inputs, every non-tensor
argument — is timed once, alone (:func:`graphs.profile.op_timing.time_call`), and reused by every
node with that signature (the same LSTM cell at every unrolled time step), so a
50,000-node graph costs a few hundred timings. Forward = median of looped calls;
backward = median of ``torch.autograd.grad`` over inputs and parameters, minus the
engine's fixed per-call cost.

CUDA is synchronised around every timed region. The clock is
:func:`graphs.profile.op_timing.clock_for`: this thread's CPU time on the CPU (robust to other
processes sharing the cores), wall time on CUDA.

Decisions: ``placeholder``, ``get_attr`` and ``output`` nodes cost 0 (they run no kernel;
the transfer of their tensors is costed on edges). Views and shape queries *are* timed
like any other call: each costs a microsecond or two of dispatcher time, which is real in a
training step and keeps the sum of node times close to the measured step.

CPU runs at one thread (``torch.set_num_threads(1)``), restored afterwards. Results are
cached as JSON under ``cache_dir`` (default ``$PLACER_CACHE_DIR`` or
``~/.cache/placer/profiles``), one file per (fingerprint, input shapes, device kind,
device name); :mod:`graphs.profile.cache` holds that concept.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from graphs.capture import CapturedModel
from graphs.errors import GraphError
from graphs.model_file import default_loss, default_optimizer, preserved_buffers
from graphs.profile.cache import NodeTimes, ProfileCache, device_name, inputs_key
from graphs.profile.in_situ import COMPUTE_OPS, in_situ_times
from graphs.profile.op_timing import median_loop, one_cpu_thread, time_call, tree_map
from graphs.profile.optimizer_timing import (
    InSituOptimizerTimer,
    OptimizerFn,
    OptimizerTimes,
    node_parameters,
    optimizer_key,
    optimizer_kind,
    optimizer_times,
)


class ProfileError(GraphError):
    """Profiling was asked for something it cannot do (bad device, mismatched graph, inputs that do not run)."""


@dataclass
class ProfileInfo:
    """What one profiling pass did on one device kind (stored in ``graph.graph["profile_info"]``)."""

    kind: str
    device_name: str
    cached: bool
    signatures: int = 0
    compute_nodes: int = 0
    seconds: float = 0.0
    method: str = ""
    failures: list[str] = field(default_factory=list)
    optimizer_fixed: float = 0.0  # seconds of the optimizer step no node owns (paid once per step)
    optimizer_whole: float = 0.0  # seconds of the optimizer step over all parameters, timed alone
    autograd_nodes: int = 0  # backward ops of one step (in situ); with the compute nodes and the
    #                          parameter updates, the op count of a TF-style training graph

    def as_dict(self) -> dict[str, Any]:
        return {"device_name": self.device_name, "cached": self.cached, "signatures": self.signatures,
                "compute_nodes": self.compute_nodes, "seconds": self.seconds,
                "method": self.method, "optimizer_fixed": self.optimizer_fixed,
                "optimizer_whole": self.optimizer_whole, "autograd_nodes": self.autograd_nodes,
                "failures": list(self.failures)}


# --------------------------------------------------------------------------- devices


def resolve_devices(devices: Sequence[str | torch.device] | None) -> list[torch.device]:
    """The devices to profile: default cpu plus cuda:0 when present; one device per kind.

    Raises :class:`ProfileError` for an unknown device, a cuda device that is not present,
    or two devices of the same kind (times are keyed by kind).
    """
    if devices is None:
        found = [torch.device("cpu")]
        if torch.cuda.is_available():
            found.append(torch.device("cuda", 0))
        return found
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    result: list[torch.device] = []
    for item in devices:
        try:
            dev = torch.device(item)
        except (RuntimeError, TypeError) as exc:
            raise ProfileError(f"cannot profile on device {item!r}: expected 'cpu' or 'cuda[:i]'") from exc
        if dev.type not in ("cpu", "cuda"):
            raise ProfileError(f"cannot profile on device {item!r}: only 'cpu' and 'cuda[:i]' are supported")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ProfileError(f"cannot profile on {item!r}: no CUDA device is available here")
            index = 0 if dev.index is None else dev.index
            if index >= torch.cuda.device_count():
                raise ProfileError(f"cannot profile on {item!r}: only {torch.cuda.device_count()} "
                                   "CUDA device(s) present")
            dev = torch.device("cuda", index)
        if any(d.type == dev.type for d in result):
            raise ProfileError(f"devices {[str(d) for d in result]} and {str(dev)!r} have the same kind; "
                               "times are keyed by device kind, so pass one device per kind")
        result.append(dev)
    if not result:
        raise ProfileError("no device to profile on: expected at least one of 'cpu', 'cuda[:i]'")
    return result


# --------------------------------------------------------------------------- signatures


def _value_signature(value: Any) -> Any:
    """A hashable description of an argument: tensors by layout, everything else by value."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), str(value.dtype), tuple(value.stride()), bool(value.requires_grad))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _value_signature(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(...))):
        return (type(value).__name__, repr(value))
    return (type(value).__qualname__, repr(value))


def _module_signature(module: nn.Module) -> tuple:
    # Type, constructor settings (stride, padding, ...), mode and every tensor's layout:
    # two modules with equal signatures do the same work on the same inputs.
    tensors = tuple((name, tuple(t.shape), str(t.dtype), bool(t.requires_grad))
                    for name, t in list(module.named_parameters()) + list(module.named_buffers()))
    return (type(module).__module__, type(module).__qualname__, module.extra_repr(), module.training, tensors)


def node_signature(node: fx.Node, module: nn.Module | None, args: tuple, kwargs: dict) -> tuple:
    """The signature under which ``node``'s timing is shared with identical calls."""
    if node.op == "call_module":
        assert module is not None
        op: Any = ("module", _module_signature(module))
    elif node.op == "call_method":
        op = ("method", str(node.target))
    else:
        op = ("function", node.target)
    return (op, _value_signature(args), _value_signature(kwargs))


# --------------------------------------------------------------------------- the pass


def _callable_for(node: fx.Node, gm: nn.Module, device: torch.device
                  ) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    if node.op == "call_module":
        module = copy.deepcopy(gm.get_submodule(str(node.target))).to(device)
        return module, list(module.parameters())
    if node.op == "call_method":
        name = str(node.target)
        return (lambda self_, *a, **k: getattr(self_, name)(*a, **k)), []
    if isinstance(node.target, str):  # fx gives call_function nodes a callable target
        raise ProfileError(f"node {node.name!r} ({node.op}) has no callable target {node.target!r}")
    return node.target, []


class _ProfilingInterpreter(fx.Interpreter):
    """Runs the graph once; times every node whose signature is new on every device."""

    def __init__(self, gm: fx.GraphModule, devices: list[torch.device], repeats: int,
                 infos: dict[str, ProfileInfo]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.devices = devices
        self.repeats = repeats
        self.infos = infos
        self.by_signature: dict[tuple, dict[str, tuple[float, float]]] = {}
        self.times: dict[str, dict[str, tuple[float, float]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op in COMPUTE_OPS:
                self._time(n, args, kwargs)
            try:
                return getattr(self, n.op)(n.target, args, kwargs)
            except Exception as exc:
                raise ProfileError(
                    f"the example inputs do not run through node {n.name!r} ({n.op} {n.target}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; expected "
                    "the inputs the graph was captured with") from exc

    def _time(self, n: fx.Node, args: tuple, kwargs: dict) -> None:
        module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
        try:
            sig = node_signature(n, module, args, kwargs)
            hash(sig)
        except TypeError:  # an unhashable constant argument: time this node on its own
            sig = ("node", n.name)
        known = self.by_signature.get(sig)
        if known is None:
            known = {}
            for dev in self.devices:
                info = self.infos[dev.type]
                start = time.perf_counter()
                known[dev.type] = self._time_on(n, args, kwargs, dev, info)
                info.seconds += time.perf_counter() - start
                info.signatures += 1
            self.by_signature[sig] = known
        for dev in self.devices:
            self.infos[dev.type].compute_nodes += 1
        self.times[n.name] = known

    def _time_on(self, n: fx.Node, args: tuple, kwargs: dict, dev: torch.device,
                 info: ProfileInfo) -> tuple[float, float]:
        fn, params = _callable_for(n, self.module, dev)
        try:
            return time_call(fn, args, kwargs, dev, self.repeats, params)
        except Exception as exc:  # noqa: BLE001 - an op that cannot run alone must not stop profiling
            # Fall back to the forward without autograd; backward is then estimated as 2x the
            # forward (the usual ratio for matmul-like ops) and the node is reported.
            info.failures.append(f"{n.name} timed without autograd: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            with torch.no_grad():
                fwd_args = tree_map(lambda t: t.detach().to(dev, copy=True), args)
                fwd_kwargs = tree_map(lambda t: t.detach().to(dev, copy=True), kwargs)
                try:
                    fwd = median_loop(lambda: fn(*fwd_args, **fwd_kwargs), dev, self.repeats, 1)
                except Exception:  # noqa: BLE001
                    fwd = 0.0
            return fwd, 2.0 * fwd


def _fingerprint(captured: CapturedModel) -> str | None:
    return captured.fingerprint or captured.graph.graph.get("fingerprint")


def profile_graph(captured: CapturedModel, example_inputs: Sequence[Any], devices: Sequence[str | torch.device] | None = None,
                  repeats: int = 5, cache_dir: str | None = None, *, use_cache: bool = True,
                  method: str = "in_situ", optimizer_fn: OptimizerFn | None = None) -> None:
    """Annotate every node of ``captured.graph`` with ``fwd_time``, ``bwd_time``, ``opt_time`` and ``time``.

    ``captured`` is a :class:`graphs.capture.CapturedModel`: its ``.gm`` (whose node names are
    the graph's nodes) is timed, its ``.graph`` annotated, its ``.fingerprint`` keys the cache.
    Times are seconds keyed by device kind (``"cpu"``, ``"cuda"``); ``devices`` defaults to
    cpu plus cuda:0 when present. ``graph.graph["profiled_kinds"]`` lists the kinds with
    times, ``graph.graph["profile_info"]`` says per kind whether it came from the cache and
    how many distinct signatures were timed. Cached per fingerprint, input shapes, kind and
    device name under ``cache_dir`` (``use_cache=False`` neither reads nor writes it).

    ``opt_time[kind]`` is the node's share of the optimizer step
    (:mod:`graphs.profile.optimizer_timing`): the update of the parameters it owns by the model's
    own optimizer ``optimizer_fn(params)`` (default: the model-file default, plain SGD);
    0 for nodes owning no trainable parameter; absent for a node whose update could not be
    timed. ``time = fwd_time + bwd_time + opt_time`` (the node's cost in a training step).
    ``graph.graph["optimizer"]`` is the optimizer's kind (``"adam"``, ``"sgd_momentum"``, ...)
    and ``profile_info[kind]["optimizer_fixed"]`` the step's fixed cost, paid once per step
    and by no node.
    """
    gm, graph = captured.gm, captured.graph
    if not isinstance(gm, fx.GraphModule) or not isinstance(graph, nx.DiGraph):
        raise ProfileError("profile_graph expects a captured model with .gm (torch.fx.GraphModule) and "
                           f".graph (networkx.DiGraph), got {type(captured).__name__}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"repeats must be a positive integer, got {repeats!r}")
    if method not in ("in_situ", "isolated"):
        raise ProfileError(f"method must be 'in_situ' or 'isolated', got {method!r}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    names = [n.name for n in gm.graph.nodes]
    if set(names) != set(graph.nodes):
        missing = sorted(set(graph.nodes) - set(names))[:3] or sorted(set(names) - set(graph.nodes))[:3]
        raise ProfileError(f"the GraphModule and the placement graph do not have the same nodes (e.g. {missing}); "
                           "expected the .gm and .graph of one capture")
    devs = resolve_devices(devices)

    optimizer_fn = optimizer_fn or default_optimizer
    try:
        opt_key, opt_kind = optimizer_key(optimizer_fn), optimizer_kind(optimizer_fn)
    except Exception as exc:  # noqa: BLE001 - a user's get_optimizer
        raise ProfileError(f"cannot build the optimizer to profile its step: {type(exc).__name__}: {exc}; "
                           "expected optimizer_fn(params) to return a torch.optim.Optimizer") from exc

    fingerprint = _fingerprint(captured)
    cache = ProfileCache(cache_dir) if use_cache and fingerprint else None
    # The two methods give different numbers, and optimizer times depend on the optimizer:
    # each combination has its own cache entry.
    key_inputs = (inputs_key(example_inputs) + ("" if method == "in_situ" else "-isolated")
                  + f"-opt{opt_key}")
    results: dict[str, dict[str, NodeTimes]] = {}
    metas: dict[str, dict[str, Any]] = {}
    infos: dict[str, ProfileInfo] = {}
    todo: list[torch.device] = []
    for dev in devs:
        dname = device_name(dev)
        loaded = cache.load(fingerprint, key_inputs, dev.type, dname, names) if cache and fingerprint else None
        if loaded is not None:
            results[dev.type], metas[dev.type] = loaded
            infos[dev.type] = ProfileInfo(dev.type, dname, cached=True)
        else:
            todo.append(dev)
            infos[dev.type] = ProfileInfo(dev.type, dname, cached=False)

    if todo:
        measured, updates = _measure(gm, example_inputs, todo, repeats, infos, method, optimizer_fn)
        for dev in todo:
            opt = updates[dev.type]
            infos[dev.type].failures.extend(opt.failures)
            per_node: dict[str, NodeTimes] = {}
            for name in names:
                fwd, bwd = measured.get(name, {}).get(dev.type, (0.0, 0.0))
                failed = name in opt.failed_nodes
                per_node[name] = (fwd, bwd, None if failed else opt.per_node.get(name, 0.0))
            results[dev.type] = per_node
            metas[dev.type] = {"optimizer": opt.kind, "optimizer_fixed": opt.fixed,
                               "optimizer_whole": opt.whole,
                               "autograd_nodes": infos[dev.type].autograd_nodes,
                               "method": infos[dev.type].method}
            if cache and fingerprint:
                cache.store(fingerprint, key_inputs, dev.type, infos[dev.type].device_name, per_node,
                            metas[dev.type])
            for failure in infos[dev.type].failures:
                warnings.warn(f"profiling on {dev.type}: {failure}", stacklevel=2)

    owned = node_parameters(gm)
    for name, data in graph.nodes(data=True):
        # How many tensors the node's optimizer update touches: the cost model's per-tensor
        # overhead where a kind was not profiled.
        data["param_tensors"] = len(owned.get(name, ()))
        for kind, per_node in results.items():
            fwd, bwd, opt_s = per_node.get(name, (0.0, 0.0, 0.0))
            data.setdefault("fwd_time", {})[kind] = float(fwd)
            data.setdefault("bwd_time", {})[kind] = float(bwd)
            opt_times = data.setdefault("opt_time", {})
            if opt_s is None:
                opt_times.pop(kind, None)
            else:
                opt_times[kind] = float(opt_s)
            data.setdefault("time", {})[kind] = float(fwd) + float(bwd) + float(opt_s or 0.0)
    kinds = list(dict.fromkeys(list(graph.graph.get("profiled_kinds") or []) + [d.type for d in devs]))
    graph.graph["profiled_kinds"] = kinds
    graph.graph["optimizer"] = opt_kind
    for kind, meta in metas.items():
        infos[kind].optimizer_fixed = float(meta.get("optimizer_fixed", 0.0))
        infos[kind].optimizer_whole = float(meta.get("optimizer_whole", 0.0))
        infos[kind].autograd_nodes = int(meta.get("autograd_nodes", 0))
        # Which method the times came from (a cached file keeps it): the micro-batch profile
        # (graphs.profile.batch_scaling) must use the same one.
        infos[kind].method = infos[kind].method or str(meta.get("method", ""))
    info_attr = dict(graph.graph.get("profile_info") or {})
    info_attr.update({kind: info.as_dict() for kind, info in infos.items()})
    graph.graph["profile_info"] = info_attr


def _measure(gm: fx.GraphModule, example_inputs: Sequence[Any], devices: list[torch.device], repeats: int,
             infos: dict[str, ProfileInfo], method: str, optimizer_fn: OptimizerFn
             ) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, OptimizerTimes]]:
    """Forward/backward times per node and device, and the optimizer updates per device kind."""
    times: dict[str, dict[str, tuple[float, float]]] = {}
    updates: dict[str, OptimizerTimes] = {}
    isolated: list[torch.device] = []
    # Runs of the real model update BatchNorm statistics and the like: profiling leaves no trace.
    with one_cpu_thread(), torch.enable_grad(), preserved_buffers(gm):
        for dev in devices:
            if method == "isolated":
                isolated.append(dev)
                continue
            start = time.perf_counter()
            opt_timer = InSituOptimizerTimer(optimizer_fn, dev)
            try:
                stats: dict[str, Any] = {}
                measured = in_situ_times(gm, example_inputs, dev, repeats, stats, opt_timer.after_backward)
                infos[dev.type].autograd_nodes = int(stats.get("autograd_nodes", 0))
            except Exception as exc:  # noqa: BLE001 - e.g. a model that makes CPU tensors while on CUDA
                infos[dev.type].failures.append(f"in-situ run: {type(exc).__name__}: "
                                                f"{str(exc).splitlines()[0] if str(exc) else ''}")
                isolated.append(dev)
                continue
            finally:
                opt_timer.restore()
            updates[dev.type] = opt_timer.result()
            infos[dev.type].method = "in_situ"
            infos[dev.type].compute_nodes = len(measured)
            infos[dev.type].seconds = time.perf_counter() - start
            for name, pair in measured.items():
                times.setdefault(name, {})[dev.type] = pair
        if isolated:
            interp = _ProfilingInterpreter(gm, isolated, repeats, infos)
            interp.run(*example_inputs)
            for name, per_dev in interp.times.items():
                times.setdefault(name, {}).update(per_dev)
            for dev in isolated:
                infos[dev.type].method = "isolated"
                start = time.perf_counter()
                updates[dev.type] = optimizer_times(gm, optimizer_fn, dev, repeats)
                infos[dev.type].seconds += time.perf_counter() - start
    return times, updates


# --------------------------------------------------------------------------- whole step


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
    ``loss_fn(output, *inputs)`` defaults to the mean of the first output tensor,
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
    with one_cpu_thread():
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
