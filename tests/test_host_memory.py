"""Running out of host memory in the numerical check is an error with a message, not a killed process."""

from __future__ import annotations

import resource

import pytest
import torch

from envs.runtime import host_memory
from envs.runtime.host_memory import host_memory_limit, is_out_of_memory
from tests.helpers.model_files import WIDE_MLP


def test_an_allocation_past_the_free_memory_fails_in_the_block_and_the_old_limit_returns(monkeypatch):
    before = resource.getrlimit(resource.RLIMIT_DATA)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 64 * 2**20)
    with host_memory_limit() as limit:
        assert limit is not None
        small = torch.empty(4 * 2**20)  # 16 MiB of the 57 allowed
        # 2 GiB, more than this process can have freed before (freed memory it kept is reused
        # within its data size); torch.empty never touches it, so no page is really used.
        with pytest.raises(RuntimeError) as caught:
            torch.empty(512 * 2**20)
        assert is_out_of_memory(caught.value)
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    assert torch.empty(512 * 2**20).numel() == 512 * 2**20 and small.numel() == 4 * 2**20


def test_a_limit_already_tighter_is_left_as_it_is(monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    used = host_memory.data_bytes()
    assert used is not None
    tight = used + 512 * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (tight, hard))
    try:
        with host_memory_limit() as limit:
            assert limit is None and resource.getrlimit(resource.RLIMIT_DATA) == (tight, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def test_a_check_that_runs_out_of_memory_says_so_and_keeps_the_best_placement(tmp_path):
    """In a fresh process: one that freed memory before (this test session) reuses it within
    its data size, and the limit only stops growth beyond that."""
    import subprocess
    import sys

    (tmp_path / "wide.py").write_text(WIDE_MLP)
    out = tmp_path / "out"
    script = f"""
import placer
from envs.runtime import host_memory
from graphs.errors import PlacerError
host_memory.available_bytes = lambda: 48 * 2**20
try:
    placer.optimize({str(tmp_path / "wide.py")!r}, cluster="4xK40", budget="50", out_dir={str(out)!r},
                    progress=False, baselines=("single",), verbose=0, cache_dir={str(tmp_path / "cache")!r})
except PlacerError as exc:
    print("ERROR", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ERROR the numerical check ran out of host memory" in done.stdout and "--no-check" in done.stdout
    assert (out / "best_placement.json").exists() and not (out / "placement.json").exists()
