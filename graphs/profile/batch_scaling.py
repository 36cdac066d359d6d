"""The part of each op's cost a smaller batch does not shrink: the graph profiled again on a micro-batch.

A pipeline runs every op on ``1/M`` of the batch and DDP on ``1/N``; the simulator
(``envs.sim.pipeline``, rule P2) costs an op there as ``fixed + (cost - fixed) / M``. The
fixed part is the per-call work (dispatch, kernel set-up, loops over channels whose
count does not depend on the batch), and it is far larger than the dispatch alone on
small feature maps: measured here (2026-12-05, benchmarks/results/pipeline.md,
"Calibrated"), resnet50's ops at 64x64 images cost 1.23x their batch-32 cost per sample at
batch 8, its late stages 1.5x, where gpt2's GEMMs (width 384) cost 1.05x at 16 of 256
samples. So it is measured: :func:`profile_fixed_parts` runs the in-situ profiler
(:func:`graphs.profile.in_situ.in_situ_times`, the method of the main profile) a second
time on the captured GraphModule with the example inputs cut along the batch dimension
(the model's ``batch_dim``, 0 unless its file says otherwise: the first ``B / r`` samples of
every input that has the batch there, as ``torch.distributed.pipelining`` splits
micro-batches), and fits per node and device kind
``cost(b) = fixed + per_sample * b`` through the two profiles (:func:`fixed_parts`).

**One sitting.** The fit amplifies any difference between the two profiles that is not the
batch's: a machine that runs 10% slower while the small profile is taken (load from other
processes: CPU time on this shared 2-core machine inflates with it) reads as a fixed part
of ``10% * r / (r - 1)`` of every op's cost. Measured here (2026-12-05, load 2.0): gpt2
(width 384, batch 256) profiled again at 32 summed 8% dearer per sample than its profile
from an hour before, and the pipeline at ``M = 16`` was predicted 3793 ms instead of 2889
(measured 2811-2874). So the whole step (a plain forward and backward, as in situ runs
them untimed) is also timed at both batch sizes, interleaved in one sitting
(:func:`step_ratio`), and the small profile is rescaled so that its sum over the ops is the
full profile's times that ratio: the profiles give each op's share, the sitting gives the
batch's effect on the whole.

The ratio ``r`` is the largest divisor of the batch that is at most :data:`MAX_RATIO` (and
above 1): micro-batches of 1/2 to 1/64 of the batch are what the pipeline search tries,
and a fit through ``B`` and ``B / 8`` sits in the middle of them. The result goes into the
graph: node attributes ``fwd_fixed[kind]`` and ``bwd_fixed[kind]`` (seconds, beside
``fwd_time``), and ``graph.graph["batch_scaling"]`` (the ratio, both batch sizes, the
kinds, the seconds it took, and ``accumulate_s``: what a backward of the micro-batch costs
more when it adds into ``.grad``, :mod:`graphs.profile.accumulate_timing`). The small
profile is cached like the main one (:class:`graphs.profile.cache.ProfileCache`; its own
key: the cut inputs' shapes).

A GraphModule that cannot run on the smaller batch (a shape baked in at capture: a
``view`` with constant sizes, a recurrent state traced at the batch's size), a batch with
no divisor in range, or a kind whose main profile was not taken in situ keeps the
simulator's default rule, with a log line saying why; it never fails the run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphs.buffers import preserved_buffers
from graphs.capture import CapturedModel
from graphs.fingerprint import computation_key
from graphs.graph_io import FIXED_DICTS as FIXED_ATTRS
from graphs.input_batch import batch_size_of, batch_slice, carries_batch
from graphs.profile.accumulate_timing import accumulate_seconds
from graphs.profile.cache import NodeTimes, ProfileCache, device_name, inputs_key
from graphs.profile.devices import resolve_devices
from graphs.profile.in_situ import in_situ_times, plain_step_seconds
from graphs.profile.op_timing import worker_conditions
from graphs.tensor_tree import map_tensors

__all__ = ["MAX_RATIO", "FIXED_ATTRS", "step_ratio", "BatchScalingInfo", "microbatch_ratio", "slice_batch", "fixed_parts",
           "profile_fixed_parts", "smallest_runnable_batch", "min_microbatch_samples"]

log = logging.getLogger(__name__)

#: The largest full-batch / small-batch ratio the second profile is taken at (module doc).
MAX_RATIO = 8

#: The cache key suffix of a micro-batch profile (forward and backward only, no optimizer).
_CACHE_TAG = "-microbatch"

#: Interleaved rounds of :func:`step_ratio` (at least :data:`MIN_ROUNDS`; more, up to
#: :data:`MAX_ROUNDS`, while they take under :data:`ROUNDS_SECONDS`).
MIN_ROUNDS, MAX_ROUNDS, ROUNDS_SECONDS = 3, 15, 2.0


@dataclass(frozen=True)
class BatchScalingInfo:
    """What :func:`profile_fixed_parts` measured (also in ``graph.graph["batch_scaling"]``).

    Attributes:
        ratio: the full batch over the small one.
        batch: the small batch.
        full_batch: the example inputs' batch.
        kinds: the device kinds that got fixed parts.
        seconds: wall seconds of the second profile (near 0 when cached).
        cached: every kind came from the profile cache.
        accumulate_s: {kind: seconds} a backward of the small batch costs more when it adds
            into ``.grad`` than after ``zero_grad`` (:mod:`graphs.profile.accumulate_timing`).
    """

    ratio: int
    batch: int
    full_batch: int
    kinds: tuple[str, ...]
    seconds: float
    cached: bool
    accumulate_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "batch": self.batch, "full_batch": self.full_batch, "kinds": list(self.kinds),
                "seconds": self.seconds, "cached": self.cached, "accumulate_s": dict(self.accumulate_s)}


def microbatch_ratio(batch: int, most: int = MAX_RATIO) -> int | None:
    """The largest divisor of ``batch`` in ``(1, most]``; None when there is none.

    >>> microbatch_ratio(32), microbatch_ratio(12), microbatch_ratio(13), microbatch_ratio(1)
    (8, 6, None, None)
    """
    for r in range(min(int(most), int(batch)), 1, -1):
        if batch % r == 0:
            return r
    return None


def slice_batch(example_inputs: Sequence[Any], batch: int, size: int, dim: int = 0) -> tuple[Any, ...]:
    """The first micro-batch of ``size`` samples: every tensor whose dim ``dim`` is ``batch``
    cut to its first ``size`` samples (``torch.tensor_split`` along the batch dimension, as the
    pipeline engine splits its inputs), every other value as it is."""
    def own(x: Any) -> Any:  # its own storage, as a received micro-batch has
        if not carries_batch(x, size, dim):
            return x
        return x.detach().clone().requires_grad_(x.requires_grad)

    return tuple(map_tensors(own, batch_slice(tuple(example_inputs), batch, 0, size, dim)))


def fixed_parts(full: np.ndarray, small: np.ndarray, ratio: float) -> np.ndarray:
    """Per op, the seconds that do not shrink with the batch, from its cost ``full`` at batch
    ``B`` and ``small`` at ``B / ratio``: ``cost(b) = fixed + per_sample * b`` through both,
    ``fixed = (ratio * small - full) / (ratio - 1)``, clipped to ``[0, full]`` (profiling
    noise can make an op cheaper per sample on the small batch, or dearer in all).

    The clip keeps one side of each op's noise, which the fit multiplies by
    ``ratio / (ratio - 1)``; summed over many ops that is a bias, and a pipeline pays its
    fixed parts on every micro-batch: gpt2's 200 ops (width 384, batch 256, profiled again at
    32) had clipped fixed parts summing to 47 ms where the fits of their sums (forward,
    backward) gave 16 and 0 ms, which at ``M = 16`` put about 0.23 s more on each rank. So the clipped parts are then scaled to sum to
    the fit of the ops' sums (itself clipped to ``[0, sum of full]``), and clipped again: the
    profile says which ops hold the fixed work, the sums how much there is.

    >>> fixed_parts(np.array([4.0, 2.0, 1.0]), np.array([1.0, 2.0, 0.5]), 4.0).tolist()
    [0.0, 2.0, 0.3333333333333333]
    >>> fixed_parts(np.array([4.0, 4.0]), np.array([1.3, 0.8]), 4.0).tolist()  # noise: 0.4 and -0.27
    [0.13333333333333344, 0.0]
    """
    if not ratio > 1.0:
        raise ValueError(f"the small batch must be smaller than the full one; got a ratio of {ratio}")
    full = np.asarray(full, dtype=np.float64)
    small = np.asarray(small, dtype=np.float64)
    per_op = np.clip((ratio * small - full) / (ratio - 1.0), 0.0, full)
    whole = float(np.clip((ratio * small.sum() - full.sum()) / (ratio - 1.0), 0.0, full.sum()))
    kept = float(per_op.sum())
    return np.minimum(per_op * (whole / kept), full) if kept > 0 else per_op


def step_ratio(gm: fx.GraphModule, full: tuple[Any, ...], small: tuple[Any, ...], device: torch.device) -> float:
    """Median over interleaved rounds of the whole step's seconds on ``small`` over those on
    ``full`` (:func:`graphs.profile.in_situ.plain_step_seconds`, after one warm-up of each):
    the batch's effect on the whole step, measured in one sitting (module doc)."""
    plain_step_seconds(gm, full, device)
    plain_step_seconds(gm, small, device)
    ratios: list[float] = []
    start = time.perf_counter()
    while len(ratios) < MIN_ROUNDS or (len(ratios) < MAX_ROUNDS and time.perf_counter() - start < ROUNDS_SECONDS):
        big = plain_step_seconds(gm, full, device)
        little = plain_step_seconds(gm, small, device)
        if big > 0:
            ratios.append(little / big)
    return float(np.median(ratios))


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def smallest_runnable_batch(gm: fx.GraphModule, inputs: tuple[Any, ...], batch: int, above: int,
                            device: torch.device, dim: int = 0) -> int:
    """The smallest divisor of ``batch`` above ``above`` samples on which one training step of
    ``gm`` runs (``batch`` itself when none smaller does): a model that fails on a micro-batch
    (batch norm on one sample, shapes fixed at capture) may still run on a larger one."""
    for size in range(above + 1, batch):
        if batch % size:
            continue
        try:  # fx prints a failing GraphModule's traceback to stderr before raising: a probe says nothing
            with worker_conditions(), torch.enable_grad(), preserved_buffers(gm), \
                    contextlib.redirect_stderr(io.StringIO()):
                plain_step_seconds(gm, slice_batch(inputs, batch, size, dim), device)
        except Exception:  # noqa: BLE001 - any failure: the model does not run on this many samples
            continue
        return size
    return batch


