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
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
from scipy import stats

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
    p = float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)
    return math.isfinite(p) and p < alpha
