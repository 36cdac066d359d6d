"""A measured gain decides only beyond the margin and beyond the noise of the steps timed."""

from __future__ import annotations

import numpy as np
import pytest

from placer.measuring.significance import ALPHA, clearly_faster


def test_a_large_gain_over_quiet_steps_is_clear() -> None:
    assert clearly_faster([0.50, 0.52, 0.49, 0.51], [1.00, 0.98, 1.03, 1.01], margin=0.05)


def test_a_gain_within_the_margin_never_decides_however_quiet() -> None:
    assert not clearly_faster([0.970, 0.970, 0.971], [1.000, 1.000, 1.001], margin=0.05)


def test_the_same_median_gain_is_not_clear_when_the_steps_are_noisy() -> None:
    assert clearly_faster([0.90, 0.91, 0.89], [1.00, 1.01, 0.99], margin=0.05)
    assert not clearly_faster([0.90, 1.15, 0.70], [1.00, 1.30, 0.80], margin=0.05)


@pytest.mark.parametrize("times, than, expected", [
    ([0.5], [1.0], True),              # one step each: no noise estimate, the margin decides
    ([0.99], [1.0], False),
    ([0.5, 0.5], [1.0, 1.0], True),    # no variation on either side: the margin decides
    ([], [1.0], False),                # nothing timed is never faster
])
def test_without_an_estimate_of_the_noise_the_margin_decides(times, than, expected) -> None:
    assert clearly_faster(times, than, margin=0.05) is expected


def test_two_equal_placements_are_told_apart_about_alpha_of_the_time_at_most() -> None:
    """Steps of one program drawn twice (log-normal noise of 10%): a 'clear' gain is chance."""
    rng = np.random.default_rng(0)
    trials = 2000
    told = sum(clearly_faster(list(np.exp(rng.normal(0, 0.1, 4))), list(np.exp(rng.normal(0, 0.1, 4))), margin=0.0)
               for _ in range(trials))
    assert told / trials <= ALPHA * 1.3
