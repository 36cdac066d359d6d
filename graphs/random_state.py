"""The caller's random-number state, kept across work that draws from it.

Placing a model runs it (profiling, the numeric check with dropout), seeds torch for a
reproducible search (``torch.manual_seed``), and stable-baselines3 seeds Python's
``random``, numpy's global generator and torch (``set_random_seed``). A training job that
seeded itself before calling placer must train exactly as it would without placer, so
every public entry point runs inside :func:`kept_random_state`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random states (CPU and every CUDA device) on exit.

    >>> _ = torch.manual_seed(3); before = torch.rand(1)
    >>> _ = torch.manual_seed(3)
    >>> with kept_random_state():
    ...     _ = torch.manual_seed(99); _ = torch.rand(5); _ = np.random.rand(); _ = random.random()
    >>> bool(torch.rand(1) == before)
    True
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