def min_microbatch_samples(graph: Any) -> int:
    """The fewest samples a micro-batch (or a DDP replica's share) of ``graph``'s model may
    have: 1, unless the micro-batch profile found the model failing on fewer
    (``graph.graph["batch_scaling"]["min_samples"]``, :func:`profile_fixed_parts`)."""
    scaling = graph.graph.get("batch_scaling") or {}
    value = scaling.get("min_samples", 1)
    return int(value) if isinstance(value, (int, float)) and value >= 1 else 1


def _small_times(gm: fx.GraphModule, full: tuple[Any, ...], inputs: tuple[Any, ...], dev: torch.device,
                 repeats: int, names: list[str], cache: ProfileCache | None,
                 fingerprint: str | None) -> tuple[dict[str, NodeTimes], float, float, bool]:
    """(per node (forward, backward, None) seconds on the small inputs, :func:`step_ratio`,
    :func:`~graphs.profile.accumulate_timing.accumulate_seconds` on the small inputs, whether
    from the cache)."""
    key = inputs_key(inputs) + _CACHE_TAG + f"-c{computation_key(gm)}"
    dname = device_name(dev)
    if cache is not None and fingerprint:
        loaded = cache.load(fingerprint, key, dev.type, dname, names)
        meta = loaded[1] if loaded is not None else {}
        ratio, extra = meta.get("step_ratio"), meta.get("accumulate_backward_s")
        # A file written before the accumulation was measured (backwards, floored by the adds:
        # graphs.profile.accumulate_timing) is profiled again.
        if (loaded is not None and isinstance(ratio, (int, float)) and ratio > 0
                and isinstance(extra, (int, float)) and extra >= 0):
            return loaded[0], float(ratio), float(extra), True
    with worker_conditions(), torch.enable_grad(), preserved_buffers(gm):
        measured = in_situ_times(gm, inputs, dev, repeats)
        ratio = step_ratio(gm, full, inputs, dev)
        extra = accumulate_seconds(gm, inputs, dev)
    times: dict[str, NodeTimes] = {n: (*measured.get(n, (0.0, 0.0)), None) for n in names}
    if cache is not None and fingerprint:
        cache.store(fingerprint, key, dev.type, dname, times,
                    {"purpose": "micro-batch profile (fixed parts)", "step_ratio": ratio, "accumulate_backward_s": extra})
    return times, ratio, extra, False


