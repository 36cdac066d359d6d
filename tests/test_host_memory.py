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


def _cluster(device: str):
    from types import SimpleNamespace

    return SimpleNamespace(real_device_map=lambda: {"d0": device})


def test_a_check_on_cpus_that_runs_out_of_memory_becomes_an_error_that_says_what_was_kept():
    from graphs.errors import PlacerError
    from placer.optimizing.host_checks import within_host_memory

    with pytest.raises(PlacerError, match=r"^the check X ran out of host memory: it trains two models on this "
                                          r"machine's CPU, and about .* was free .*--resume --no-check"):
        with within_host_memory(_cluster("cpu"), "the check X", "two models"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(ValueError, match="not memory"):  # anything else passes through as it is
        with within_host_memory(_cluster("cpu"), "the check X", "two models"):
            raise ValueError("not memory")
    with pytest.raises(MemoryError):  # no limit was set off the host: nothing to translate
        with within_host_memory(_cluster("cuda:0"), "the check X", "two models"):
            raise MemoryError


def test_the_batch_split_check_of_a_pipeline_runs_within_the_free_memory_too(monkeypatch):
    """Before the winner's check, optimize checks the fastest pipelines' batch splits, which
    train the model too: they stop with the same kind of message."""
    from types import SimpleNamespace

    import pandas as pd

    from envs.sim.pipeline_layout import Pipeline
    from graphs.errors import PlacerError
    from placer.optimizing import winner
    from placer.optimizing.config import OptimizeConfig

    limits: list[object] = []

    def out_of_memory(*_args, **_kwargs):
        limits.append(resource.getrlimit(resource.RLIMIT_DATA)[0])
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(winner, "check_batch_split", out_of_memory)
    model = torch.nn.Linear(4, 2)
    config = OptimizeConfig(model=model, example_inputs=(torch.randn(8, 4),))
    run = SimpleNamespace(spec=None, captured=None, cluster=_cluster("cpu"))
    table = pd.DataFrame({"method": ["pipe", "single"], "step_time": [1.0, 2.0], "source": ["simulated"] * 2,
                          "fits": [True, True], "note": ["", ""]})
    pipelines = {"pipe": Pipeline((("a",), ("b",)), ("cpu0", "cpu1"), 2, "gpipe")}
    with pytest.raises(PlacerError, match=r"^the check of a pipeline's batch split ran out of host memory: it trains "
                                          r"the model on the full batch and on its parts"):
        winner._set_aside_inexact_splits(config, SimpleNamespace(run=run), table, table, pipelines, {})
    assert limits and limits[0] != resource.RLIM_INFINITY  # it ran under the limit
