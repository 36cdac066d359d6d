"""Parsing of the quantities a cluster spec file and the CLI hold: bytes, FLOP/s, bandwidth, time.

Spec files and options are written by people, so each quantity accepts a plain number (in
base units: bytes, FLOP/s, bytes/s, seconds) or a string with a unit: ``"12GiB"``,
``"4.29T"``, ``"288GB/s"``, ``"10us"``. A malformed value raises :class:`UnitError` saying
which forms are accepted; the caller adds the spec entry or option name.

Sizes in bytes have one grammar, :data:`BYTE_GRAMMAR`, shared by cluster specs
(``memory: 16GB``) and memory caps (``--memory cuda:0=16GiB``, ``memory={"cuda:0": "16GiB"}``).
It is the one of accelerate's ``max_memory`` strings (``convert_file_size_to_int``):
``KB, MB, GB, TB, PB`` are powers of 1000 and ``KiB, MiB, GiB, TiB, PiB`` powers of 1024,
the prefix letter in any case. Two forms accelerate reads in a way people rarely mean are
refused instead of guessed: a bare prefix (``"16G"``: accelerate refuses it; is it 16 GB or
16 GiB?) and a lowercase ``b`` after a decimal prefix (``"16Gb"``, ``"16gb"``: accelerate
reads bits, 2 GB). A size must be at least one byte: ``0`` is refused everywhere (accelerate
refuses it too); to keep a device out of a placement, leave it out of the devices or cluster.

Other quantities keep SI prefixes (k, M, G, T, P = powers of 1000, and Ki, Mi, Gi, Ti, Pi =
powers of 1024 for bandwidth), as on data sheets.

Example::

    >>> parse_bytes("12GiB")
    12884901888
    >>> parse_bytes("16GB")
    16000000000
    >>> parse_bytes("16G")
    Traceback (most recent call last):
    ...
    envs.hardware.units.UnitError: ambiguous size '16G': write '16GB' (16 x 10**9 bytes) or '16GiB' (16 x 2**30 bytes)
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
from decimal import Decimal, InvalidOperation

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


#: The size grammar, in words, for error messages and ``--help`` texts.
BYTE_GRAMMAR = (
    "a whole number of bytes, or a number and a unit: B; KB, MB, GB, TB, PB (powers of 1000); "
    "KiB, MiB, GiB, TiB, PiB (powers of 1024), e.g. '16GB', '12GiB', '512 MiB', '1.5TB'; "
    "at least one byte"
)

#: Bytes per unit, keyed by the unit with its prefix letter upper-cased (see :func:`_byte_unit_key`).
BYTE_UNITS: dict[str, int] = {
    "": 1, "B": 1, "BYTES": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}

#: The largest size accepted: memory figures are held in int64 arrays by the simulator.
MAX_BYTES = 2**63 - 1

_SIZE = re.compile(r"^\s*" + _NUMBER + r"\s*([A-Za-z]*)\s*$")


def _byte_unit_key(unit: str, text: str) -> str:
    """The :data:`BYTE_UNITS` key of ``unit``, or a :class:`UnitError` for the forms refused as ambiguous."""
    upper = unit.upper()
    if upper in ("K", "M", "G", "T", "P", "KI", "MI", "GI", "TI", "PI"):
        number = text.strip()[: -len(unit)].strip()
        raise UnitError(f"ambiguous size {text!r}: write '{number}{upper[0]}B' ({number} x 10**"
                        f"{3 * 'KMGTP'.index(upper[0]) + 3} bytes) or '{number}{upper[0]}iB' "
                        f"({number} x 2**{10 * 'KMGTP'.index(upper[0]) + 10} bytes)")
    if unit == "b" or (len(unit) == 2 and upper in BYTE_UNITS and unit.endswith("b")):
        # accelerate reads a lowercase b as bits ("16Gb" is 2 GB there); a memory size in bits
        # is almost always a slip, so it is refused rather than read either way.
        raise UnitError(f"cannot read memory size {text!r}: a lowercase 'b' reads as bits; "
                        f"write bytes with a capital B ('{text.strip()[:-1]}B') or use KiB/MiB/GiB")
    if upper not in BYTE_UNITS:
        raise UnitError(f"unknown size unit {unit!r} in {text!r}; expected {BYTE_GRAMMAR}")
    return upper


def parse_bytes(value: object, allow_zero: bool = False) -> int:
    """Bytes from a number or a size string in the grammar :data:`BYTE_GRAMMAR` (the module docstring's rules).

    Fractions of a byte are dropped (``"1.5KiB"`` is 1536, ``"0.1KiB"`` 102); the result must be
    at least 1 (at least 0 with ``allow_zero``: a device's ``reserved``). Exact for any number of digits: ``"1.1GB"`` is 1100000000.

    >>> parse_bytes("1.5 KiB"), parse_bytes("2gib"), parse_bytes(4096)
    (1536, 2147483648, 4096)
    >>> parse_bytes("0GB")
    Traceback (most recent call last):
    ...
    envs.hardware.units.UnitError: a size must be at least one byte, got '0GB'; expected a whole number ...
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UnitError(f"cannot read memory size {value!r}; expected {BYTE_GRAMMAR}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise UnitError(f"cannot read memory size {value!r}; expected {BYTE_GRAMMAR}")
        try:
            number = Decimal(match.group(1))
        except InvalidOperation:  # the regex admits only decimal literals; kept for safety
            raise UnitError(f"cannot read memory size {value!r}; expected {BYTE_GRAMMAR}") from None
        factor = BYTE_UNITS[_byte_unit_key(match.group(2), value)]
        # Bounded before multiplying: "1e999999999PiB" would overflow the Decimal context or build
        # a gigantic integer.
        nbytes = int(number * factor) if number.adjusted() < 25 else MAX_BYTES + 1
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnitError(f"a size must be a finite number of bytes, got {value!r}")
        nbytes = int(value)
    else:
        nbytes = value
    if nbytes > MAX_BYTES:
        raise UnitError(f"size {value!r} is too large: the most is 2**63 - 1 bytes (memory is counted in int64)")
    if nbytes < (0 if allow_zero else 1):
        least = "zero bytes" if allow_zero else "one byte"
        raise UnitError(f"a size must be at least {least}, got {value!r}; expected {BYTE_GRAMMAR}")
    return nbytes


_DISPLAY_UNITS = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def byte_display_unit(nbytes: float) -> tuple[str, int]:
    """The binary unit that writes ``nbytes`` with at least 1 before the point: ``("MiB", 2**20)`` for 3.2 MiB.

    Shared by :func:`format_bytes` and tables that print several sizes in one unit.
    """
    size = abs(float(nbytes))
    return next(((unit, scale) for unit, scale in _DISPLAY_UNITS if size >= scale), _DISPLAY_UNITS[-1])


def format_bytes(nbytes: float) -> str:
    """A size as text in the largest binary unit that keeps it at least 1, to three digits.

    The text is in :data:`BYTE_GRAMMAR`, so it reads back with :func:`parse_bytes` (to those digits).

    >>> format_bytes(3.2 * 2**20), format_bytes(1536), format_bytes(512), format_bytes(40 * 2**30)
    ('3.2 MiB', '1.5 KiB', '512 B', '40 GiB')
    >>> format_bytes(1000), format_bytes(1000 * 2**20)
    ('1000 B', '1000 MiB')
    """
    unit, scale = byte_display_unit(nbytes)
    value = float(nbytes) / scale
    # Three digits, but never an exponent: a unit holds up to 1023, which .3g wrote as 1e+03.
    return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


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
