"""A placement's device names and the real torch devices they stand for.

A placement names devices by the cluster's names (``gpu0``) or by torch device strings
(``cuda:0``). :func:`realize_placement` maps a placement over cluster names onto real torch
devices and says when several of them share one real device; :class:`_resolver` turns the
names one placement uses into canonical names (:func:`_canonical`: ``cuda`` is ``cuda:0``)
and real device strings, refusing a name that is not a device or a device this machine
cannot use (:func:`envs.runtime.real_devices.real_device_problem`). One module, so that
every step of applying a placement compares device names the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from envs.runtime.apply_error import ApplyError
from envs.runtime.real_devices import real_device_problem

__all__ = ["RealizedPlacement", "realize_placement"]


def _parse_device(name: Any, node: str, must_exist: bool = True) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ApplyError(
            f"node {node!r} is placed on {name!r}, which is not a torch device string; "
            f"expected e.g. 'cpu', 'cuda:0' (map virtual devices with realize_placement first)"
        ) from exc
    problem = real_device_problem(name) if must_exist else None
    if problem is not None:  # cuda:0 on a CPU-only build, meta: refused here, not as a torch traceback mid-run
        raise ApplyError(f"node {node!r} is placed on a device this machine cannot use: {problem}")
    return device


def _canonical(dev: torch.device) -> str:
    # "cuda" and "cuda:0" are the same device once a tensor lives there, and a CPU tensor
    # reports "cpu" whatever index was asked for; compare canonically.
    if dev.type == "cpu":
        return "cpu"
    if dev.index is None and dev.type in ("cuda", "xpu", "mps"):
        return f"{dev.type}:0"
    return str(dev)


class _resolver:
    """Device names → canonical names and real torch device strings."""

    def __init__(self, real_devices: Mapping[str, str] | None) -> None:
        self.checked: dict[str, str | None] = {}  # real device -> why it cannot be used (None: it can)
        self.canonical: dict[str, str] = {}
        self.mapping = None
        if real_devices is not None:
            self.mapping = {
                str(k): _canonical(_parse_device(v, f"<device {k}>", must_exist=False))
                for k, v in real_devices.items()
            }

    def name(self, device: Any, node: str) -> str:
        if self.mapping is not None:
            if str(device) not in self.mapping:
                raise ApplyError(
                    f"node {node!r} is placed on {device!r}, which real_devices does not map; "
                    f"known devices are {sorted(self.mapping)}"
                )
            real = self.mapping[str(device)]
            if real not in self.checked:
                self.checked[real] = real_device_problem(real)
            problem = self.checked[real]
            if problem is not None:
                raise ApplyError(f"node {node!r} is placed on {device!r}, which maps onto a device this machine "
                                 f"cannot use: {problem}")
            return str(device)
        if not isinstance(device, str):
            return _canonical(_parse_device(device, node))
        if device not in self.canonical:  # once per device, not once per node
            self.canonical[device] = _canonical(_parse_device(device, node))
        return self.canonical[device]

    def real(self, name: str) -> str:
        return self.mapping[name] if self.mapping is not None else name


@dataclass(frozen=True)
class RealizedPlacement:
    """A placement over cluster device names mapped onto real torch devices.

    Attributes:
        assignment: node → real torch device string.
        virtual_to_real: cluster device name → real device string.
        shared: real device → the virtual devices mapped onto it (only where > 1).
        note: a sentence for reports; says when a measured time cannot show parallelism.
    """

    assignment: dict[str, str]
    virtual_to_real: dict[str, str]
    shared: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""

    @property
    def parallel(self) -> bool:
        """False when several virtual devices share one real device."""
        return not self.shared


def realize_placement(placement: Mapping[str, str], devices: Any) -> RealizedPlacement:
    """Map a placement over cluster device names to real torch devices.

    Args:
        placement: node → cluster device name.
        devices: a mapping ``{cluster device name: real device}``, a Cluster (anything
            with ``.devices``), or an iterable of Device-like objects with ``name`` and
            ``real_device`` (a device whose ``real_device`` is empty maps to its own name).

    Raises:
        ApplyError: a placed device the mapping does not know, or a real device that is
            not a torch device string.
    """
    mapping = _real_mapping(devices)
    unknown = sorted({d for d in placement.values() if d not in mapping})
    if unknown:
        raise ApplyError(
            f"placement uses device(s) {unknown} that the cluster does not define; "
            f"devices are {sorted(mapping)}"
        )
    for v, r in mapping.items():
        try:
            torch.device(r)
        except (RuntimeError, TypeError):
            raise ApplyError(
                f"device {v!r} maps onto {r!r}, which is not a torch device; name the cluster the placement "
                f"was made for (`--cluster 4xK40`, a spec file whose devices have a real_device such as 'cpu' or "
                f"'cuda:0')"
            ) from None
    used = sorted(set(placement.values()))
    by_real: dict[str, list[str]] = {}
    for v in used:
        by_real.setdefault(_canonical(torch.device(mapping[v])), []).append(v)
    shared = {r: vs for r, vs in by_real.items() if len(vs) > 1}
    note = ""
    if shared:
        parts = [f"{', '.join(vs)} → {r}" for r, vs in shared.items()]
        note = (
            "virtual devices share one real device ("
            + "; ".join(parts)
            + "): the measured time shows no parallelism between them"
        )
    return RealizedPlacement(
        assignment={n: _canonical(torch.device(mapping[d])) for n, d in placement.items()},
        virtual_to_real={v: _canonical(torch.device(r)) for v, r in mapping.items()},
        shared=shared,
        note=note,
    )


def _real_mapping(devices: Any) -> dict[str, str]:
    if isinstance(devices, Mapping):
        return {str(k): str(v) for k, v in devices.items()}
    devs: Iterable[Any] = getattr(devices, "devices", devices)
    out: dict[str, str] = {}
    for d in devs:
        name = getattr(d, "name", None)
        if name is None:
            raise ApplyError(f"expected Device objects with a name and real_device; got {d!r}")
        out[str(name)] = str(getattr(d, "real_device", None) or name)
    return out
