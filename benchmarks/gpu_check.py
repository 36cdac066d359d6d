"""The simulator meets a real GPU: one prepared check of placer's figures on `cuda:0` (issue 19).

What one run does, in this order, within ``--budget-s`` seconds (stages that no longer fit
are skipped and said so; results are written after every stage, so a run cut short still
leaves what it measured):

1. **Machine figures.** Peak fp32 matmul FLOP/s and copy bandwidth of the CPU (one torch
   thread, as profiles and measurements run) and the GPU, and the CPU↔GPU link latency and
   bandwidth (pinned copies), by :func:`envs.hardware.links.measure_devices_and_links`, the
   figures ``load_cluster("real")`` would use.
2. **Runtime probes** the single-process execution model rests on (GPU only; design note of
   issue 15, measurements M2, M4, M5): host cost of issuing one tiny op and of one backward
   node, whether a pageable ``non_blocking`` host→GPU copy blocks the host while the GPU is
   busy (pinned for comparison), and on which threads autograd runs CPU and GPU backward ops.
   Then **the pipeline runtime on the GPU** (issue 16): a two-stage pipeline of a small MLP
   (with an ``x.device`` crossing the stage boundary and a factory op naming the CPU, which
   the rank must move to its GPU), both stages on ``cuda:0`` under one rank (interleaved 1F1B,
   M = 2, NCCL, three SGD steps)
   through :func:`envs.runtime.pipeline.launcher.run_training`, against the same job on a CPU
   worker ``cpu:0`` (gloo): the losses must agree (:func:`pipeline_on_device`). One GPU
   cannot hold two NCCL ranks, so this is the GPU code path of a rank, not a two-GPU pipeline.
   Then **a placed model after** ``.eval()`` over ``cpu`` and the GPU against the original
   (:func:`eval_mode_on_device`: stochastic depth, BatchNorm, dropout; fx and torch.export),
   and a model that makes tensors in forward (:func:`factories_on_device`: an ``arange`` made
   on its placed device, a ``randn`` drawn on the CPU's generator; two steps and a pickle).
3. **Profiles.** Every small zoo model on the CPU and on the GPU, and the paper-size GPT-2
   (batch 4 × 1,024 tokens) and NMT with 2 layers (batch 128, 50 + 50 steps) on the GPU at
   their published batch, by :func:`graphs.profile.profiler.profile_graph` (forward, backward
   and optimizer update per op, in situ). The paper models are profiled on the CPU too, last
   (stage 6), at a reduced batch (:data:`CPU_PAPER_ARGS`: GPT-2 1 × 128 tokens, NMT batch 1):
   at one CPU thread a published-batch step takes minutes.
4. **Roofline vs profiled**, per op: the profiled GPU time against the roofline estimate the
   shipped presets would have used for an H-class GPU (``8xH100``'s device, the ``H100``
   constants of :data:`envs.sim.cost_model.DEFAULT_ROOFLINE`), as ratios per op class
   (matmul/conv, element-wise, launch-bound, no-work views) and phase (forward, backward,
   optimizer); and the constants fitted to the measurements (matmul efficiency against the
   measured peak, element-wise bandwidth fraction, per-op overhead, and the one-efficiency
   :class:`~envs.sim.cost_model.Roofline` the cost model takes).
5. **Placements.** For every small zoo model, ≥ ``--placements`` placements over ``cpu`` and
   ``cuda:0`` (each device alone, the heuristics of :mod:`placer.search.baselines`, random
   mixes with a growing CPU share), applied and timed in one process by
   :class:`envs.runtime.measure.SingleProcessMeasurer` (CPU ops at one thread), and simulated by
   :func:`envs.sim.simulator.simulate_batch` on the compiled problem, before and after
   :func:`envs.sim.calibration.calibrate_simulator` (fitted on half, scored on the other half
   and on all): Spearman and MAPE against the targets 0.9 / 15%.
6. **The paper models on the CPU** (see 3), in the time kept for them.

Everything lands in ``--out``: ``results.json`` (every figure, every op, every placement)
and ``summary.md``. ``--to-preset RESULTS_DIR OUT.yaml`` then turns a results folder into a
cluster preset for the GPU kind (``H200``: measured peak FLOP/s, bandwidth, memory and link
figures, the per-op-class efficiencies in its header) plus ``OUT.roofline.json``, the
cost-model constants (:class:`envs.sim.cost_model.Roofline`) for that kind.

The one command for the GPU machine (device tool ``run``), after
``bash benchmarks/gpu_check_wheels.sh`` here (gymnasium is imported by ``envs`` and is not
installed there; its wheels travel in ``.whl``)::

    run(command="bash benchmarks/gpu_check_run.sh", carry=[".whl"], timeout_s=420)

It installs the wheels offline, runs ``--device cuda:0 --budget-s 300`` and ``--to-preset``,
and leaves ``$OUT/gpu-h200/{results.json,summary.md,H200.yaml,H200.roofline.json,log.txt,
nvidia-smi.txt}`` (results are saved after every stage, so even a run stopped at the limit
brings back what it measured). The run is sized to end after about 5.5 minutes (no new work
after 300 s; the stage in flight finishes); with about 1.5 minutes of machine start, a rerun on
the still-warm machine fits in the 15 minutes of device time (for a shorter rerun, start the
command with ``GPU_CHECK_BUDGET_S=200``). Then copy ``summary.md`` to
``benchmarks/results/gpu-h200.md`` (with the command) and the preset to
``envs/hardware/presets/``, and set ``DEFAULT_ROOFLINE["H200"]`` from ``H200.roofline.json``
(its ``cost_model_line``).

Dry run (this CPU-only machine; ``tests/test_gpu_check.py``)::

    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu-check-dry

``--device cpu`` profiles on the CPU only, places over ``cpu`` and a virtual second CPU
device ``cpu1`` (same real device: no parallelism, every path exercised), uses two small
models with the small presets standing in for the paper ones, and few placements.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")

#: Design targets for the calibrated simulator (design.md, "Measured vs simulated").
TARGET_SPEARMAN = 0.9
TARGET_MAPE = 0.15
#: Held-out placements below which no verdict on the targets is given.
MIN_HELD_OUT = 5

SMALL_MODELS: tuple[str, ...] = ("rnnlm", "nmt", "gpt2", "moe", "resnet50", "inception_v3")
#: Paper-size models profiled on the GPU at their published batch: (label, zoo name, model args).
PAPER_MODELS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("gpt2-paper", "gpt2", {"size": "paper"}),
    ("nmt2-paper", "nmt", {"size": "paper", "layers": 2}),
)
#: The same on the CPU at one thread: a reduced batch (a published-batch step takes minutes there).
CPU_PAPER_ARGS: dict[str, dict[str, Any]] = {
    "gpt2-paper": {"seq_len": 128, "batch_size": 1},
    "nmt2-paper": {"batch_size": 1},
}

#: Seconds kept for each of those CPU profiles. Measured on the 2-core dev VM at load ~7 (every
#: core shared 3-4 ways): GPT-2 26 s, NMT-2L 69 s (its backward and Adam step hardly shrink with
#: the batch: 4.0 s and 1.1 s of a 5.9 s step are the 32k-word softmax's and the weights').
#: A quiet host thread should take about a third of that.
CPU_PAPER_PROFILE_S = 30.0

#: Op classes of the roofline comparison.
MATMUL, ELEMENTWISE, LAUNCH, NO_WORK = "matmul/conv", "element-wise", "launch-bound", "no-work"
OP_CLASSES: tuple[str, ...] = (MATMUL, ELEMENTWISE, LAUNCH, NO_WORK)
MATMUL_MODULES = frozenset({
    "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "LSTM", "LSTMCell", "GRU", "GRUCell", "RNN", "RNNCell", "MultiheadAttention",
})
MATMUL_FUNCTIONS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "scaled_dot_product_attention", "lstm_cell", "gru_cell", "lstm", "gru",
})


#: Every module the check imports (lazily, stage by stage): :func:`preflight` imports them
#: first, so a package missing on the GPU machine stops the run in a second, not minutes in.
CHECK_MODULES: tuple[str, ...] = (
    "torch", "networkx", "scipy.stats", "yaml", "graphs.pipeline", "graphs.profile.profiler", "graphs.grouping",
    "graphs.ops", "envs.hardware.links", "envs.hardware.loading", "envs.sim.problem_compile", "envs.sim.simulator",
    "envs.sim.cost_model", "envs.sim.calibration", "envs.runtime.measure", "envs.runtime.measure_worker",
    "envs.runtime.pipeline.launcher", "envs.runtime.pipeline.worker", "placer.search.baselines",
)


class CheckError(Exception):
    """Bad use of the check (arguments, a results folder that is not one): one line, exit status 2."""


# ============================================================================ pure helpers


def classify_op(attrs: Mapping[str, Any], op_name: str, work_s: float, launch_s: float) -> str:
    """The op class of one node: what limits it on a device, by the roofline's own terms.

    ``work_s`` is the roofline's ``max(compute, memory)`` seconds (no overhead): an op whose
    work is below one launch overhead is launch-bound whatever it computes; a node with
    neither FLOPs nor bytes (views, shape queries) does no work; otherwise a matmul,
    convolution or recurrent cell is matmul/conv and everything else element-wise.
    """
    if float(attrs.get("flops") or 0) <= 0 and float(attrs.get("bytes_moved") or 0) <= 0:
        return NO_WORK
    if work_s < launch_s:
        return LAUNCH
    if attrs.get("op") == "call_module":
        return MATMUL if attrs.get("module_type") in MATMUL_MODULES else ELEMENTWISE
    return MATMUL if op_name in MATMUL_FUNCTIONS else ELEMENTWISE


def ratio_stats(measured: Sequence[float], estimated: Sequence[float]) -> dict[str, float]:
    """Measured against estimated seconds over a set of ops.

    ``sum_ratio`` is Σmeasured / Σestimated (what a step made of these ops would be off by);
    ``median_ratio`` and ``geo_mean_ratio`` describe a typical op; ``mape`` is the mean
    absolute error of the estimate relative to the measurement. Ops with a zero estimate or
    measurement are counted in ``n`` and the sums but not in the per-op figures.
    """
    m = np.asarray(measured, dtype=np.float64)
    e = np.asarray(estimated, dtype=np.float64)
    out: dict[str, float] = {"n": int(m.size), "measured_s": float(m.sum()), "estimated_s": float(e.sum())}
    out["sum_ratio"] = float(m.sum() / e.sum()) if e.sum() > 0 else float("nan")
    ok = (m > 0) & (e > 0)
    if ok.any():
        r = m[ok] / e[ok]
        out["median_ratio"] = float(np.median(r))
        out["geo_mean_ratio"] = float(np.exp(np.mean(np.log(r))))
        out["mape"] = float(np.mean(np.abs(e[ok] - m[ok]) / m[ok]))
    else:
        out["median_ratio"] = out["geo_mean_ratio"] = out["mape"] = float("nan")
    return out


def fp32_flops(op: Mapping[str, Any]) -> float:
    """An op record's FLOPs at the fp32 rate: its FLOPs scaled by the rate the roofline gives its
    dtype and kind of work on the reference device (``envs.sim.cost_model.peak_flops_for``: a TF32
    convolution or a half-precision matmul counts as fewer fp32 FLOPs), so constants fitted against
    the fp32 peak do not absorb what those rates already grant (records without it: as counted)."""
    return float(op.get("flops_fp32", op["flops"]))


def fit_class_constants(ops: Sequence[Mapping[str, Any]], peak_flops: float, mem_bandwidth: float) -> dict[str, Any]:
    """Per-op-class constants of a device kind from its profiled ops (records of :func:`op_records`).

    * ``launch_overhead_s``: the median forward time of the launch-bound ops (what an op
      costs when it does next to no work: dispatch, launch, and in the profile the sync);
    * ``matmul_efficiency``: Σ FLOPs / (peak × Σ (time − overhead)) over matmul/conv ops,
      the fraction of the measured peak they reach, time-weighted;
    * ``elementwise_bandwidth_fraction``: Σ bytes / (bandwidth × Σ (time − overhead)) over
      element-wise ops;
    * ``backward_factor``: Σ backward / Σ forward per class (the roofline assumes 2).

    Classes without ops give None.
    """
    by_class: dict[str, list[Mapping[str, Any]]] = {c: [] for c in OP_CLASSES}
    for op in ops:
        by_class[op["class"]].append(op)
    launch_times = [op["fwd"] for op in by_class[LAUNCH] if op["fwd"] > 0]
    launch = float(statistics.median(launch_times)) if launch_times else None
    base = launch or 0.0

    def busy(items: list[Mapping[str, Any]]) -> float:
        return float(sum(max(op["fwd"] - base, 0.0) for op in items))

    mm = by_class[MATMUL]
    mm_busy = busy(mm)
    mm_eff = sum(fp32_flops(op) for op in mm) / (peak_flops * mm_busy) if mm and mm_busy > 0 else None
    ew = by_class[ELEMENTWISE]
    ew_busy = busy(ew)
    ew_frac = sum(op["bytes_moved"] for op in ew) / (mem_bandwidth * ew_busy) if ew and ew_busy > 0 else None
    bwd_factor = {}
    for cls, items in by_class.items():
        fwd = sum(op["fwd"] for op in items)
        bwd_factor[cls] = float(sum(op["bwd"] for op in items) / fwd) if fwd > 0 else None
    return {
        "launch_overhead_s": launch,
        "matmul_efficiency": None if mm_eff is None else float(mm_eff),
        "elementwise_bandwidth_fraction": None if ew_frac is None else float(ew_frac),
        "backward_factor": bwd_factor,
        "ops": {c: len(v) for c, v in by_class.items()},
    }


def fit_roofline(ops: Sequence[Mapping[str, Any]], peak_flops: float, mem_bandwidth: float) -> dict[str, float] | None:
    """The one-efficiency roofline of :mod:`envs.sim.cost_model` fitted to profiled forward times.

    The same least squares on relative errors as :func:`envs.sim.cost_model.calibrate`, over
    every op that does work, pooled across models; None with fewer than 3 such ops.
    """
    import networkx as nx

    from envs.hardware.cluster import Device
    from envs.sim.cost_model import calibrate

    graph = nx.DiGraph()
    kind = "cuda"
    for i, op in enumerate(ops):
        if op["class"] == NO_WORK or op["fwd"] <= 0:
            continue
        graph.add_node(f"op{i}", op="call_function", flops=fp32_flops(op), bytes_moved=op["bytes_moved"],
                       fwd_time={kind: op["fwd"]}, bwd_time={kind: op["bwd"]})
    device = Device("fit", kind, 1, float(peak_flops), float(mem_bandwidth))
    fit = calibrate(graph, device, kind=kind)
    if fit is None:
        return None
    return {"efficiency": fit.efficiency, "launch_overhead_s": fit.launch_overhead_s}


def roofline_mape(ops: Sequence[Mapping[str, Any]], peak_flops: float, mem_bandwidth: float,
                  efficiency: float, launch_s: float) -> float:
    """Mean relative error of the roofline's forward estimate over the ops that do work."""
    errs = []
    for op in ops:
        if op["class"] == NO_WORK or op["fwd"] <= 0:
            continue
        est = max(fp32_flops(op) / (peak_flops * efficiency), op["bytes_moved"] / mem_bandwidth) + launch_s
        errs.append(abs(est - op["fwd"]) / op["fwd"])
    return float(np.mean(errs)) if errs else float("nan")


