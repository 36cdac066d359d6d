"""Heuristic and human-expert baselines, one algorithm family per module, by stable name.

>>> from placer.search.baselines import run_baseline, baseline_names
>>> result = run_baseline("heft", problem)   # doctest: +SKIP

See :mod:`placer.search.baselines.registry` for the names and :mod:`placer.search.baselines.common`
for the shared cost and memory model.
"""

from placer.search.baselines.common import BaselineError, BaselineInputs, BaselineResult, NoFit
from placer.search.baselines.registry import BASELINES, Baseline, baseline_names, get_baseline, run_baseline

__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineError",
    "BaselineInputs",
    "BaselineResult",
    "NoFit",
    "baseline_names",
    "get_baseline",
    "run_baseline",
]
