"""The devices a profile is taken on: :func:`resolve_devices`, one device per kind (cpu, cuda:i).

Times are keyed by device kind, so two devices of one kind, an unknown device or a cuda device
that is not present are refused (:class:`graphs.profile.errors.ProfileError`); by default cpu,
plus cuda:0 when present.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphs.profile.errors import ProfileError


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
