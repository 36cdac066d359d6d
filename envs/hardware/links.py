"""Measure the real machine: device throughput and link latency/bandwidth, cached on disk.

:func:`measure_machine` builds the :class:`~envs.hardware.cluster.Cluster` of this machine
(``cpu`` plus every ``cuda:i``, ``simulated=False``):

* **memory**: ``MemTotal`` of ``/proc/meminfo`` for the CPU, ``total_memory`` for a GPU, and
  what a GPU holds before placer's first tensor (its ``reserved_bytes``: ``total - free`` of
  ``torch.cuda.mem_get_info`` once this process's CUDA context exists, other processes'
  memory included; measured again on every run, never taken from the cache);
* **peak FLOP/s**: the best of a few timed fp32 matmuls (what the roofline calls peak is
  what a large matmul reaches here, at the current torch thread count);
* **memory bandwidth**: the best of a few timed copies of a large tensor (read + write);
* **links**: timed copies of a small and a large tensor in each direction (CPU↔GPU from
  pinned memory, GPU↔GPU peer copies). ``time(bytes) = latency + bytes / bandwidth`` is
  fitted through the two sizes (medians of several repeats).

The figures are cached as JSON under ``cache_dir`` (default ``~/.cache/placer``), keyed by
host name, torch version and the GPU models, because measuring takes seconds and the
simulator needs them on every run. ``refresh=True`` measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from envs.hardware.cluster import Cluster, ClusterSpecError, Device, Link

CACHE_VERSION = 2  # 2: a GPU's reserved bytes
SMALL_BYTES = 4 * 1024
LARGE_BYTES = 64 * 1024 * 1024


def fit_latency_bandwidth(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of ``seconds = latency + size / bandwidth``; returns (latency, bandwidth).

    Raises:
        ValueError: fewer than two distinct sizes, or times that do not grow with size.
    """
    import numpy as np

    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.size < 2 or np.unique(x).size < 2:
        raise ValueError("need timings of at least two different sizes to separate latency from bandwidth")
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        raise ValueError(f"copy time does not grow with size (slope {slope:.3g} s/B); the timing is too noisy")
    return max(float(intercept), 0.0), float(1.0 / slope)


def link_from_trips(one_way: Mapping[int, Sequence[float]]) -> tuple[float, float]:
    """Latency (s) and bandwidth (B/s) of a link between two processes from the one-way times
    (s) of messages of several sizes (bytes): the fastest time of each size, then
    :func:`fit_latency_bandwidth`. The fastest, because a receive that sleeps and is woken late
    only adds to a trip, and the rank simulator charges such wake-ups apart (R3 of
    :mod:`envs.sim.ranks`); measurements in ``envs.runtime.distributed.worker._ping_pong``.

    >>> link_from_trips({4096: [2.1e-3, 60e-6, 70e-6], 8 << 20: [3.3e-3, 3.2e-3]})[0] < 1e-4
    True

    Raises:
        ValueError: as :func:`fit_latency_bandwidth` (fewer than two sizes, times that do not grow).
    """
    sizes = sorted(one_way)
    return fit_latency_bandwidth(sizes, [min(one_way[size]) for size in sizes])


