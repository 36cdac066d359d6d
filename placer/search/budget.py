"""How long a search may run: the :class:`Budget` value, its parser, and the one default.

Every entry point that searches (``placer.optimize``, ``placer.place``, the integrations,
``search()``, the CLI's ``--budget``, the benchmark's agent methods) takes its default
from :data:`DEFAULT_BUDGET`, so the README, ``--help`` and the API cannot disagree.

Example::

    >>> parse_budget("5m")
    Budget(seconds=300.0, placements=None)
    >>> parse_budget("20k")
    Budget(seconds=None, placements=20000)
    >>> parse_budget(DEFAULT_BUDGET).describe()
    '120 s'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from placer.options import OptionError

#: The default search budget: two minutes of wall clock, or less when the plateau rule
#: (:data:`placer.search.config.DEFAULT_PATIENCE` evaluations without improvement) ends
#: the search first.
DEFAULT_BUDGET = "2m"


@dataclass(frozen=True)
class Budget:
    """Wall-clock seconds, evaluated placements, or both (the first one reached stops the search)."""

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
        """``"120 s"``, ``"20,000 placements"`` or both joined by ``or``."""
        parts = []
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        if self.placements is not None:
            parts.append(f"{self.placements:,} placements")
        return " or ".join(parts)


#: What every ``budget=`` argument accepts.
BudgetLike = Budget | str | int | float

_TIME_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_budget(text: str | int | float | Budget) -> Budget:
    """Parse a budget: ``"90s"``, ``"5m"``, ``"1h"`` (time) or ``"20000"``, ``"20k"`` (placements).

    Both may be given, comma separated and in either order (``"5m,100k"``): the search stops
    at the first. Each at most once.
    A plain int is a number of placements; a float is seconds.

    Raises:
        OptionError: anything else, with the accepted forms.
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
    for raw in str(text).replace(" ", "").split(","):
        if re.fullmatch(r"\d+(?:\.\d+)?M", raw):
            # 'k' counts placements, so '2M' reads as two million of them; it was two minutes.
            raise OptionError(f"cannot read budget {text!r}: {raw!r} is ambiguous; expected '{raw[:-1]}m' for "
                              f"minutes or a number of placements such as '{raw[:-1]}000k'")
        part = raw.lower()
        if part.startswith("-") and re.fullmatch(r"-\d+(?:\.\d+)?(s|sec|m|min|h|k)?", part):
            raise OptionError(f"budget {text!r} is negative; expected a positive time or number of placements, "
                              "e.g. '5m', '20k' or '5m,20k'")
        m_time = re.fullmatch(r"(\d+(?:\.\d+)?)(s|sec|m|min|h)", part)
        m_count = re.fullmatch(r"(\d+)(k?)", part)
        # A second time or count would silently override the first: '5m,20k,3' is a typo, not a budget.
        if m_time and seconds is None:
            seconds = float(m_time.group(1)) * _TIME_UNITS[m_time.group(2)]
        elif m_count and placements is None:
            placements = int(m_count.group(1)) * (1000 if m_count.group(2) else 1)
        elif m_time or m_count:
            raise OptionError(
                f"cannot read budget {text!r}: it gives more than one {'time' if m_time else 'number of placements'}; "
                "expected at most one time and one number of placements, e.g. '5m', '20k' or '5m,20k'"
            )
        else:
            raise OptionError(
                f"cannot read budget {text!r}: expected a time such as '90s', '5m', '1h', "
                "a number of placements such as '20000' or '20k', or both as '5m,20k'"
            )
    return Budget(seconds=seconds, placements=placements)
