"""Parsing of the quantities a cluster spec file holds: bytes, FLOP/s, bandwidth, time.

Spec files are written by people, so each quantity accepts a plain number (in base
units: bytes, FLOP/s, bytes/s, seconds) or a string with a unit: ``"12GiB"``, ``"4.29T"``,
``"288GB/s"``, ``"10us"``. Decimal prefixes (k, M, G, T, P) are powers of 1000 and binary
ones (Ki, Mi, Gi, Ti) powers of 1024, as on data sheets. A malformed value raises
:class:`UnitError` saying which forms are accepted; the caller adds the spec entry name.

Example::

    >>> parse_bytes("12GiB")
    12884901888
    >>> parse_flops("4.29T")
    4290000000000.0
    >>> parse_bandwidth("12 GB/s")
    12000000000.0
    >>> parse_seconds("10us")
    1e-05
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from graphs.errors import PlacerError


class UnitError(PlacerError, ValueError):
    """A quantity in a spec that cannot be read (wrong unit, not a number, not positive)."""


_PREFIX = {
    "": 1.0,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 1024.0,
    "Mi": 1024.0**2,
    "Gi": 1024.0**3,
    "Ti": 1024.0**4,
    "Pi": 1024.0**5,
}

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_QUANTITY = re.compile(r"^\s*" + _NUMBER + r"\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?\s*(.*?)\s*$")

# Divisors (not factors) so that "10us" is exactly 1e-05 rather than 9.999999999999999e-06.
_TIME_DIVISOR = {"": 1.0, "s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6, "μs": 1e6, "ns": 1e9}


def _split(text: str, what: str, forms: str) -> tuple[float, str, str]:
    match = _QUANTITY.match(text)
    if not match:
        raise UnitError(f"cannot read {what} {text!r}; expected {forms}")
    return float(match.group(1)), match.group(2) or "", match.group(3)


def _positive(value: float, text: object, what: str, forms: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise UnitError(f"{what} must be a positive finite number, got {text!r}; expected {forms}")
    return value


def _number(value: object) -> float | None:
    """A plain number (not bool) as float, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _parse_quantity(value: object, what: str, unit_label: str, forms: str, accepts: Callable[[str], bool]) -> float:
    """A positive quantity in base units from a number or a string with an optional prefix and unit."""
    num = _number(value)
    if num is None:
        if not isinstance(value, str):
            raise UnitError(f"cannot read {what} {value!r}; expected {forms}")
        num, prefix, unit = _split(value, what, forms)
        if not accepts(unit):
            raise UnitError(f"unknown {unit_label} unit {unit!r} in {value!r}; expected {forms}")
        num *= _PREFIX[prefix]
    return _positive(num, value, what, forms)


def parse_bytes(value: object) -> int:
    """Bytes from ``12884901888``, ``"12GiB"``, ``"16GB"``, ``"512 MiB"``, ``"1.5T"`` (no unit = bytes)."""
    forms = "a number of bytes or e.g. '12GiB', '16GB', '512MiB'"
    return int(round(_parse_quantity(value, "memory size", "memory", forms,
                                     lambda unit: unit in ("", "B", "b", "bytes"))))


def parse_flops(value: object) -> float:
    """FLOP/s from ``4.29e12``, ``"4.29T"``, ``"4.29 TFLOPS"``, ``"15.7TFLOP/s"``."""
    forms = "a number of FLOP/s or e.g. '4.29T', '15.7 TFLOPS'"
    return _parse_quantity(value, "peak FLOP/s", "FLOP/s", forms,
                           lambda unit: unit.lower() in ("", "flops", "flop/s", "flop"))


def parse_bandwidth(value: object) -> float:
    """Bytes/s from ``12e9``, ``"12GB/s"``, ``"12 GB/s"``, ``"1.5TB/s"``, ``"10GiB/s"``."""
    forms = "a number of bytes/s or e.g. '12GB/s', '1.5TB/s'"
    return _parse_quantity(value, "bandwidth", "bandwidth", forms, lambda unit: unit in ("", "B/s", "Bps", "B"))


def parse_seconds(value: object, allow_zero: bool = True) -> float:
    """Seconds from ``1e-5``, ``"10us"``, ``"10 µs"``, ``"2ms"``, ``"500ns"``, ``"0.1s"``."""
    forms = "a number of seconds or e.g. '10us', '2ms', '500ns'"
    num = _number(value)
    if num is None:
        if not isinstance(value, str):
            raise UnitError(f"cannot read time {value!r}; expected {forms}")
        match = re.match(r"^\s*" + _NUMBER + r"\s*([a-zµμ]*)\s*$", value)
        if not match or match.group(2) not in _TIME_DIVISOR:
            raise UnitError(f"cannot read time {value!r}; expected {forms}")
        num = float(match.group(1)) / _TIME_DIVISOR[match.group(2)]
    if not math.isfinite(num) or num < 0 or (num == 0 and not allow_zero):
        raise UnitError(f"time must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return num
