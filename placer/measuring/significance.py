"""Whether one placement's measured steps are faster than another's beyond the noise they were timed in.

Step times on a shared machine vary from step to step (4-15% on this project's 2-core VM for
identical programs, `benchmarks/results/tuner_cpu_virtual.md`), so the fastest median of a few
steps each is often a placement that is no faster at all. :func:`clearly_faster` asks for two
things before a measured difference decides: the gain is larger than a fraction the caller
names (``margin``), and the steps say it is not noise, by Welch's one-sided t-test on the
logarithms of the step times (a step's noise scales with its length, so ratios, not
differences, are compared), at level ``alpha``.

>>> clearly_faster([0.50, 0.51, 0.49], [1.00, 1.01, 0.99], margin=0.05)
True
>>> clearly_faster([0.90, 1.20, 0.80], [1.00, 1.10, 0.95], margin=0.05)
False

Placements timed side by side in several runs (optimize's final comparison) are compared run
by run instead (:func:`faster_in_every_run`): a run's figures share that job's state of the
machine, so the gap within a run is what the steps can tell apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

#: The level of the one-sided test: how often two equal placements may be told apart by chance.
ALPHA = 0.05


def clearly_faster(times: Sequence[float], than: Sequence[float], margin: float, alpha: float = ALPHA) -> bool:
    """Whether steps ``times`` are faster than steps ``than`` by more than ``margin`` (a
    fraction of ``than``'s median) and beyond their noise (Welch's one-sided t-test on the
    log step times, p < ``alpha``).

    With fewer than two steps on either side, or no variation in either, the steps hold no
    estimate of the noise and the margin alone decides.
    """
    if not times or not than:
        return False
    if statistics.median(times) >= statistics.median(than) * (1 - margin):
        return False
    a, b = np.log(np.asarray(times, dtype=float)), np.log(np.asarray(than, dtype=float))
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return True
    from scipy import stats  # ~0.4 s to import: only measured comparisons need it, not a simulated run

    p = float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)
    return math.isfinite(p) and p < alpha


def run_gaps(runs: Sequence[float], than: Sequence[float]) -> list[float]:
    """How much slower ``than`` was than ``runs`` in each run, relative to ``runs`` (both one
    figure per run of one comparison, in run order; [] when they were not timed in the same runs).

    >>> [round(g, 3) for g in run_gaps([1.0, 2.0], [1.1, 2.0])]
    [0.1, 0.0]
    """
    if len(runs) != len(than) or not runs:
        return []
    return [float(b) / float(a) - 1.0 for a, b in zip(runs, than)]


def faster_in_every_run(runs: Sequence[float], than: Sequence[float]) -> bool:
    """Whether a placement timed ``runs`` is faster than one timed ``than`` in the same runs
    (:func:`run_gaps`): faster in every run, and by more on average than its gap moved from run
    to run (the mean gap above the gaps' range), so that the next run would most likely agree.

    >>> faster_in_every_run([1.0, 1.02], [1.05, 1.07])
    True
    >>> faster_in_every_run([1.0, 1.02], [1.05, 1.01])  # slower in the second run
    False
    >>> faster_in_every_run([1.0, 1.0], [1.01, 1.09])  # 1% then 9%: the gap is mostly noise
    False
    """
    gaps = run_gaps(runs, than)
    if len(gaps) < 2:
        return False
    return min(gaps) > 0 and float(np.mean(gaps)) > max(gaps) - min(gaps)