def _median_time(fn: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (allocations, lazy initialisation)
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _synchronizer(torch: ModuleType, device: str) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read (a CUDA device; a CPU runs inline)."""
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def matmul_flops(torch: ModuleType, device: str, dtype: Any = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on ``device`` in ``dtype`` (None: torch's default, fp32): the
    median of ``repeats`` timed products after a warm-up. The same size for every dtype, so that
    rates compare (the half-precision ones against fp32, ``benchmarks/gpu_check.py``)."""
    sync = _synchronizer(torch, device)
    n = 512 if device.startswith("cpu") else 4096  # 512: near peak on one core, quick under load
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / _median_time(lambda: torch.mm(a, b), sync, repeats)


def _device_figures(torch: ModuleType, device: str, repeats: int = 5) -> tuple[float, float]:
    """(peak FLOP/s, memory bandwidth B/s) measured on ``device``."""
    sync = _synchronizer(torch, device)
    flops = matmul_flops(torch, device, repeats=repeats)
    elems = LARGE_BYTES // 4
    src = torch.empty(elems, device=device)
    dst = torch.empty(elems, device=device)
    t_copy = _median_time(lambda: dst.copy_(src), sync, repeats)
    return flops, 2.0 * LARGE_BYTES / t_copy


def _link_figures(torch: ModuleType, src: str, dst: str, repeats: int = 7) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of copies from ``src`` to ``dst``."""

    def sync() -> None:
        for dev in (src, dst):
            if dev.startswith("cuda"):
                torch.cuda.synchronize(dev)

    sizes, times = [], []
    for nbytes in (SMALL_BYTES, LARGE_BYTES):
        elems = nbytes // 4
        # Host buffers are pinned, as a training job's host<->GPU copies should be.
        a = torch.empty(elems, pin_memory=True) if src == "cpu" else torch.empty(elems, device=src)
        b = torch.empty(elems, pin_memory=True) if dst == "cpu" else torch.empty(elems, device=dst)
        times.append(_median_time(lambda: b.copy_(a, non_blocking=True), sync, repeats))
        sizes.append(nbytes)
    return fit_latency_bandwidth(sizes, times)


def _cache_key(torch: ModuleType) -> str:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    text = json.dumps([CACHE_VERSION, platform.node(), torch.__version__, os.cpu_count(), gpus])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cluster_from_record(record: dict) -> Cluster:
    devices = tuple(Device(**d) for d in record["devices"])
    links = tuple(Link(**link) for link in record["links"])
    return Cluster(record["name"], devices, links, simulated=False)


def measure_devices_and_links(torch: ModuleType | None = None) -> dict[str, Any]:
    """Measure this machine now; returns the JSON-able record :func:`measure_machine` caches."""
    if torch is None:
        import torch as torch_module  # imported late: only measurement needs it

        torch = torch_module
    flops, bandwidth = _device_figures(torch, "cpu")
    devices = [dict(name="cpu", kind="cpu", memory_bytes=_host_memory_bytes(), peak_flops=flops,
                    mem_bandwidth=bandwidth, real_device="cpu")]
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    for name in gpus:
        props = torch.cuda.get_device_properties(name)
        flops, bandwidth = _device_figures(torch, name)  # creates the context and the cuBLAS handle
        torch.cuda.empty_cache()  # the timing tensors are placer's, not the context's
        devices.append(dict(name=name, kind="cuda", memory_bytes=int(props.total_memory), peak_flops=flops,
                            mem_bandwidth=bandwidth, real_device=name, reserved_bytes=_reserved_bytes(torch, name)))
    links = []
    names = ["cpu"] + gpus
    for a in names:
        for b in names:
            if a != b:
                latency, bw = _link_figures(torch, a, b)
                links.append(dict(src=a, dst=b, latency_s=latency, bandwidth_Bps=bw))
    return {"version": CACHE_VERSION, "name": f"{platform.node() or 'local'}-real", "devices": devices,
            "links": links, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _reserved_bytes(torch: ModuleType, name: str) -> int:
    """What GPU ``name`` holds that placer cannot use: ``total - free`` once this process's
    CUDA context exists (the context, and other processes' memory)."""
    free, total = torch.cuda.mem_get_info(name)
    return int(total - free)


def _with_current_reserve(torch: ModuleType, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each GPU's reserved bytes measured now: what other processes hold
    changes between runs, so a cached figure would be a stale snapshot."""
    if not torch.cuda.is_available():
        return record
    devices = [{**d, "reserved_bytes": _reserved_bytes(torch, d["name"])} if d.get("kind") == "cuda" else d
               for d in record["devices"]]
    return {**record, "devices": devices}


def measure_machine(cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> Cluster:
    """The real devices of this machine with measured figures, from the disk cache when present."""
    import torch

    directory = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "placer"
    path = directory / f"machine-{_cache_key(torch)}.json"
    if path.exists() and not refresh:
        try:
            record = json.loads(path.read_text())
            if record.get("version") == CACHE_VERSION:
                return _cluster_from_record(_with_current_reserve(torch, record))
        except (OSError, json.JSONDecodeError, TypeError, KeyError, ClusterSpecError):
            pass  # a damaged cache is measured again, not an error
    record = measure_devices_and_links(torch)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still gets a cluster, just not a cached one
    return _cluster_from_record(record)