def random_rows(num_groups: int, num_devices: int, count: int, rng: np.random.Generator,
                host: int = 0) -> list[np.ndarray]:
    """``count`` random rows: each group on the host device with a probability that grows
    from row to row over 5% to 80% (each row at a random point of its own slice of that
    range), else on one of the other devices; the spread of host shares gives step times
    from the accelerator's to the host's."""
    rows = []
    others = [d for d in range(num_devices) if d != host] or [host]
    for k in range(count):
        share = 0.05 + 0.75 * (k + rng.random()) / count
        row = rng.choice(others, size=num_groups).astype(np.int64)
        row[rng.random(num_groups) < share] = host
        rows.append(row)
    return rows


def split_fit_held(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fitting half and the held-out half of ``n`` placements (seeded); the
    fitting part has at least 3 (what calibration needs), the held-out part the rest."""
    order = np.random.default_rng(seed).permutation(n)
    half = min(max(n // 2, 3), n)
    return order[:half], order[half:]


def error_diagnosis(placements: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which simulator rule the calibrated errors point at, from the per-placement records.

    Looks at where the calibrated prediction is worst: single-device placements (the op
    costs themselves), placements that cut many edges (the transfer rule), or placements
    with ops on both devices (the overlap/host rules). Returns sentences for the summary.
    """
    rows = [p for p in placements if p.get("measured_s") is not None and math.isfinite(p["measured_s"])
            and p.get("predicted_s") is not None]
    if len(rows) < 3:
        return ["too few valid measurements to say which rule misses"]
    err = np.array([(p["predicted_s"] - p["measured_s"]) / p["measured_s"] for p in rows])
    cuts = np.array([p["cut_edges"] for p in rows], dtype=np.float64)
    single = np.array([p["devices_used"] == 1 for p in rows])
    notes = []
    if single.any():
        s_err = err[single]
        notes.append(f"single-device placements: calibrated error {', '.join(f'{e:+.0%}' for e in s_err)} "
                     "(off here = the op costs or the per-step overhead, not placement rules)")
    mixed = ~single
    if mixed.sum() >= 3:
        from scipy import stats

        rho = stats.spearmanr(cuts[mixed], np.abs(err[mixed])).statistic
        bias = float(np.mean(err[mixed]))
        notes.append(f"mixed placements: mean calibrated error {bias:+.0%}, MAPE {np.mean(np.abs(err[mixed])):.0%}; "
                     f"rank correlation of |error| with cut edges {rho:+.2f}"
                     + (" (errors grow with cuts: the transfer rule — copy cost or its overlap — is off)"
                        if np.isfinite(rho) and rho >= 0.5 else ""))
        if bias < -0.1:
            notes.append("mixed placements run slower than simulated: the simulator overlaps work that "
                         "really serialises (one host thread issuing every op, CPU ops blocking GPU launches, "
                         "blocking copies)")
        elif bias > 0.1:
            notes.append("mixed placements run faster than simulated: copies or CPU ops cost less than modelled")
    return notes


def preflight(modules: Sequence[str] = CHECK_MODULES) -> None:
    """Import every module the check needs; :class:`CheckError` names the first that fails."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise CheckError(f"cannot import {name} ({_first_line(exc)}); on the GPU machine carry the wheels "
                             "that benchmarks/gpu_check_wheels.sh fetches (carry=['.whl'])") from None


# ============================================================================ deadline and output


@dataclass
class Deadline:
    """The run's time budget: stages ask whether their estimate still fits."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a run killed mid-write keeps the previous file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default, allow_nan=True) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def stage(results: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Run one stage: its record goes to ``results["stages"][name]`` with its seconds and,
    on failure, the error (the run goes on with the next stage)."""
    record: dict[str, Any] = {"status": "running"}
    results.setdefault("stages", {})[name] = record
    start = time.perf_counter()
    log.info("stage %s", name)
    try:
        yield record
        record["status"] = "done"
        log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - one failed stage must not lose the others' figures
        record["status"] = "failed"
        record["error"] = _first_line(exc)
        record["traceback"] = traceback.format_exc(limit=6)
        log.error("stage %s failed: %s", name, _first_line(exc))
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)


# ============================================================================ stage 1: machine


def machine_info(device: str) -> dict[str, Any]:
    """Versions, GPU name and properties, CPU count."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "cpu_count": os.cpu_count(), "host": platform.node(),
                            "device": device, "numba_disabled": os.environ.get("PLACER_DISABLE_NUMBA", "")}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu_name": props.name, "gpu_memory_bytes": int(props.total_memory),
                     "gpu_multiprocessors": int(props.multi_processor_count),
                     "cuda": torch.version.cuda, "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)})
    return info


