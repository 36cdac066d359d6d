"""Checking that the real devices a run will use exist on this machine, before any long work.

A simulated cluster maps each of its devices onto a real torch device (``real_device`` in
the spec, ``"cpu"`` when absent): the numerical check and any measurement run there. A
name torch parses but this machine cannot run (``cuda:0`` on a CPU-only build, ``cuda:3``
on a two-GPU machine, ``meta``, which holds shapes and no data) would otherwise surface
after the whole search, as a torch traceback deep inside the check.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from graphs.errors import PlacerError

__all__ = ["DeviceUnavailableError", "check_real_devices", "real_device_problem"]


class DeviceUnavailableError(PlacerError, ValueError):
    """A real device named by a cluster or an option that this machine cannot run on."""


def _count(kind: str) -> int | None:
    """Devices of ``kind`` present (None: torch has no way to tell for this kind)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    module = getattr(torch, kind, None)
    is_available = getattr(module, "is_available", None)
    device_count = getattr(module, "device_count", None)
    if callable(is_available) and callable(device_count):
        return int(device_count()) if is_available() else 0
    return None


def real_device_problem(name: object) -> str | None:
    """Why ``name`` is not a device this machine can compute on, or None when it is."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a torch device string such as 'cpu' or 'cuda:0'"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"{name!r} is not a torch device string such as 'cpu' or 'cuda:0'"
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return f"{name!r} is the meta device, which holds shapes but no data and cannot run a model"
    present = _count(device.type)
    if present is None:
        return f"{name!r}: torch on this machine cannot tell whether {device.type} devices exist"
    index = device.index or 0
    if present == 0:
        build = "a CPU-only build of torch" if device.type == "cuda" and torch.version.cuda is None else "this machine"
        return f"{name!r} does not exist: {build} has no {device.type} device"
    if index >= present:
        return f"{name!r} does not exist: this machine has {present} {device.type} device(s), {device.type}:0 to {device.type}:{present - 1}"
    return None


def check_real_devices(mapping: Mapping[str, str], what: str = "cluster") -> None:
    """Raise :class:`DeviceUnavailableError` unless every real device in ``mapping`` exists here.

    Args:
        mapping: device name → real torch device (``Cluster.real_device_map()``).
        what: how the message names the source of the mapping (``"cluster '4xK40'"``).
    """
    problems = [(virtual, real, real_device_problem(real)) for virtual, real in mapping.items()]
    bad = [(v, r, why) for v, r, why in problems if why is not None]
    if not bad:
        return
    v, _, why = bad[0]
    more = f" (and {len(bad) - 1} more device(s))" if len(bad) > 1 else ""
    raise DeviceUnavailableError(
        f"{what}: device {v!r} maps onto a real device this machine cannot use: {why}{more}; expected real_device to name a device "
        f"present here ('cpu'{', ' + repr('cuda:0') if torch.cuda.is_available() else ''}), or leave it "
        "out to run on the CPU"
    )
