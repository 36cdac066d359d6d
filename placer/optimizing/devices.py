"""Which devices a run places on: real ones, rank workers, a simulated cluster, or the default."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from envs.hardware.cluster import Cluster, make_cluster
from envs.hardware.loading import discover_cluster, load_cluster
from envs.hardware.rank_devices import RankDeviceError, is_distributed_cluster, is_rank_device_list
from placer.optimizing.config import DEFAULT_CLUSTER
from placer.options import OptionError, parse_device_list, parse_memory_limits


def resolve_cluster(
    devices: str | Sequence[str] | None = None,
    cluster: str | os.PathLike | Cluster | Mapping[str, Any] | None = None,
    memory: str | Mapping[str, str | int] | None = None,
) -> Cluster:
    """The devices to place on: real ``devices``, a ``cluster`` preset/spec, or the default.

    Without either, all real devices are used when there are at least two, else the
    :data:`~placer.optimizing.config.DEFAULT_CLUSTER` preset (simulated). ``memory`` caps
    device memory, accelerate ``max_memory`` style (``"cuda:0=20GiB"``). Devices named by
    rank (``"cpu:0,cpu:1"``, ``"host:cpu:0"``) are worker processes of the
    torch.distributed runtime: their cluster is built from ping-pong measured links.

    Raises:
        OptionError: both given, a device that is not present, a memory limit for an
            unknown device.
    """
    if devices is not None and cluster is not None:
        raise OptionError("give either real devices (--devices) or a simulated cluster (--cluster), not both")
    if devices is not None:
        wanted = parse_device_list(devices if isinstance(devices, str) else list(devices))
        ranks = [d for d in wanted if is_rank_device_list([d])]
        if ranks and len(ranks) < len(wanted):
            others = [d for d in wanted if d not in ranks]
            raise OptionError(f"devices {list(wanted)} mix worker processes ({', '.join(ranks)}) with devices of "
                              f"this process ({', '.join(others)}); expected either only worker processes "
                              "('cpu:0,cpu:1') or only devices of this process ('cpu,cuda:0')")
        if is_rank_device_list(list(wanted)):
            result = _rank_cluster(wanted)
        else:
            real = discover_cluster()
            absent = [d for d in wanted if d not in set(real.device_names)]
            if absent:
                raise OptionError(
                    f"device(s) {absent} not present on this machine; present: {sorted(real.device_names)}"
                )
            result = _subset(real, wanted)
    elif cluster is not None:
        result = load_cluster(cluster)
    else:
        real = discover_cluster()
        result = real if real.num_devices >= 2 else load_cluster(DEFAULT_CLUSTER)
    limits = parse_memory_limits(memory)
    if limits:
        result = _with_memory_limits(result, limits)
    return result


def profiles_microbatches(cluster: Cluster) -> bool:
    """Whether a run on ``cluster`` also profiles the model on a micro-batch
    (:mod:`graphs.profile.batch_scaling`): where its devices are CPU processes (ranks,
    ``--devices cpu:0,cpu:1``), whose pipelines and DDP replicas are simulated from the
    profiled CPU op costs, each op's fixed part measured (``envs.sim.pipeline`` P2). A GPU
    cluster, real or virtual, costs a micro-batch as its launches plus the kernels over M.
    """
    return is_distributed_cluster(cluster) and any(d.kind == "cpu" for d in cluster.devices)


def _subset(cluster: Cluster, names: Sequence[str]) -> Cluster:
    devices = [cluster.device(n) for n in names]
    links = [link for link in cluster.links if link.src in names and link.dst in names]
    return make_cluster(devices, links, name=cluster.name, simulated=cluster.simulated,
                        default_link=cluster.default_link)


def _with_memory_limits(cluster: Cluster, limits: Mapping[str, int]) -> Cluster:
    unknown = sorted(set(limits) - set(cluster.device_names))
    if unknown:
        raise OptionError(
            f"memory limit for unknown device(s) {unknown}; devices are {cluster.device_names}"
        )
    # A cap is what the placement may fill; the device's reserve (a GPU's CUDA context) comes on top.
    devices = [
        dataclasses.replace(d, memory_bytes=min(d.memory_bytes, limits[d.name] + d.reserved_bytes))
        if d.name in limits else d
        for d in cluster.devices
    ]
    return dataclasses.replace(cluster, devices=tuple(devices) if isinstance(cluster.devices, tuple) else devices)


def _rank_cluster(names: Sequence[str]) -> Cluster:
    # The runtime measures the links between rank workers, so it lives in envs.runtime.
    from envs.runtime.distributed.rank_cluster import rank_cluster

    try:
        return rank_cluster(list(names))
    except RankDeviceError as exc:
        raise OptionError(str(exc)) from exc
