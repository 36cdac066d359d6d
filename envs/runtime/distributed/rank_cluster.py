"""The cluster of a rank device list: this machine's figures per worker, links measured between ranks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from envs.hardware.cluster import GPU_CONTEXT_BYTES, Cluster, Device, Link, make_cluster
from envs.hardware.loading import discover_cluster
from envs.hardware.rank_devices import RankDeviceError, parse_rank_devices
from envs.runtime.distributed.launcher import measure_links

#: What a CPU rank process holds before its first tensor: the interpreter, torch and
#: torch.distributed, placer's worker (240 MiB resident, measured here on torch 2.13 CPU,
#: 2026-12-05). A CPU rank reserves it (``Device.reserved_bytes``) out of its share of the
#: machine's memory, as a GPU reserves its CUDA context.
RANK_PROCESS_BYTES = 240 * 2**20


def rank_cluster(
    names: str | Sequence[str],
    links: Mapping[tuple[str, str], tuple[float, float]] | None = None,
    threads: int = 1,
    cache_dir: str | None = None,
) -> Cluster:
    """The :class:`~envs.hardware.cluster.Cluster` of a rank device list (``simulated=False``).

    Args:
        names: the device list.
        links: ``{(a, b): (latency s, bandwidth B/s)}`` between devices; measured by
            ping-pong over torch.distributed when None (local ranks only).
        threads: torch threads per CPU worker (the device figures are this machine's,
            measured by :func:`envs.hardware.loading.discover_cluster` and divided between workers).
        cache_dir: cache of the machine's measured figures.

    Raises:
        RankDeviceError: a malformed list, or links to be measured for ranks on other hosts.
    """


    devs = parse_rank_devices(names)
    machine = discover_cluster(cache_dir=cache_dir)
    cpu = machine.device("cpu")
    n_cpu = max(1, sum(1 for d in devs if d.kind == "cpu" and d.local))
    if cpu.memory_bytes // n_cpu <= RANK_PROCESS_BYTES:
        raise RankDeviceError(
            f"{n_cpu} worker processes share this machine's {cpu.memory_bytes / 2**30:.1f} GiB: "
            f"{cpu.memory_bytes // n_cpu / 2**20:.0f} MiB each, no more than a worker process takes before its "
            f"first tensor ({RANK_PROCESS_BYTES // 2**20} MiB); expected fewer worker processes")
    devices = []
    for d in devs:
        if d.kind == "cpu":
            # The workers share the machine's memory; compute figures are per worker.
            devices.append(Device(d.name, "cpu", cpu.memory_bytes // n_cpu, cpu.peak_flops,
                                  cpu.mem_bandwidth, real_device="cpu", reserved_bytes=RANK_PROCESS_BYTES))
        else:
            # A GPU on another host is assumed to be the same model as this machine's
            # (homogeneous hosts); its times come from the "cuda" profiles either way.
            local = f"cuda:{d.index}" if d.local else "cuda:0"
            if local not in machine.device_names:
                raise RankDeviceError(
                    f"device {d.name!r}: this machine has no {local} to take its figures from; "
                    f"devices here are {machine.device_names}"
                )
            gpu = machine.device(local)
            # The rank creates its own CUDA context on the GPU, beside this process's (measured
            # in the machine's reserve): one more context, estimated (no GPU measured it here).
            devices.append(dataclasses.replace(gpu, name=d.name, real_device=local,
                                               reserved_bytes=gpu.reserved_bytes + GPU_CONTEXT_BYTES))
    if links is None:
        remote = [d.name for d in devs if not d.local]
        if remote:
            raise RankDeviceError(
                f"devices on other hosts ({', '.join(remote)}) need link figures, and placer measures links only "
                "between worker processes of this machine; expected worker processes here (cpu:0,cpu:1), or a "
                "cluster spec file that gives the hosts' links (--cluster spec.yaml, simulated)"
            )
        links = measure_links(names, threads=threads)
    link_objs = [Link(a, b, lat, bw) for (a, b), (lat, bw) in links.items()]
    label = ",".join(d.name for d in devs)
    return make_cluster(devices, link_objs, name=f"ranks({label})", simulated=False)