def machine_figures(device: str) -> dict[str, Any]:
    """Device and link figures of this machine, the CPU at one torch thread (as it is profiled)."""
    from envs.hardware.links import measure_devices_and_links
    from graphs.profile.op_timing import worker_conditions

    with worker_conditions():
        record = measure_devices_and_links()
    if not device.startswith("cuda"):
        # No GPU: a virtual second CPU device stands in, so every path of the check runs.
        # A CPU->CPU copy in one process is a no-op .to("cpu") (~0.4 us of dispatch).
        cpu = dict(record["devices"][0])
        record["devices"].append({**cpu, "name": "cpu1"})
        record["links"] = [{"src": "cpu", "dst": "cpu1", "latency_s": 1e-6, "bandwidth_Bps": cpu["mem_bandwidth"]}]
        record["virtual"] = {"cpu1": "cpu"}
    return record


def half_precision_rates(device: str, fp32_flops: float, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a float16 and of a bfloat16 matmul on ``device``, each over ``fp32_flops`` (the fp32
    matmul of :func:`machine_figures`, the same size): what the roofline's
    ``envs.sim.cost_model.HALF_RATE`` takes from the datasheets (tensor cores), measured."""
    import torch

    from envs.hardware.links import matmul_flops

    return {str(dtype): matmul_flops(torch, device, dtype, repeats) / fp32_flops
            for dtype in (torch.float16, torch.bfloat16)}


def cluster_from_figures(record: Mapping[str, Any]) -> Any:
    """The cluster of ``cpu`` + the device under test, from :func:`machine_figures`."""
    from envs.hardware.cluster import Device, Link, make_cluster

    virtual = record.get("virtual") or {}
    devices = [Device(d["name"], d["kind"], int(d["memory_bytes"]), float(d["peak_flops"]),
                      float(d["mem_bandwidth"]), virtual.get(d["name"], d.get("real_device")),
                      int(d.get("reserved_bytes", 0)))
               for d in record["devices"]]
    links = [Link(lk["src"], lk["dst"], float(lk["latency_s"]), float(lk["bandwidth_Bps"])) for lk in record["links"]]
    return make_cluster(devices, links, name=str(record.get("name", "machine")), simulated=bool(virtual))


# ============================================================================ stage 2: runtime probes


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(statistics.median(samples))


def runtime_probes(device: str, ops: int = 200, repeats: int = 5) -> dict[str, Any]:
    """What the single-process execution model assumes, measured (issue 15's M2, M4, M5).

    * ``forward_issue_s_per_op``: host seconds to issue one tiny op of a chain of ``ops``
      (no sync inside); ``forward_synced_s_per_op``: the same chain with the device finished;
      ``graphmodule_issue_s_per_op``: the chain as an fx GraphModule (what apply runs).
    * ``backward_s_per_node``: one backward of that chain (requires grad), per autograd node.
    * ``h2d_pageable_host_s`` vs ``h2d_pinned_host_s``: host seconds spent in
      ``.to(device, non_blocking=True)`` of a 64 MiB tensor issued while the GPU still runs
      ``gpu_busy_s`` of queued matmuls (close to ``gpu_busy_s``: the copy blocks the host).
    * ``backward_threads``: for an op on the CPU and on the device, whether autograd ran its
      backward on the calling thread.
    """
    import torch

    dev = torch.device(device)
    is_cuda = dev.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(dev)

    out: dict[str, Any] = {"device": device, "ops": ops}
    x = torch.ones(8, device=dev)

    def chain() -> torch.Tensor:
        y = x
        for _ in range(ops):
            y = y + 1.0
        return y

    chain()
    sync()
    out["forward_issue_s_per_op"] = _median_s(chain, repeats) / ops
    sync()
    out["forward_synced_s_per_op"] = _median_s(lambda: (chain(), sync()), repeats) / ops

    # The same chain as the GraphModule apply_placement runs: fx's generated forward.
    class Chain(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            for _ in range(ops):
                y = y + 1.0
            return y

    gm = torch.fx.symbolic_trace(Chain())
    gm(x)
    sync()
    out["graphmodule_issue_s_per_op"] = _median_s(lambda: gm(x), repeats) / ops
    sync()

    w = torch.ones(8, device=dev, requires_grad=True)

    def backward() -> None:
        y = w
        for _ in range(ops):
            y = y * 1.0001
        loss = y.sum()
        sync()
        t0 = time.perf_counter()
        loss.backward()
        sync()
        times.append(time.perf_counter() - t0)

    times: list[float] = []
    for _ in range(repeats + 1):
        backward()
    out["backward_s_per_node"] = float(statistics.median(times[1:])) / (ops + 1)

    main_thread = threading.get_ident()
    seen: dict[str, bool] = {}

    def hook_for(where: str) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            seen[where] = threading.get_ident() == main_thread
        return hook

    for where in ["cpu", device] if is_cuda else ["cpu"]:
        t = torch.ones(4, device=where, requires_grad=True)
        y = t * 2.0
        y.register_hook(hook_for(where))
        y.sum().backward()
    out["backward_on_calling_thread"] = seen

    if is_cuda:
        n = 4096
        a = torch.randn(n, n, device=dev)
        mm_s = _median_s(lambda: (a @ a, sync()), 3)
        reps = max(1, int(0.05 / max(mm_s, 1e-6)))  # ~50 ms of queued GPU work
        elems = 64 * 2**20 // 4
        for label, host in (("pageable", torch.ones(elems)), ("pinned", torch.ones(elems).pin_memory())):
            host.to(dev, non_blocking=True)  # the allocator's first cudaMalloc of this size stays out of the timing
            sync()
            for _ in range(reps):
                a @ a
            t0 = time.perf_counter()
            host.to(dev, non_blocking=True)
            issued = time.perf_counter() - t0
            sync()
            out[f"h2d_{label}_host_s"] = issued
        out["gpu_busy_s"] = reps * mm_s
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        a[0].to("cpu")
        out["d2h_after_busy_host_s"] = time.perf_counter() - t0
    return out


# ============================================================================ stage 3-4: profiles and roofline


def pipeline_on_device(device: str, steps: int = 3, timeout_s: float = 120.0) -> dict[str, Any]:
    """Train a two-stage pipeline of a small MLP on rank device ``device`` (``cuda:0``; ``cpu:0``
    in a dry run) and on a CPU worker, both through the pipeline runtime; their losses and step
    times, and the largest relative difference of the losses (float32 on both: GPU kernels
    sum in other orders, so ~1e-6, not 0)."""
    import torch
    import torch.fx as fx
    from torch import nn

    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline_layout import Pipeline

    class SquaredMLP(nn.Module):  # its output is the loss: nothing but the graph travels to the ranks
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # What a capture bakes as a device: x.device read in the first stage and used in the
            # second (a constant there), and a factory op naming the CPU.
            d = x.device
            h = torch.relu(self.l1(x)) + torch.ones(256, device=d)
            h = torch.relu(self.l2(h)) + torch.ones(256, device=d)
            return (self.l3(h) + torch.zeros((x.shape[0], 8), device="cpu")).pow(2).mean()

    torch.manual_seed(0)
    gm = fx.symbolic_trace(SquaredMLP())
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(16, 64, generator=g)}
    names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = names.index("l2")
    stages = (tuple(names[:cut]), tuple(names[cut:]))
    runs: dict[str, Any] = {}
    for where in dict.fromkeys([device, "cpu:0"]):
        pipe = Pipeline(stages, (where, where), 2, "interleaved_1f1b")
        t0 = time.perf_counter()
        run = run_training(gm, inputs, pipe, steps=steps, optimizer=("sgd", {"lr": 0.001}), timeout_s=timeout_s)
        runs[where] = {"losses": [float(x) for x in run.losses], "step_s": [float(x) for x in run.step_times],
                       "wall_s": round(time.perf_counter() - t0, 2)}
    a, b = runs[device]["losses"], runs["cpu:0"]["losses"]
    worst = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=math.nan)
    return {"device": device, "runs": runs, "max_relative_loss_difference": worst,
            "agree": bool(len(a) == len(b) == steps and worst < 1e-4)}


def eval_mode_on_device(device: str) -> dict[str, Any]:
    """A placed model over ``cpu`` and ``device`` after ``.eval()`` against the original: a
    residual MLP with stochastic depth (``if self.training:`` takes another branch, so the
    eval graph runs over the placed parameters, copied between the devices by
    :class:`graphs.eval_interpreter.DataFollowingInterpreter`), a buffer only eval mode updates in
    place (on the buffer's device: on a copy the update was lost), BatchNorm and dropout,
    captured by fx, and the same under torch.export; two SGD steps in training mode first. Float32 on both
    sides: the GPU's kernels sum in other orders, so ~1e-6, not 0."""
    import torch
    from torch import nn

    from envs.runtime.apply import apply_placement
    from graphs.capture import capture

    class Residual(nn.Module):
        def __init__(self, iterate: bool) -> None:
            super().__init__()
            self.iterate = iterate  # iterating over a tensor sends the capture to torch.export
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Dropout(0.2))
                                        for _ in range(4))
            self.head = nn.Linear(64, 8)
            self.register_buffer("seen", torch.zeros(64))  # only eval mode updates it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.iterate:
                x = torch.stack([row for row in x])
            if not self.training:
                self.seen.add_(x.sum(0))  # in place on the buffer's device, not on a copy (review)
            for block in self.blocks:
                h = torch.relu(block(x))
                if self.training:
                    h = h * (torch.rand_like(h[:, :1]) < 0.8) / 0.8
                x = x + h
            return self.head(x)

    out: dict[str, Any] = {"device": device}
    for label, iterate in (("fx", False), ("export", True)):
        torch.manual_seed(0)
        model, x = Residual(iterate), torch.randn(32, 64)
        cap = capture(model, (x,))
        nodes = list(cap.graph.nodes)
        placed = apply_placement(cap, {n: ("cpu" if i % 2 else device) for i, n in enumerate(nodes)},
                                 output_device="cpu")
        opt = torch.optim.SGD(placed.parameters(), lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            placed(x).square().mean().backward()
            opt.step()
        reference = Residual(iterate)
        reference.load_state_dict({k: v.cpu() for k, v in placed.state_dict().items()})
        placed.eval(), reference.eval()
        with torch.no_grad():
            got, want = placed(x), reference(x)
        out[label] = {"method": cap.method, "eval_graph": "placer_eval_graph" in placed.__dict__,
                      "output_device": str(got.device),
                      "max_abs_difference": float((got.cpu() - want).abs().max()),
                      "eval_update_difference": float((placed.seen.cpu() - reference.seen).abs().max())}
    out["agree"] = all(out[k]["max_abs_difference"] < 1e-4 and out[k]["eval_update_difference"] < 1e-4
                       for k in ("fx", "export"))
    return out


def factories_on_device(device: str) -> dict[str, Any]:
    """A placed model whose forward makes tensors (``torch.arange(n)`` with no device, a
    ``torch.randn`` noise draw) over ``cpu`` and ``device`` against the original, for two SGD
    steps from one seed, and the same model after a pickle round trip. On a GPU the arange
    must be made there (before, it stayed on the CPU and its GPU consumer failed) and the draw
    must stay on the CPU's generator, copied after (another generator draws other numbers)."""
    import pickle

    import torch
    from torch import nn

    from envs.runtime.apply import apply_placement
    from graphs.capture import capture

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(16).float() / 16
            h = torch.tanh(self.a(x + pos)) + 0.01 * torch.randn(8, 16)
            return self.b(h)

    torch.manual_seed(0)
    model, x = Noisy(), torch.randn(8, 16)
    reference = Noisy()
    reference.load_state_dict(model.state_dict())
    cap = capture(model, (x,))
    placed = apply_placement(cap, {n: (device if i % 2 else "cpu") for i, n in enumerate(cap.graph.nodes)},
                             output_device="cpu")
    losses: dict[str, list[float]] = {}
    for label, net in (("placed", placed), ("original", reference)):
        torch.manual_seed(1)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        losses[label] = []
        for _ in range(2):
            opt.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            losses[label].append(float(loss))
    reloaded = pickle.loads(pickle.dumps(placed))
    torch.manual_seed(2)
    with torch.no_grad():
        again = reloaded(x)
    torch.manual_seed(2)
    with torch.no_grad():
        first = placed(x)
    difference = max(abs(a - b) for a, b in zip(losses["placed"], losses["original"]))
    pickled = float((again - first).abs().max())
    return {"device": device, "losses": losses, "max_loss_difference": difference,
            "pickle_round_trip_difference": pickled, "agree": difference < 1e-5 and pickled < 1e-6}


def profile_model(label: str, zoo_name: str, model_args: Mapping[str, Any], devices: Sequence[str],
                  repeats: int, cache_dir: str) -> tuple[Any, dict[str, Any]]:
    """Load, capture, profile on ``devices`` (one per kind) and group one zoo model.

    Profiled afresh (no cache) with the model's own optimizer, then grouped on the profiled
    graph, as :func:`graphs.pipeline.prepare` does with ``profile=True``.
    """
    from graphs.grouping import group_graph
    from graphs.pipeline import prepare
    from graphs.profile.profiler import profile_graph

    start = time.perf_counter()
    prep = prepare(f"zoo:{zoo_name}", dict(model_args), profile=False)
    t0 = time.perf_counter()
    profile_graph(prep.captured, prep.spec.example_inputs, devices=list(devices), repeats=repeats,
                  cache_dir=cache_dir, use_cache=False, optimizer_fn=prep.spec.optimizer_fn)
    profile_s = time.perf_counter() - t0
    prep.grouping = group_graph(prep.captured.graph, gm=prep.captured.gm)
    graph = prep.captured.graph
    kinds = list(graph.graph.get("profiled_kinds") or [])
    totals = {}
    for kind in kinds:
        totals[kind] = {phase: float(sum((d.get(key) or {}).get(kind, 0.0) for _, d in graph.nodes(data=True)))
                        for phase, key in (("forward", "fwd_time"), ("backward", "bwd_time"),
                                           ("optimizer", "opt_time"))}
    info = graph.graph.get("profile_info") or {}
    record = {
        "label": label, "model": zoo_name, "model_args": dict(model_args), "devices": list(devices),
        "nodes": graph.number_of_nodes(), "groups": prep.grouping.graph.number_of_nodes(),
        "flops_fwd": float(sum(d.get("flops") or 0 for _, d in graph.nodes(data=True))),
        "params": int(sum(p.numel() for p in prep.spec.model.parameters())),
        "optimizer": graph.graph.get("optimizer"), "capture": prep.captured.method,
        "sum_of_op_times_s": totals,
        "profile_info": {k: {kk: vv for kk, vv in v.items() if kk != "failures"} | {"failures": v.get("failures", [])[:5]}
                         for k, v in info.items()},
        "profile_s": round(profile_s, 2), "seconds": round(time.perf_counter() - start, 2),
    }
    return prep, record


def reference_device(kind: str) -> tuple[Any, Any]:
    """The device and roofline constants the shipped presets give the kind under test.

    A GPU is compared with ``8xH100``'s device and the ``H100`` constants (the H-class GPU a
    user simulates today); a CPU with the ``cpu`` of ``cpu+gpu`` and the ``cpu`` constants.
    """
    from envs.hardware.loading import load_cluster
    from envs.sim.cost_model import DEFAULT_ROOFLINE

    if kind == "cuda":
        dev = load_cluster("8xH100").devices[0]
    else:
        dev = load_cluster("cpu+gpu").device("cpu")
    return dev, DEFAULT_ROOFLINE[dev.kind]


def op_records(label: str, graph: Any, kind: str, ref_device: Any, ref_roofline: Any,
               optimizer: str | None) -> list[dict[str, Any]]:
    """One record per compute node profiled on ``kind``: its times, work and roofline estimates."""
    from envs.sim.cost_model import NON_COMPUTE_OPS, node_peak_flops, roofline_opt_time, roofline_times
    from graphs.ops import op_name

    records = []
    for name, attrs in graph.nodes(data=True):
        if attrs.get("op") in NON_COMPUTE_OPS or kind not in (attrs.get("fwd_time") or {}):
            continue
        flops, moved = float(attrs.get("flops") or 0), float(attrs.get("bytes_moved") or 0)
        flops_fp32 = flops * ref_device.peak_flops / node_peak_flops(ref_device, attrs)
        work = max(flops_fp32 / (ref_device.peak_flops * ref_roofline.efficiency), moved / ref_device.mem_bandwidth)
        est_fwd, est_bwd = roofline_times(attrs, ref_device, ref_roofline)
        opt = (attrs.get("opt_time") or {}).get(kind)
        name_of_op = op_name(str(attrs.get("target") or ""))
        records.append({
            "model": label, "node": name, "op": name_of_op,
            "module_type": attrs.get("module_type") if attrs.get("op") == "call_module" else "",
            "class": classify_op(attrs, name_of_op, work, ref_roofline.launch_overhead_s),
            "flops": flops, "flops_fp32": flops_fp32, "bytes_moved": moved,
            "param_bytes": float(attrs.get("param_bytes") or 0),
            "fwd": float(attrs["fwd_time"][kind]), "bwd": float((attrs.get("bwd_time") or {}).get(kind, 0.0)),
            "opt": None if opt is None else float(opt),
            "est_fwd": est_fwd, "est_bwd": est_bwd if attrs.get("requires_grad", True) else 0.0,
            "est_opt": roofline_opt_time(attrs, ref_device, ref_roofline, optimizer),
        })
    return records


def roofline_comparison(ops: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Ratio of profiled to roofline seconds per op class and phase (and the optimizer updates)."""
    table: dict[str, Any] = {}
    for cls in OP_CLASSES:
        items = [op for op in ops if op["class"] == cls]
        if not items:
            continue
        table[cls] = {
            "forward": ratio_stats([op["fwd"] for op in items], [op["est_fwd"] for op in items]),
            "backward": ratio_stats([op["bwd"] for op in items], [op["est_bwd"] for op in items]),
        }
    upd = [op for op in ops if op["opt"] is not None and op["param_bytes"] > 0]
    if upd:
        table["optimizer update"] = {"update": ratio_stats([op["opt"] for op in upd], [op["est_opt"] for op in upd])}
    return table


# ============================================================================ stage 5: placements


def compile_for(prep: Any, cluster: Any) -> Any:
    """The compiled problem the search would score, through the simulator's public API.

    Placements are group rows either way; once ``compile_problem`` takes the op graph with
    its grouping (the op-level simulator), that is what it gets.
    """
    from envs.sim.problem_compile import compile_problem

    if "grouping" in inspect.signature(compile_problem).parameters:
        return compile_problem(prep.captured.graph, cluster, grouping=prep.grouping)
    return compile_problem(prep.grouping.graph, cluster)


def candidate_rows(problem: Any, prep: Any, count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """Distinct placements that fit: each device alone, every heuristic, then random mixes."""
    from envs.sim.simulator import simulate_batch
    from placer.search.baselines import BASELINES, run_baseline

    seen: set[bytes] = set()
    rows: list[tuple[str, np.ndarray]] = []

    def add(label: str, row: np.ndarray) -> None:
        row = np.asarray(row, dtype=np.int64)
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            rows.append((label, row))

    for d, name in enumerate(problem.device_names):
        add(f"single:{name}", np.full(problem.num_nodes, d, dtype=np.int64))
    for name in BASELINES:
        if name in ("single", "random"):
            continue
        try:
            res = run_baseline(name, problem, graph=prep.grouping.graph, seed=seed, captured=prep.captured,
                               op_to_group=prep.grouping.op_to_group)
        except Exception as exc:  # noqa: BLE001 - a heuristic that cannot run here is reported, not fatal
            log.info("baseline %s: %s", name, _first_line(exc))
            continue
        if res.placement is not None:
            add(name, res.placement)
    rows = rows[:count]
    rng = np.random.default_rng(seed)
    host = problem.device_names.index("cpu") if "cpu" in problem.device_names else 0
    for _ in range(20):
        need = count - len(rows)
        if need <= 0:
            break
        # Exactly the rows still needed, spanning the host shares; those that overfill memory
        # (or repeat a row) are drawn again.
        batch = np.stack(random_rows(problem.num_nodes, problem.num_devices, need, rng, host=host))
        fits = simulate_batch(problem, batch, backend="numpy").fits
        for k, row in enumerate(batch):
            if fits[k]:
                add(f"random:{float(np.mean(row == host)):.2f}cpu", row)
    return rows


def placement_agreement(label: str, zoo_name: str, model_args: Mapping[str, Any], prep: Any, cluster: Any,
                        count: int, warmup: int, repeats: int, timeout_s: float, seed: int,
                        deadline: Deadline) -> dict[str, Any]:
    """Measure and simulate ``count`` placements of one model over the cluster; calibrate; score."""
    from envs.runtime.measure import SingleProcessMeasurer
    from envs.sim.calibration import CalibrationError, agreement, calibrate_simulator
    from envs.sim.simulator import simulate_batch

    start = time.perf_counter()
    problem = compile_for(prep, cluster)
    candidates = candidate_rows(problem, prep, count, seed)
    rows = np.stack([row for _, row in candidates])
    simulated = simulate_batch(problem, rows, backend="numpy").step_time
    src = np.asarray(problem.edge_src)
    dst = np.asarray(problem.edge_dst)
    records: list[dict[str, Any]] = []
    measured = np.full(len(rows), np.inf)
    took: list[float] = []  # seconds per placement; the first also starts the worker
    # Exactly ``repeats`` timed steps (min_timed_s=0): the check's protocol and its device time are fixed.
    with SingleProcessMeasurer(f"zoo:{zoo_name}", model_args=dict(model_args), devices=cluster, warmup=warmup,
                               repeats=repeats, min_timed_s=0.0, timeout_s=timeout_s, num_threads=1,
                               expand=prep.grouping.expand) as m:
        for k, (how, row) in enumerate(candidates):
            # Keep 5 s for calibration and writing; a slow model measures fewer placements.
            if took and not deadline.fits(max(took[1:] or took) + 5.0):
                log.warning("%s: budget reached after %d of %d placements", label, k, len(candidates))
                break
            t0 = time.perf_counter()
            [r] = m.measure([problem.array_to_placement(row)])
            took.append(time.perf_counter() - t0)
            measured[k] = r.step_time if r.valid else np.inf
            records.append({
                "how": how, "devices_used": int(np.unique(row).size),
                "groups_on": {name: int(np.sum(row == d)) for d, name in enumerate(problem.device_names)},
                "cut_edges": int(np.sum(row[src] != row[dst])) if src.size else 0,
                "measured_s": float(measured[k]), "times_s": list(r.times), "valid": r.valid, "reason": r.reason,
                "simulated_s": float(simulated[k]), "note": r.note, "wall_s": round(took[-1], 2),
            })
    done = len(records)
    rows, measured, simulated = rows[:done], measured[:done], simulated[:done]
    out: dict[str, Any] = {"model": label, "groups": problem.num_nodes, "devices": list(problem.device_names),
                           "placements": records, "measured": done,
                           "valid": int(np.isfinite(measured).sum())}
    try:
        out["raw"] = agreement(simulated, measured)
    except CalibrationError as exc:
        out["raw_error"] = str(exc)
    fit_idx, held_idx = split_fit_held(done, seed + 1)
    try:
        cal = calibrate_simulator(problem, rows[fit_idx], measured[fit_idx])
        predicted = cal.predict(problem, rows)
        out["calibration"] = cal.to_dict()
        out["fit_placements"] = [int(i) for i in fit_idx]
        out["calibrated_held_out"] = agreement(predicted[held_idx], measured[held_idx])
        out["calibrated_all"] = agreement(predicted, measured)
        for k, rec in enumerate(records):
            rec["predicted_s"] = float(predicted[k])
            rec["fit"] = bool(k in set(fit_idx.tolist()))
        held = out["calibrated_held_out"]
        # A rank correlation over a handful of placements says little: no verdict below 5 held out.
        out["meets_target"] = (bool(held["spearman"] >= TARGET_SPEARMAN and held["mape"] <= TARGET_MAPE)
                               if held["n"] >= MIN_HELD_OUT else None)
    except CalibrationError as exc:
        out["calibration_error"] = str(exc)
    out["diagnosis"] = error_diagnosis(records)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# ============================================================================ the run


@dataclass
class Settings:
    """What one run does (the CLI fills it; the dry run shrinks it)."""

    device: str
    out: Path
    small: tuple[str, ...]
    paper: tuple[tuple[str, str, dict[str, Any]], ...]
    cpu_paper_args: dict[str, dict[str, Any]]
    placements: int
    warmup: int
    repeats: int
    profile_repeats: int
    budget_s: float
    seed: int
    timeout_s: float
    probes: bool = True
    cpu_paper_repeats: int = 1  # one thread at a reduced batch: seconds per run, one timed run is enough


def run_check(settings: Settings, command: str) -> dict[str, Any]:
    """Run every stage; returns the results (also written to ``settings.out``)."""
    import tempfile

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(settings.budget_s)
    dry = not settings.device.startswith("cuda")
    results: dict[str, Any] = {
        "command": command, "dry_run": dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": {"spearman": TARGET_SPEARMAN, "mape": TARGET_MAPE},
        "settings": {k: v for k, v in settings.__dict__.items() if k != "out"},
    }
    path = out / "results.json"

    def save() -> None:
        results["elapsed_s"] = round(deadline.elapsed(), 1)
        write_json(path, results)
        (out / "summary.md").write_text(summary_markdown(results))

    kind = "cuda" if not dry else "cpu"
    cluster = None
    with stage(results, "machine") as rec:
        rec["info"] = machine_info(settings.device)
        rec["figures"] = machine_figures(settings.device)
        cluster = cluster_from_figures(rec["figures"])
        under_test = "cpu" if dry else settings.device
        fp32 = next(d["peak_flops"] for d in rec["figures"]["devices"] if d["name"] == under_test)
        rec["half_rates"] = half_precision_rates(under_test, float(fp32))
        rec["cluster"] = cluster.describe()
    save()

    if settings.probes:
        with stage(results, "probes") as rec:
            rec.update(runtime_probes(settings.device))
        save()
    with stage(results, "pipeline") as rec:
        rec.update(pipeline_on_device("cpu:0" if dry else settings.device))
    save()
    with stage(results, "eval mode") as rec:
        rec.update(eval_mode_on_device("cpu" if dry else settings.device))
    save()
    with stage(results, "factories") as rec:
        rec.update(factories_on_device("cpu" if dry else settings.device))
    save()

    profile_devices = ["cpu"] if dry else ["cpu", settings.device]
    ops: list[dict[str, Any]] = []
    ref_dev, ref_roof = reference_device(kind)
    results["roofline_reference"] = {"device": ref_dev.name, "kind": ref_dev.kind, "peak_flops": ref_dev.peak_flops,
                                     "mem_bandwidth": ref_dev.mem_bandwidth, "efficiency": ref_roof.efficiency,
                                     "launch_overhead_s": ref_roof.launch_overhead_s}
    prepared: dict[str, Any] = {}
    profiles: list[dict[str, Any]] = []
    results["profiles"] = profiles
    # Removed when run_check returns or raises (the object's finalizer), not left in /tmp.
    cache_dir = tempfile.TemporaryDirectory(prefix="gpu-check-profiles-")
    cache = cache_dir.name

    def profile(label: str, zoo: str, args: Mapping[str, Any], devices: Sequence[str], estimate_s: float,
                repeats: int = settings.profile_repeats) -> None:
        if not deadline.fits(estimate_s):
            profiles.append({"label": label, "devices": list(devices), "skipped": f"budget: {deadline.left():.0f}s left"})
            return
        with stage(results, f"profile {label} on {'+'.join(devices)}") as rec:
            prep, record = profile_model(label, zoo, args, devices, repeats, cache)
            profiles.append(record)
            rec["nodes"] = record["nodes"]
            if any(d.split(":")[0] == kind for d in devices):
                ops.extend(op_records(label, prep.captured.graph, kind, ref_dev, ref_roof, record["optimizer"]))
            if label in settings.small:
                prepared[label] = prep
        save()

    for label, zoo, args in settings.paper:
        profile(label, zoo, args, [settings.device], 20.0)
    for name in settings.small:
        profile(name, name, {"size": "small"}, profile_devices, 5.0)

    with stage(results, "roofline") as rec:
        rec["ops"] = len(ops)
        results["ops"] = ops
        results["roofline"] = {"all": roofline_comparison(ops),
                               "by_model": {m: roofline_comparison([o for o in ops if o["model"] == m])
                                            for m in dict.fromkeys(o["model"] for o in ops)}}
        measured_devices = (results["stages"]["machine"].get("figures") or {}).get("devices", [])
        under_test = "cpu" if dry else settings.device
        gpu = next((d for d in measured_devices if d["name"] == under_test), None)
        if gpu is not None:
            peak, bw = float(gpu["peak_flops"]), float(gpu["mem_bandwidth"])
            fitted = fit_class_constants(ops, peak, bw)
            one = fit_roofline(ops, peak, bw)
            fitted["roofline"] = one
            fitted["measured_peak_flops"], fitted["measured_mem_bandwidth"] = peak, bw
            fitted["forward_mape"] = {
                "preset": roofline_mape(ops, ref_dev.peak_flops, ref_dev.mem_bandwidth, ref_roof.efficiency,
                                        ref_roof.launch_overhead_s),
                "fitted": (roofline_mape(ops, peak, bw, one["efficiency"], one["launch_overhead_s"])
                           if one else None),
            }
            results["fitted_constants"] = fitted
    save()

    agreements: list[dict[str, Any]] = []
    results["placements"] = agreements
    models = [m for m in settings.small if m in prepared]
    # The paper models' CPU profiles come last (the placements are what the targets are about);
    # this much of the budget is kept for them.
    cpu_paper = [] if dry else [(f"{label}@cpu", zoo, {**args, **settings.cpu_paper_args.get(label, {})})
                                for label, zoo, args in settings.paper]
    keep_s = CPU_PAPER_PROFILE_S * len(cpu_paper)
    for i, name in enumerate(models):
        # The budget left is shared by the models still to measure.
        share = (deadline.left() - keep_s) / max(len(models) - i, 1)
        if share < 10.0:
            agreements.append({"model": name, "skipped": f"budget: {deadline.left():.0f}s left"})
            continue
        with stage(results, f"placements {name}") as rec:
            sub = Deadline(share)
            res = placement_agreement(name, name, {"size": "small"}, prepared[name], cluster, settings.placements,
                                      settings.warmup, settings.repeats, settings.timeout_s, settings.seed, sub)
            agreements.append(res)
            rec["measured"] = res["measured"]
        save()
    results["placement_summary"] = pooled_agreement(agreements)
    save()
    for label, zoo, args in cpu_paper:
        # Profiled on the CPU, not compared with the GPU roofline (their ops stay out of ``ops``).
        profile(label, zoo, args, ["cpu"], CPU_PAPER_PROFILE_S, settings.cpu_paper_repeats)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    cache_dir.cleanup()
    return results


def pooled_agreement(agreements: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many models meet the targets, and the worst held-out figures."""
    scored = [a for a in agreements if "calibrated_held_out" in a]
    return {
        "models": len(agreements), "calibrated": len(scored),
        "judged": sum(a.get("meets_target") is not None for a in scored),
        "meet_target": sum(bool(a.get("meets_target")) for a in scored),
        "placements_measured": int(sum(a.get("measured", 0) for a in agreements)),
        "worst_held_out_spearman": min((a["calibrated_held_out"]["spearman"] for a in scored), default=None),
        "worst_held_out_mape": max((a["calibrated_held_out"]["mape"] for a in scored), default=None),
    }


# ============================================================================ summary


def _fmt_s(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} µs"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def summary_markdown(results: Mapping[str, Any]) -> str:
    """The human-readable account of one run (``summary.md``)."""
    lines = ["# GPU check: profiled and measured vs simulated" + (" (DRY RUN on the CPU)" if results.get("dry_run") else ""),
             "", f"Command: `{results.get('command', '')}`  ", f"Started {results.get('started', '')}, "
             f"{results.get('elapsed_s', 0)} s so far" + (f", finished {results['finished']}" if "finished" in results else "")
             + ".", ""]
    machine = (results.get("stages") or {}).get("machine", {})
    info = machine.get("info", {})
    if info:
        lines += ["## Machine", "", f"torch {info.get('torch')}, Python {info.get('python')}, {info.get('cpu_count')} CPUs"
                  + (f", {info['gpu_name']} ({info['gpu_memory_bytes'] / 2**30:.0f} GiB, CUDA {info.get('cuda')}, "
                     f"TF32 matmul {'on' if info.get('tf32_matmul') else 'off'})" if "gpu_name" in info else "") + ".", ""]
    fig = machine.get("figures") or {}
    if fig:
        # reserved: what the GPU held before the first tensor (the CUDA context), against the
        # spec default envs.hardware.cluster.GPU_CONTEXT_BYTES, which is an estimate.
        lines += ["| device | peak fp32 matmul | copy bandwidth | memory | reserved (CUDA context) |",
                  "|---|---|---|---|---|"]
        for d in fig.get("devices", []):
            reserved = d.get("reserved_bytes")
            lines.append(f"| {d['name']} | {d['peak_flops'] / 1e12:.2f} TFLOP/s | {d['mem_bandwidth'] / 1e9:.1f} GB/s | "
                         f"{d['memory_bytes'] / 2**30:.1f} GiB | "
                         + (f"{reserved / 2**20:.0f} MiB |" if reserved is not None else "- |"))
        rates = machine.get("half_rates")
        if rates:
            from envs.sim.cost_model import HALF_RATE

            ref_kind = reference_device("cpu" if results.get("dry_run") else "cuda")[0].kind
            assumed = HALF_RATE.get(ref_kind, {})
            lines.append("\nHalf-precision matmul (the fp32 one's size): " + ", ".join(
                f"{dtype.replace('torch.', '')} {rate:.2f}x the fp32 rate (the roofline's {ref_kind}: "
                f"{assumed.get(dtype, 1.0):.2f}x)" for dtype, rate in rates.items())
                + " (envs.sim.cost_model.HALF_RATE, from datasheets).")
        how = "assumed: a virtual device on the same CPU" if fig.get("virtual") else "pinned copies"
        for lk in fig.get("links", []):
            lines.append(f"\nLink {lk['src']}→{lk['dst']}: latency {_fmt_s(lk['latency_s'])}, "
                         f"{lk['bandwidth_Bps'] / 1e9:.2f} GB/s ({how}).")
        lines.append("")
    probes = (results.get("stages") or {}).get("probes")
    if probes and probes.get("status") == "done":
        lines += ["## Runtime probes (issue 15: M2, M4, M5)", "",
                  f"- issuing one tiny op: {_fmt_s(probes.get('forward_issue_s_per_op'))} on the host; "
                  f"{_fmt_s(probes.get('forward_synced_s_per_op'))} per op with the device finished; "
                  f"{_fmt_s(probes.get('graphmodule_issue_s_per_op'))} per op in an fx GraphModule",
                  f"- one backward node: {_fmt_s(probes.get('backward_s_per_node'))}",
                  f"- backward on the calling thread: {probes.get('backward_on_calling_thread')}"]
        if "h2d_pageable_host_s" in probes:
            lines += [f"- 64 MiB host→GPU `non_blocking` copy issued behind {_fmt_s(probes.get('gpu_busy_s'))} of GPU "
                      f"work holds the host {_fmt_s(probes['h2d_pageable_host_s'])} (pageable) vs "
                      f"{_fmt_s(probes.get('h2d_pinned_host_s'))} (pinned); a GPU→CPU copy after the same work "
                      f"returns after {_fmt_s(probes.get('d2h_after_busy_host_s'))}"]
        lines.append("")
    pipe = (results.get("stages") or {}).get("pipeline")
    if pipe and pipe.get("status") == "done":
        lines += ["## The pipeline runtime on the device (issue 16)", "",
                  "Two stages of a small MLP on one rank, interleaved 1F1B, M = 2, three SGD steps "
                  "(`pipeline_on_device`):", ""]
        for where, r in pipe["runs"].items():
            lines.append(f"- {where}: losses {', '.join(f'{x:.6f}' for x in r['losses'])}; step times "
                         f"{', '.join(_fmt_s(x) for x in r['step_s'])}; {r['wall_s']} s with process start")
        lines += [f"- losses agree: {pipe['agree']} (largest relative difference "
                  f"{pipe['max_relative_loss_difference']:.2e})", ""]
    elif pipe:
        lines += ["## The pipeline runtime on the device (issue 16)", "", f"- {pipe.get('status')}: "
                  f"{pipe.get('error', '')}", ""]
    ev = (results.get("stages") or {}).get("eval mode")
    if ev:
        lines += ["## A placed model after .eval() (cpu + the device)", ""]
        if ev.get("status") == "done":
            for label in ("fx", "export"):
                r = ev[label]
                lines.append(f"- {label} ({r['method']}; eval graph {r['eval_graph']}): output on {r['output_device']}, "
                             f"largest difference from the original {r['max_abs_difference']:.2e}, "
                             f"of the buffer eval mode updates {r.get('eval_update_difference', 0.0):.2e}")
            lines += [f"- agree: {ev['agree']}", ""]
        else:
            lines += [f"- {ev.get('status')}: {ev.get('error', '')}", ""]
    fac = (results.get("stages") or {}).get("factories")
    if fac:
        lines += ["## Tensors made in forward (torch.arange, torch.randn) on cpu + the device", ""]
        if fac.get("status") == "done":
            lines += [f"- losses placed {fac['losses']['placed']}, original {fac['losses']['original']} (largest "
                      f"difference {fac['max_loss_difference']:.2e}); after a pickle round trip "
                      f"{fac['pickle_round_trip_difference']:.2e}; agree: {fac['agree']}", ""]
        else:
            lines += [f"- {fac.get('status')}: {fac.get('error', '')}", ""]
    profiles = results.get("profiles") or []
    if profiles:
        lines += ["## Profiles (sum of per-op times, one step)", "",
                  "| model | devices | nodes | groups | GFLOP fwd | forward | backward | optimizer | profile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in profiles:
            if "skipped" in p:
                lines.append(f"| {p['label']} | {'+'.join(p['devices'])} | skipped: {p['skipped']} | | | | | | |")
                continue
            for kind, t in p["sum_of_op_times_s"].items():
                lines.append(f"| {p['label']} {p.get('model_args', {})} | {kind} | {p['nodes']} | {p['groups']} | "
                             f"{p['flops_fwd'] / 1e9:.2f} | {_fmt_s(t['forward'])} | {_fmt_s(t['backward'])} | "
                             f"{_fmt_s(t['optimizer'])} | {p['profile_s']} |")
        lines.append("")
    ref = results.get("roofline_reference")
    roof = (results.get("roofline") or {}).get("all")
    if ref and roof:
        lines += [f"## Profiled vs roofline ({ref['kind']} preset device: {ref['peak_flops'] / 1e12:.1f} TFLOP/s, "
                  f"{ref['mem_bandwidth'] / 1e9:.0f} GB/s, efficiency {ref['efficiency']}, "
                  f"{ref['launch_overhead_s'] * 1e6:.0f} µs per op)", "",
                  "Ratio > 1: the op is slower than the preset assumes.", "",
                  "| class | phase | ops | profiled | roofline | Σ ratio | median ratio | MAPE |",
                  "|---|---|---|---|---|---|---|---|"]
        for cls, phases in roof.items():
            for phase, st in phases.items():
                lines.append(f"| {cls} | {phase} | {st['n']} | {_fmt_s(st['measured_s'])} | {_fmt_s(st['estimated_s'])} | "
                             f"{_fmt(st['sum_ratio'], '.2f')} | {_fmt(st['median_ratio'], '.2f')} | "
                             f"{_fmt(st['mape'], '.0%')} |")
        lines.append("")
        by_model = (results.get("roofline") or {}).get("by_model") or {}
        if by_model:
            lines += ["Per model, Σ profiled / Σ roofline over the ops that do work:", "",
                      "| model | forward | backward | optimizer update |", "|---|---|---|---|"]
            for model, table in by_model.items():
                cells = []
                for phase in ("forward", "backward"):
                    m = sum(table[c][phase]["measured_s"] for c in (MATMUL, ELEMENTWISE, LAUNCH) if c in table)
                    e = sum(table[c][phase]["estimated_s"] for c in (MATMUL, ELEMENTWISE, LAUNCH) if c in table)
                    cells.append(f"{m / e:.2f}" if e > 0 else "—")
                upd = (table.get("optimizer update") or {}).get("update") or {}
                cells.append(_fmt(upd.get("sum_ratio"), ".2f"))
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
    fitted = results.get("fitted_constants")
    if fitted:
        one = fitted.get("roofline") or {}
        lines += ["## Constants fitted to the profiles", "",
                  f"- per-op overhead (median of launch-bound ops): {_fmt_s(fitted.get('launch_overhead_s'))}",
                  f"- matmul/conv efficiency vs the measured peak: {_fmt(fitted.get('matmul_efficiency'), '.1%')}",
                  f"- element-wise bandwidth fraction vs the measured copy bandwidth: "
                  f"{_fmt(fitted.get('elementwise_bandwidth_fraction'), '.1%')}",
                  "- backward/forward per class: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in
                                                                 (fitted.get('backward_factor') or {}).items()),
                  f"- one-efficiency roofline (cost model): efficiency {_fmt(one.get('efficiency'), '.3f')}, "
                  f"{_fmt_s(one.get('launch_overhead_s'))} per op; forward MAPE over all ops "
                  f"{_fmt((fitted.get('forward_mape') or {}).get('fitted'), '.0%')} (preset constants: "
                  f"{_fmt((fitted.get('forward_mape') or {}).get('preset'), '.0%')})"]
        issue = ((results.get("stages") or {}).get("probes") or {}).get("forward_issue_s_per_op")
        try:
            chosen, why = roofline_constants(fitted, issue)
            lines.append(f"- constants `--to-preset` writes for the kind: efficiency {chosen['efficiency']:.3f} "
                         f"({why['efficiency']}), {_fmt_s(chosen['launch_overhead_s'])} per op "
                         f"({why['launch_overhead_s']})")
        except CheckError as exc:
            lines.append(f"- no constants for a preset: {exc}")
        lines.append("")
    agreements = results.get("placements") or []
    if agreements:
        lines += ["## Placements over cpu + the device: measured vs simulated", "",
                  f"Targets after calibration: Spearman ≥ {TARGET_SPEARMAN}, MAPE ≤ {TARGET_MAPE:.0%} (held out).", "",
                  "| model | groups | measured (valid) | raw Spearman | raw MAPE | held-out Spearman | held-out MAPE | "
                  "all Spearman | all MAPE | target |", "|---|---|---|---|---|---|---|---|---|---|"]
        for a in agreements:
            if "skipped" in a:
                lines.append(f"| {a['model']} | skipped: {a['skipped']} | | | | | | | | |")
                continue
            raw, held, every = a.get("raw", {}), a.get("calibrated_held_out", {}), a.get("calibrated_all", {})
            lines.append(f"| {a['model']} | {a['groups']} | {a['measured']} ({a['valid']}) | "
                         f"{_fmt(raw.get('spearman'), '.3f')} | {_fmt(raw.get('mape'), '.1%')} | "
                         f"{_fmt(held.get('spearman'), '.3f')} | {_fmt(held.get('mape'), '.1%')} | "
                         f"{_fmt(every.get('spearman'), '.3f')} | {_fmt(every.get('mape'), '.1%')} | "
                         f"{ {True: 'met', False: 'missed'}.get(a.get('meets_target'), 'too few held out')} |")
        lines.append("")
        singles = [(a["model"], p) for a in agreements for p in a.get("placements", []) if p["devices_used"] == 1]
        if singles:
            lines += ["Each device alone (the op costs without placement rules):", "",
                      "| model | placement | measured | simulated | calibrated |", "|---|---|---|---|---|"]
            for model, p in singles:
                lines.append(f"| {model} | {p['how']} | {_fmt_s(p['measured_s'])} | {_fmt_s(p['simulated_s'])} | "
                             f"{_fmt_s(p.get('predicted_s'))} |")
            lines.append("")
        for a in agreements:
            if a.get("diagnosis"):
                lines.append(f"- **{a['model']}**: " + "; ".join(a["diagnosis"]))
            if a.get("calibration"):
                c = a["calibration"]
                lines.append(f"  calibration: compute scale {c['compute_scale']}, latency ×{c['latency_scale']:.2f}, "
                             f"bandwidth ×{c['bandwidth_scale']:.2f}, overhead {_fmt_s(c['overhead_s'])}")
        lines.append("")
    failed = {k: v for k, v in (results.get("stages") or {}).items() if v.get("status") == "failed"}
    if failed:
        lines += ["## Failed stages", ""] + [f"- {k}: {v.get('error')}" for k, v in failed.items()] + [""]
    return "\n".join(lines)


# ============================================================================ --to-preset


def roofline_constants(fitted: Mapping[str, Any], issue_s_per_op: float | None) -> tuple[dict[str, float], dict[str, str]]:
    """The :class:`envs.sim.cost_model.Roofline` of the GPU kind, and where each figure came from.

    The cost model charges a GPU op ``max(flops / (peak × efficiency), bytes / bandwidth)``
    on the device's stream and ``launch_overhead_s`` on the host thread that issues it. So:

    * ``efficiency`` is the matmul/conv class's (what the FLOP term prices; the peak is the
      measured one the preset carries), clipped to 1; without matmul ops, the least-squares
      fit's;
    * ``launch_overhead_s`` is the host's cost of issuing one op, from the runtime probe
      (a profiled launch-bound op also holds the kernel and a sync); without the probe, the
      least-squares fit's.
    """
    lsq = fitted.get("roofline") or {}
    mm = fitted.get("matmul_efficiency")
    if mm is not None and mm > 0:
        eff, eff_why = min(float(mm), 1.0), "matmul/conv ops: FLOPs / (measured peak x their time less the per-op overhead)"
    elif lsq:
        eff, eff_why = float(lsq["efficiency"]), "least squares over every profiled op (no matmul/conv op profiled)"
    else:
        raise CheckError("the results hold neither a matmul efficiency nor a roofline fit; rerun the check")
    if issue_s_per_op is not None and issue_s_per_op > 0:
        launch, launch_why = float(issue_s_per_op), "runtime probe: host seconds to issue one tiny op"
    elif lsq:
        launch, launch_why = float(lsq["launch_overhead_s"]), "least squares over every profiled op (no probe)"
    else:
        raise CheckError("the results hold neither a host-issue probe nor a roofline fit; rerun the check")
    return {"efficiency": eff, "launch_overhead_s": launch}, {"efficiency": eff_why, "launch_overhead_s": launch_why}


def preset_from_results(results: Mapping[str, Any], name: str, kind: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(cluster spec, cost-model constants, YAML header) for the device kind from a run's results.

    The spec has the machine's CPU and its GPU (as ``gpu0`` of kind ``kind``) with the
    measured peak fp32 matmul FLOP/s, copy bandwidth and memory, and the measured links.
    The constants are the kind's :class:`envs.sim.cost_model.Roofline`
    (:func:`roofline_constants`), the per-op-class figures behind it, the least-squares
    alternative and the host-side probe figures.

    Raises:
        CheckError: results without machine figures or fitted constants.
    """
    from envs.hardware.cluster import DEVICE_KINDS

    if kind not in DEVICE_KINDS:
        raise CheckError(f"device kind {kind!r} is not one of {list(DEVICE_KINDS)}; add it to "
                         "envs.hardware.cluster.DEVICE_KINDS first")
    figures = ((results.get("stages") or {}).get("machine") or {}).get("figures")
    fitted = results.get("fitted_constants")
    if not figures or not figures.get("devices"):
        raise CheckError("the results hold no machine figures (stage 'machine' did not finish); rerun the check")
    if not fitted or not fitted.get("roofline"):
        raise CheckError("the results hold no fitted roofline constants (too few profiled ops); rerun the check")
    devices = figures["devices"]
    cpu = next((d for d in devices if d["kind"] == "cpu" and d["name"] == "cpu"), None)
    accel = next((d for d in devices if d["name"] != "cpu"), None)
    if cpu is None or accel is None:
        raise CheckError(f"the results' machine has devices {[d['name'] for d in devices]}; expected cpu and one GPU")

    def dev(entry: Mapping[str, Any], new_name: str, new_kind: str) -> dict[str, Any]:
        return {"name": new_name, "kind": new_kind, "memory": f"{entry['memory_bytes'] / 2**30:.1f}GiB",
                "reserved": f"{int(entry.get('reserved_bytes', 0)) / 2**20:.0f}MiB" if entry.get("reserved_bytes")
                else 0,  # measured: the CUDA context on the checked GPU
                "peak_flops": f"{entry['peak_flops'] / 1e12:.3f}T",
                "mem_bandwidth": f"{entry['mem_bandwidth'] / 1e9:.1f}GB/s"}

    rename = {cpu["name"]: "cpu", accel["name"]: "gpu0"}
    links = [{"from": rename[lk["src"]], "to": rename[lk["dst"]], "latency": f"{lk['latency_s'] * 1e6:.2f}us",
              "bandwidth": f"{lk['bandwidth_Bps'] / 1e9:.2f}GB/s"}
             for lk in figures.get("links", []) if lk["src"] in rename and lk["dst"] in rename]
    info = ((results.get("stages") or {}).get("machine") or {}).get("info") or {}
    gpu_name = info.get("gpu_name", accel["name"])
    spec = {"name": name,
            "description": f"1 CPU (one thread) + 1 {gpu_name}, figures measured by benchmarks/gpu_check.py",
            "devices": [dev(cpu, "cpu", "cpu"), dev(accel, "gpu0", kind)], "links": links}
    probes = (results.get("stages") or {}).get("probes") or {}
    chosen, why = roofline_constants(fitted, probes.get("forward_issue_s_per_op"))
    one = chosen
    constants = {"kind": kind, "roofline": chosen, "why": why,
                 "least_squares_fit": fitted["roofline"],
                 "per_op_class": {k: fitted.get(k) for k in ("launch_overhead_s", "matmul_efficiency",
                                                              "elementwise_bandwidth_fraction", "backward_factor", "ops")},
                 "host": {k: probes.get(k) for k in ("forward_issue_s_per_op", "forward_synced_s_per_op",
                                                      "graphmodule_issue_s_per_op", "backward_s_per_node", "backward_on_calling_thread",
                                                      "h2d_pageable_host_s", "h2d_pinned_host_s", "gpu_busy_s")},
                 "forward_mape": fitted.get("forward_mape"),
                 "source": {"command": results.get("command"), "started": results.get("started"), "gpu": gpu_name,
                            "torch": info.get("torch"), "dry_run": bool(results.get("dry_run"))},
                 "cost_model_line": f"\"{kind}\": Roofline({chosen['efficiency']:.3g}, "
                                    f"{chosen['launch_overhead_s']:.3g}),"}
    per = constants["per_op_class"]
    header = "\n".join([
        f"# {gpu_name} with its host CPU, as measured by benchmarks/gpu_check.py"
        + (" (DRY RUN: CPU figures standing in for a GPU)" if results.get("dry_run") else ""),
        f"# run {results.get('started')}, torch {info.get('torch')}: {results.get('command')}",
        "# peak_flops: best timed fp32 matmul (TF32 off, PyTorch's default); mem_bandwidth: timed device copy;",
        "# links: pinned copies fitted to latency + bytes / bandwidth (envs.hardware.links). The CPU runs at one",
        "# torch thread, as placer profiles and measures it.",
        f"# Cost-model constants for kind {kind} (envs.sim.cost_model.DEFAULT_ROOFLINE): "
        f"efficiency {one['efficiency']:.3g} ({why['efficiency']}),",
        f"# launch overhead {one['launch_overhead_s'] * 1e6:.2f} us per op ({why['launch_overhead_s']})",
        f"# Per op class: matmul/conv efficiency {_fmt(per['matmul_efficiency'], '.3g')} of peak, element-wise "
        f"{_fmt(per['elementwise_bandwidth_fraction'], '.3g')} of the copy bandwidth, "
        f"{_fmt_s(per['launch_overhead_s'])} per launch-bound op; backward/forward "
        + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in (per.get("backward_factor") or {}).items()),
    ])
    return spec, constants, header


def write_preset(results_dir: Path, out_yaml: Path, kind: str, name: str | None = None) -> tuple[Path, Path]:
    """Write the preset YAML and its ``.roofline.json`` from a results folder; both checked by loading."""
    import yaml

    from envs.hardware.loading import load_cluster

    path = results_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckError(f"{results_dir} holds no results.json; expected the --out folder of a gpu_check run") from None
    except json.JSONDecodeError as exc:
        raise CheckError(f"{path} is not valid JSON ({exc}); expected the results of a gpu_check run") from None
    spec, constants, header = preset_from_results(results, name or out_yaml.stem, kind)
    out_yaml.parent.mkdir(parents=True, exist_ok=True)
    out_yaml.write_text(header + "\n" + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=140))
    load_cluster(str(out_yaml))  # the preset must load as a cluster spec
    side = out_yaml.with_suffix(".roofline.json")
    write_json(side, constants)
    return out_yaml, side


# ============================================================================ CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0", help="'cuda:0' (the check) or 'cpu' (dry run: tiny, few placements)")
    p.add_argument("--out", type=Path, help="output folder (results.json, summary.md)")
    p.add_argument("--models", nargs="+", default=None, help="small zoo models to profile and place (default: all)")
    p.add_argument("--no-paper", action="store_true", help="skip the paper-size GPT-2 and NMT-2L profiles")
    p.add_argument("--placements", type=int, default=None, help="placements per small model (default 24; dry run 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per placement (default 3; dry run 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per placement (default 7; dry run 2)")
    p.add_argument("--profile-repeats", type=int, default=None, help="profiled runs per model (default 5; dry run 2)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds "
                                                                  "(default 300; dry run 120)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="limit for measuring one placement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-probes", action="store_true", help="skip the runtime probes")
    p.add_argument("--to-preset", nargs=2, metavar=("RESULTS_DIR", "OUT_YAML"), type=Path,
                   help="write a cluster preset (+ OUT.roofline.json) from a results folder, then exit")
    p.add_argument("--kind", default="H200", help="device kind of the GPU in the preset (default H200)")
    p.add_argument("--name", default=None, help="cluster name in the preset (default: the YAML file's stem)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's settings: the full check on a GPU, a tiny one on the CPU."""
    if args.out is None:
        raise CheckError("--out is required: the folder the results go to")
    dry = not args.device.startswith("cuda")
    if args.device != "cpu" and dry:
        raise CheckError(f"--device {args.device!r} is not supported; expected 'cuda:N' or 'cpu' (dry run)")
    if not dry:
        import torch

        if not torch.cuda.is_available():
            raise CheckError(f"--device {args.device} asked for, but this torch sees no CUDA device; "
                             "use --device cpu for the dry run")
    small = tuple(args.models) if args.models else (("rnnlm", "gpt2") if dry else SMALL_MODELS)
    unknown = [m for m in small if m not in SMALL_MODELS]
    if unknown:
        raise CheckError(f"unknown zoo model(s) {unknown}; expected some of {list(SMALL_MODELS)}")
    if args.no_paper:
        paper: tuple[tuple[str, str, dict[str, Any]], ...] = ()
    elif dry:
        # Small presets stand in for the paper models: the dry run checks the path, not the figures.
        paper = (("gpt2-paper", "gpt2", {"size": "small", "layers": 1}),)
    else:
        paper = PAPER_MODELS
    placements = args.placements if args.placements is not None else (6 if dry else 24)
    if placements < 5:
        raise CheckError(f"--placements {placements}: need at least 5 (3 to fit the calibration, 2 held out)")
    return Settings(
        device=args.device, out=args.out, small=small, paper=paper, cpu_paper_args=CPU_PAPER_ARGS,
        placements=placements,
        warmup=args.warmup if args.warmup is not None else (1 if dry else 3),
        repeats=args.repeats if args.repeats is not None else (2 if dry else 7),
        profile_repeats=args.profile_repeats if args.profile_repeats is not None else (2 if dry else 5),
        budget_s=args.budget_s if args.budget_s is not None else (120.0 if dry else 300.0),
        seed=args.seed, timeout_s=args.timeout_s, probes=not args.no_probes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check (or ``--to-preset``); bad use prints one line and returns 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        if args.to_preset is not None:
            results_dir, out_yaml = args.to_preset
            yaml_path, side = write_preset(results_dir, out_yaml, args.kind, args.name)
            print(f"wrote {yaml_path} and {side}")
            print(f"cost model: {json.loads(side.read_text())['cost_model_line']}")
            return 0
        settings = settings_from_args(args)
        preflight()
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from graphs.errors import PlacerError

    words = [sys.argv[0] if argv is None else "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    command = "python " + " ".join(shlex.quote(str(w)) for w in words)
    try:
        results = run_check(settings, command)
    except PlacerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pooled = results.get("placement_summary", {})
    failed = [k for k, v in results.get("stages", {}).items() if v.get("status") == "failed"]
    print(f"wrote {settings.out / 'results.json'} and summary.md in {results.get('elapsed_s')} s; "
          f"{pooled.get('placements_measured', 0)} placements measured, {pooled.get('meet_target', 0)} of "
          f"{pooled.get('judged', 0)} models with >= {MIN_HELD_OUT} held out meet the targets; failed stages: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
