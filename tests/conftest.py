"""Fixtures shared by the test modules (the builders they use are in ``tests/helpers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def subprocess_temporary_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite and the processes it starts keep their temporary files under pytest's own
    temporary folder (which pytest prunes), not in /tmp: ``torchrun`` makes a ``torchelastic_*``
    log folder per run and leaves it, and so does SB3's ``learn()`` (``SB3-<date>``) where a test
    drives an SB3 model itself."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", folder)
        patch.setattr(tempfile, "tempdir", folder)
        yield


@pytest.fixture
def numpy_simulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Simulate with the numpy path: tiny problems do not repay numba's JIT warm-up (~10 s per process)."""
    import envs.sim.simulator

    monkeypatch.setattr(envs.sim.simulator, "HAS_NUMBA", False)
    yield


@pytest.fixture
def fake_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank clusters (``cpu:0,cpu:1``) get fixed link figures (:func:`tests.helpers.measurers.fixed_links`)
    instead of a job of worker processes that measures them (seconds per cluster built)."""
    from envs.runtime.distributed import rank_cluster
    from tests.helpers.measurers import fixed_links

    monkeypatch.setattr(rank_cluster, "measure_links", fixed_links)