def profile_fixed_parts(captured: CapturedModel, example_inputs: Sequence[Any],
                        devices: Sequence[str | torch.device] | None = None, repeats: int = 5,
                        cache_dir: str | None = None, *, use_cache: bool = True,
                        most: int = MAX_RATIO, batch_dim: int = 0) -> BatchScalingInfo | None:
    """Profile ``captured`` again on a micro-batch on the CPU (the only kind of ``devices``,
    default cpu plus cuda:0, whose ops' fixed parts the simulators read) and store every
    node's fixed forward and backward seconds per device kind (``fwd_fixed``, ``bwd_fixed``)
    and ``graph.graph["batch_scaling"]`` (module doc). Needs the main profile
    (:func:`graphs.profile.profiler.profile_graph`) of the same kind on the graph.

    ``batch_dim`` is the inputs' batch dimension (:attr:`graphs.model_file.ModelSpec.batch_dim`).

    Returns None where the model cannot be measured on a smaller batch: the graph then gets
    no fixed parts (the simulators' default rule) and ``graph.graph["batch_scaling"]`` is
    ``{"skipped": why}``, also logged.
    """
    gm, graph = captured.gm, captured.graph
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    batch = batch_size_of(inputs, batch_dim)
    ratio = microbatch_ratio(batch, most) if batch is not None else None
    if batch is None or ratio is None:
        _skipped(graph, "no batch dimension in the example inputs" if batch is None
                 else f"the batch of {batch} has no divisor from 2 to {most}")
        return None
    small = batch // ratio
    cut = slice_batch(inputs, batch, small, batch_dim)
    info = graph.graph.get("profile_info") or {}
    fingerprint = captured.fingerprint or graph.graph.get("fingerprint")
    cache = ProfileCache(cache_dir) if use_cache and fingerprint else None
    names = [n.name for n in gm.graph.nodes]
    start = time.perf_counter()
    fixed: dict[str, dict[str, tuple[float, float]]] = {}
    accumulate: dict[str, float] = {}
    reasons: list[str] = []
    min_samples = 1
    all_cached = True
    # A GPU op's fixed part is its launches, known without a second profile; the simulators
    # read measured fixed parts on CPUs only.
    for dev in (d for d in resolve_devices(devices) if d.type == "cpu"):
        kind_info = info.get(dev.type)
        if kind_info is None:
            reasons.append(f"the graph has no {dev.type} profile to fit against")
            continue
        if kind_info.get("method") == "isolated":
            # Isolated timings read up to 3x off in-situ ones (graphs.profile.profiler): a fit
            # through one of each would measure the method, not the batch. A cache file written
            # before the method was recorded says "": it was asked for in situ, and a model that
            # fell back from it (it cannot run whole on the device) fails the run below too.
            reasons.append(f"its {dev.type} profile was timed op by op (isolated), not in situ")
            continue
        try:  # quiet: fx prints the traceback of a model failing on the smaller batch, which is said below
            with contextlib.redirect_stderr(io.StringIO()):
                times, ratio_now, accumulate[dev.type], cached = _small_times(gm, inputs, cut, dev, repeats, names,
                                                                              cache, fingerprint)
        except Exception as exc:  # noqa: BLE001 - a model that does not run on a smaller batch
            runs_on = smallest_runnable_batch(gm, inputs, batch, small, dev, batch_dim)
            min_samples = max(min_samples, runs_on)
            who = graph.graph.get('name') or 'the model'
            if graph.graph.get("capture") == "export":
                # torch.export specialises the graph to the example's shapes: the model itself
                # may run on fewer samples, its captured graph does not.
                who = f"the graph torch.export captured of {who} (shapes fixed at capture)"
            reasons.append(f"{who} does not run on {small} of its {batch} samples on {dev.type} ({_why(exc)}); "
                           f"micro-batches and DDP replicas get at least {runs_on}")
            continue
        all_cached = all_cached and cached
        full = np.array([[float((graph.nodes[n].get(k) or {}).get(dev.type, 0.0)) for k in ("fwd_time", "bwd_time")]
                         for n in names])
        part = np.array([[times[n][0], times[n][1]] for n in names])
        if part.sum() > 0:  # one sitting (module doc): the whole small step is ratio_now of the full one
            part *= ratio_now * full.sum() / part.sum()
        parts = np.stack([fixed_parts(full[:, k], part[:, k], float(ratio)) for k in (0, 1)], axis=1)
        fixed[dev.type] = {n: (float(parts[i, 0]), float(parts[i, 1])) for i, n in enumerate(names)}
    if not fixed:
        _skipped(graph, "; ".join(reasons) or "no CPU among the devices profiled", min_samples)
        return None
    fwd_key, bwd_key = FIXED_ATTRS
    for n in names:
        attrs = graph.nodes[n]
        for kind, per_node in fixed.items():
            attrs.setdefault(fwd_key, {})[kind] = per_node[n][0]
            attrs.setdefault(bwd_key, {})[kind] = per_node[n][1]
    result = BatchScalingInfo(ratio, small, batch, tuple(fixed), time.perf_counter() - start, all_cached,
                              {k: v for k, v in accumulate.items() if k in fixed})
    graph.graph["batch_scaling"] = result.as_dict()
    log.info("micro-batch profile on %s: batch %d of %d (ratio %d), %.1f s%s", ", ".join(result.kinds), small, batch,
             ratio, result.seconds, " (cached)" if all_cached else "")
    return result


def _skipped(graph: Any, why: str, min_samples: int = 1) -> None:
    """Record and log why the graph keeps the default fixed parts (and, when the model failed on
    the micro-batch, the fewest samples it runs on: :func:`min_microbatch_samples`)."""
    graph.graph["batch_scaling"] = {"skipped": why, **({"min_samples": min_samples} if min_samples > 1 else {})}
    log.warning("micro-batch profile skipped: %s; pipelines and DDP keep the default fixed part per op", why)
