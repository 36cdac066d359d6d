"""How long a search may run: the :class:`Budget` value, its parser, and the one default.

Every entry point that searches (``placer.optimize``, ``placer.place``, the integrations,
``search()``, the CLI's ``--budget``, the benchmark's agent methods) takes its default
from :data:`DEFAULT_BUDGET`, so the README, ``--help`` and the API cannot disagree.

(Budget and parse_budget still live in :mod:`placer.options` while its importers move here.)
"""

from __future__ import annotations

from placer.options import Budget, parse_budget

#: The default search budget: two minutes of wall clock. The plateau rule usually ends a
#: search of a small model well before it.
DEFAULT_BUDGET = "2m"

#: What every ``budget=`` argument accepts.
BudgetLike = Budget | str | int | float

__all__ = ["Budget", "BudgetLike", "DEFAULT_BUDGET", "parse_budget"]
