"""Fixtures shared by the test modules (the builders they use are in ``tests/helpers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def numpy_simulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Simulate with the numpy path: tiny problems do not repay numba's JIT warm-up (~10 s per process)."""
    import envs.sim.simulator

    monkeypatch.setattr(envs.sim.simulator, "HAS_NUMBA", False)
    yield
