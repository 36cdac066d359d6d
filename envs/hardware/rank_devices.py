"""Devices named by rank: ``cpu:0,cpu:1`` (local worker processes) and ``host:cpu:0`` (other machines).

In the distributed runtime every device is one worker process, a *rank*. Ranks are given
in the order the device list names them (``--devices cpu:0,cpu:1`` → ranks 0 and 1):

* ``cpu:N`` — a CPU worker process on this machine (``torch.set_num_threads`` threads, one
  by default, so two workers on two cores do not fight over them);
* ``cuda:N`` in a list that also has ``cpu:N`` or host-qualified names — a worker driving
  GPU N of its machine;
* ``HOST:cpu:N`` / ``HOST:cuda:N`` — the same on machine ``HOST`` (a host name or address;
  ``localhost`` and ``127.0.0.1`` are this machine). Ranks on other hosts are started there
  with ``torchrun`` (see ``docs/distributed.md``).

:func:`envs.runtime.distributed.rank_cluster.rank_cluster` turns the list into a
:class:`~envs.hardware.cluster.Cluster` with ``simulated=False`` and the latency/bandwidth
between ranks measured by ping-pong over torch.distributed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from graphs.errors import PlacerError

__all__ = [
    "RankDeviceError",
    "RankDevice",
    "parse_rank_devices",
    "is_rank_device_list",
    "is_distributed_cluster",
    "LOCAL_HOSTS",
]

#: Host names that mean "this machine".
LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})

_NAME = re.compile(r"(?:(?P<host>[A-Za-z0-9_.\-\[\]]+):)?(?P<kind>cpu|cuda):(?P<index>\d+)")


class RankDeviceError(PlacerError, ValueError):
    """A malformed rank device list."""


@dataclass(frozen=True)
class RankDevice:
    """One worker process of a distributed placement.

    Attributes:
        name: the device name placements use (``"cpu:1"``, ``"node2:cuda:0"``).
        rank: its rank (position in the device list).
        host: host name ("" for this machine).
        kind: ``"cpu"`` or ``"cuda"``.
        index: the index in the name: a worker number for CPUs, the GPU number for CUDA.
    """

    name: str
    rank: int
    host: str
    kind: str
    index: int

    @property
    def local(self) -> bool:
        """True when the worker runs on this machine."""
        return self.host in LOCAL_HOSTS

    @property
    def torch_device(self) -> str:
        """The torch device the worker computes on (on its own machine)."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_rank_devices(names: str | Sequence[str]) -> list[RankDevice]:
    """Parse ``"cpu:0,cpu:1"`` / ``["hostA:cpu:0", "hostB:cuda:0"]`` into ranked devices.

    Raises:
        RankDeviceError: an empty list, a name not of the form ``[HOST:]cpu:N`` /
            ``[HOST:]cuda:N``, or a duplicate.
    """
    items = [d.strip() for d in (names.split(",") if isinstance(names, str) else names)]
    items = [d for d in items if d]
    if not items:
        raise RankDeviceError("no devices given: expected e.g. 'cpu:0,cpu:1'")
    out: list[RankDevice] = []
    seen: set[tuple[str, str, int]] = set()
    for rank, name in enumerate(items):
        m = _NAME.fullmatch(name)
        if m is None:
            raise RankDeviceError(
                f"cannot read device {name!r}: expected 'cpu:N' or 'cuda:N' for a worker on this machine, "
                "or 'HOST:cpu:N' / 'HOST:cuda:N' for one on another machine"
            )
        host = m.group("host") or ""
        host = "" if host in LOCAL_HOSTS else host
        key = (host, m.group("kind"), int(m.group("index")))
        if key in seen:
            raise RankDeviceError(f"device {name!r} is listed twice")
        seen.add(key)
        out.append(RankDevice(name, rank, host, m.group("kind"), int(m.group("index"))))
    return out


def is_rank_device_list(names: str | Sequence[str]) -> bool:
    """True when ``names`` asks for distributed workers: some ``cpu:N`` or a host-qualified name.

    ``cpu,cuda:0`` and ``cuda:0,cuda:1`` stay one process (the single-process apply path).
    """
    try:
        devs = parse_rank_devices(names)
    except RankDeviceError:
        return False
    return any(d.kind == "cpu" or d.host for d in devs)


def is_distributed_cluster(cluster: object) -> bool:
    """True for a cluster built by :func:`~envs.runtime.distributed.rank_cluster.rank_cluster` (real, named by rank)."""
    names = getattr(cluster, "device_names", None)
    if not names:
        return False
    return not getattr(cluster, "simulated", True) and is_rank_device_list(list(names))
