"""Parsing of the options users type: search budgets, memory limits, device lists.

Each parser turns a string into a small value object and raises :class:`OptionError`
(a :class:`~graphs.errors.PlacerError`) with the accepted forms when the text is malformed,
so the CLI can refuse bad input before any long work starts.

Example::

    >>> parse_budget("5m")
    Budget(seconds=300.0, placements=None)
    >>> parse_budget("20k")
    Budget(seconds=None, placements=20000)
    >>> parse_memory_limits("cuda:0=20GiB,cpu=64GB")["cuda:0"]
    21474836480
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from envs.hardware.units import UnitError, parse_bytes
from graphs.errors import PlacerError


class OptionError(PlacerError):
    """A malformed command-line or API option."""


@dataclass(frozen=True)
class Budget:
    """How long a search may run: wall-clock seconds, evaluated placements, or both (first hit stops)."""

    seconds: float | None = None
    placements: int | None = None

    def __post_init__(self) -> None:
        if self.seconds is None and self.placements is None:
            raise OptionError("a budget needs a time (e.g. '5m') or a number of placements (e.g. '20000')")
        if self.seconds is not None and self.seconds <= 0:
            raise OptionError(f"budget time must be positive, got {self.seconds} s")
        if self.placements is not None and self.placements <= 0:
            raise OptionError(f"budget placements must be positive, got {self.placements}")

    def describe(self) -> str:
        parts = []
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        if self.placements is not None:
            parts.append(f"{self.placements:,} placements")
        return " or ".join(parts)


_TIME_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_budget(text: str | int | float | Budget) -> Budget:
    """Parse a budget: ``"90s"``, ``"5m"``, ``"1h"`` (time) or ``"20000"``, ``"20k"`` (placements).

    Both may be given, comma separated (``"5m,100k"``): the search stops at the first.
    A plain int is a number of placements; a float is seconds.
    """
    if isinstance(text, Budget):
        return text
    if isinstance(text, bool):
        raise OptionError(f"budget {text!r} is not a time or a count")
    if isinstance(text, int):
        return Budget(placements=text)
    if isinstance(text, float):
        return Budget(seconds=text)
    seconds: float | None = None
    placements: int | None = None
    for part in str(text).replace(" ", "").lower().split(","):
        m_time = re.fullmatch(r"(\d+(?:\.\d+)?)(s|sec|m|min|h)", part)
        m_count = re.fullmatch(r"(\d+)(k?)", part)
        if m_time:
            seconds = float(m_time.group(1)) * _TIME_UNITS[m_time.group(2)]
        elif m_count:
            placements = int(m_count.group(1)) * (1000 if m_count.group(2) else 1)
        else:
            raise OptionError(
                f"cannot read budget {text!r}: expected a time such as '90s', '5m', '1h', "
                "a number of placements such as '20000' or '20k', or both as '5m,20k'"
            )
    return Budget(seconds=seconds, placements=placements)


def parse_memory_limits(text: str | Mapping[str, object] | None) -> dict[str, int]:
    """Parse accelerate-style ``max_memory``: ``"cuda:0=20GiB,cpu=64GB"`` or a dict → bytes per device.

    Each size follows the one byte grammar, :data:`envs.hardware.units.BYTE_GRAMMAR` (``GB`` = 10**9,
    ``GiB`` = 2**30, ``16G`` refused as ambiguous, at least one byte), the same as a cluster spec's
    ``memory`` field.
    """
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return {str(k): _size_for(str(k), v) for k, v in text.items()}
    limits: dict[str, int] = {}
    for part in str(text).split(","):
        if "=" not in part:
            raise OptionError(
                f"cannot read memory limit {part!r}: expected DEVICE=SIZE, e.g. 'cuda:0=20GiB,cpu=64GB'"
            )
        device, size = part.split("=", 1)
        device = device.strip()
        if not device:
            raise OptionError(f"memory limit {part!r} names no device; expected DEVICE=SIZE")
        limits[device] = _size_for(device, size)
    return limits


def _size_for(device: str, size: object) -> int:
    try:
        return parse_bytes(size)
    except UnitError as exc:
        raise OptionError(f"memory limit for {device}: {exc}") from None


def parse_device_list(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Parse ``"cpu,cuda:0,cuda:1"`` into a list of device names (each well-formed, no duplicates).

    ``"cpu:0,cpu:1"`` and host-qualified ``"node2:cpu:0"`` are worker processes of the
    distributed runtime (see ``docs/distributed.md``).
    """
    items = [d.strip() for d in (text.split(",") if isinstance(text, str) else text)]
    items = [d for d in items if d]
    if not items:
        raise OptionError("no devices given: expected e.g. 'cpu,cuda:0'")
    for d in items:
        # "cpu:N" and "HOST:cpu:N"/"HOST:cuda:N" name worker processes (ranks) of the
        # distributed runtime (envs.hardware.rank_devices).
        if not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?|[A-Za-z0-9_.\-]+:(cpu|cuda):\d+", d):
            raise OptionError(
                f"unknown device {d!r}: expected 'cpu', 'cuda:N' (or 'mps'), 'cpu:N' for a local "
                "worker process, or 'HOST:cpu:N' / 'HOST:cuda:N' for a worker on another machine"
            )
    seen = set()
    for d in items:
        if d in seen:
            raise OptionError(f"device {d!r} is listed twice")
        seen.add(d)
    return items


def parse_model_args(pairs: list[str] | None, size: str | None = None) -> dict[str, object]:
    """Parse repeated ``--model-arg key=value`` (values read as int/float/bool when they look like one)."""
    args: dict[str, object] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise OptionError(f"cannot read model argument {pair!r}: expected KEY=VALUE, e.g. layers=4")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise OptionError(f"cannot read model argument {pair!r}: {key!r} is not a keyword argument name; "
                              "expected KEY=VALUE with KEY a Python name, e.g. layers=4")
        args[key] = _literal(value.strip())
    if size is not None:
        args["size"] = size
    return args


def _literal(value: str) -> object:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
