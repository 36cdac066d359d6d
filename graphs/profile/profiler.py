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

``method="isolated"`` (:mod:`graphs.profile.isolated`; also the fallback when the whole graph
cannot run on a device, e.g. a model that creates CPU tensors while on CUDA; the reason is
reported in ``profile_info``, :class:`graphs.profile.profile_info.ProfileInfo`): every distinct
op signature (:mod:`graphs.profile.signatures`) timed once, alone, and reused by every node
that has it.

CUDA is synchronised around every timed region. The clock is
:func:`graphs.profile.op_timing.clock_for`: this thread's CPU time on the CPU (robust to other
processes sharing the cores), wall time on CUDA. The devices are chosen by
:func:`graphs.profile.devices.resolve_devices`; errors are
:class:`graphs.profile.errors.ProfileError`.

Decisions: ``placeholder``, ``get_attr`` and ``output`` nodes cost 0 (they run no kernel;
the transfer of their tensors is costed on edges). Views and shape queries *are* timed
like any other call: each costs a microsecond or two of dispatcher time, which is real in a
training step and keeps the sum of node times close to the measured step.

CPU runs at one thread (``torch.set_num_threads(1)``), restored afterwards. Results are
cached as JSON under ``cache_dir`` (default ``$PLACER_CACHE_DIR`` or
``~/.cache/placer/profiles``), one file per (fingerprint, input shapes, device kind,
device name); :mod:`graphs.profile.cache` holds that concept. Whole training steps, timed
by phase to compare with the sum of node times, are :mod:`graphs.profile.step_timing`'s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from graphs.buffers import preserved_buffers
from graphs.capture import CapturedModel
from graphs.fingerprint import computation_key
from graphs.model_file import default_optimizer
from graphs.profile.cache import NodeTimes, ProfileCache, device_name, inputs_key
from graphs.profile.devices import resolve_devices
from graphs.profile.errors import ProfileError
from graphs.profile.in_situ import in_situ_times
from graphs.profile.isolated import ProfilingInterpreter
from graphs.profile.op_timing import worker_conditions
from graphs.profile.optimizer_timing import (
    InSituOptimizerTimer,
    OptimizerFn,
    OptimizerTimes,
    node_parameters,
    optimizer_key,
    optimizer_kind,
    optimizer_times,
)
from graphs.profile.profile_info import ProfileInfo


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
                  + f"-opt{opt_key}-c{computation_key(gm)}")
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
    with worker_conditions(), torch.enable_grad(), preserved_buffers(gm):
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
            interp = ProfilingInterpreter(gm, isolated, repeats, infos)
            interp.run(*example_inputs)
            for name, per_dev in interp.times.items():
                times.setdefault(name, {}).update(per_dev)
            for dev in isolated:
                infos[dev.type].method = "isolated"
                start = time.perf_counter()
                updates[dev.type] = optimizer_times(gm, optimizer_fn, dev, repeats)
                infos[dev.type].seconds += time.perf_counter() - start
    return times, updates
