"""Parsing of the options users type: memory limits, device lists, model arguments.

(Search budgets have their own home, :mod:`placer.search.budget`.)

Each parser turns a string into a small value object and raises :class:`OptionError`
(a :class:`~graphs.errors.PlacerError`) with the accepted forms when the text is malformed,
so the CLI can refuse bad input before any long work starts.

Example::

    >>> parse_memory_limits("cuda:0=20GiB,cpu=64GB")["cuda:0"]
    21474836480
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from envs.hardware.units import UnitError, parse_bytes
from graphs.errors import PlacerError


class OptionError(PlacerError):
    """A malformed command-line or API option."""


def check_seed(seed: object, name: str = "--seed") -> int:
    """``seed`` when it is an integer that numpy and torch both take (0 to 2**63 - 1).

    numpy's ``SeedSequence`` refuses negatives and ``torch.manual_seed`` anything past 64 bits,
    both only once a search starts, after the preparation and the baselines.

    >>> check_seed(7)
    7
    >>> check_seed(-1)
    Traceback (most recent call last):
    ...
    placer.options.OptionError: --seed must be an integer from 0 to 2**63 - 1, got -1
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise OptionError(f"{name} must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return seed


def parse_memory_limits(text: str | Mapping[str, object] | None) -> dict[str, int]:
    """Parse accelerate-style ``max_memory``: ``"cuda:0=20GiB,cpu=64GB"`` or a dict → bytes per device.

    Each size follows the one byte grammar, :data:`envs.hardware.units.BYTE_GRAMMAR` (``GB`` = 10**9,
    ``GiB`` = 2**30, ``16G`` refused as ambiguous, at least one byte), the same as a cluster spec's
    ``memory`` field.
    """
    if text is None:
        return {}
    if isinstance(text, str) and not text.strip():  # --memory "" capped nothing, silently
        raise OptionError("--memory is empty; expected DEVICE=SIZE pairs, e.g. 'cuda:0=20GiB,cpu=64GB'")
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
        if device in limits:
            raise OptionError(f"memory limit for {device!r} is given twice; expected one DEVICE=SIZE per device")
        limits[device] = _size_for(device, size)
    return limits


def _size_for(device: str, size: object) -> int:
    try:
        return parse_bytes(size)
    except UnitError as exc:
        # A name with a line break (--memory "cpu\n=...") would split the one-line message.
        shown = device if device.isprintable() else repr(device)
        raise OptionError(f"memory limit for {shown}: {exc}") from None


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


def parse_leaf_modules(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Repeated ``--leaf`` values, each a module path or class name or a comma-separated list of them.

    >>> parse_leaf_modules(["encoder.rnn,Block", " decoder "])
    ('encoder.rnn', 'Block', 'decoder')
    """
    return tuple(name.strip() for item in values or () for name in item.split(",") if name.strip())


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
        value_read = _literal(value.strip())
        # The last of two differing values won silently: a typo in a long command line built
        # another model than the one the user read off it.
        if key in args and args[key] != value_read:
            raise OptionError(f"model argument {key!r} is given twice ({args[key]!r} and {value_read!r}); "
                              "expected one value per argument")
        args[key] = value_read
    if size is not None:
        if "size" in args and args["size"] != size:
            raise OptionError(f"--size {size} and --model-arg size={args['size']} disagree; expected one size "
                              "(--size is short for --model-arg size=SIZE)")
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
