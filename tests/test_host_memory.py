"""Running out of host memory in the numerical check is an error with a message, not a killed process."""

from __future__ import annotations

import resource

import pytest
import torch

from envs.runtime import host_memory
from envs.runtime.host_memory import host_memory_limit, is_out_of_memory

WIDE = '''
import torch

def get_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048))

def get_example_inputs():
    return (torch.randn(4, 2048),)
'''


def test_an_allocation_past_the_free_memory_fails_in_the_block_and_the_old_limit_returns(monkeypatch):
    before = resource.getrlimit(resource.RLIMIT_DATA)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 64 * 2**20)
    with host_memory_limit() as limit:
        assert limit is not None
        small = torch.empty(4 * 2**20)  # 16 MiB of the 57 allowed
        with pytest.raises(RuntimeError) as caught:
            torch.empty(32 * 2**20)  # 128 MiB
        assert is_out_of_memory(caught.value)
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    assert torch.empty(32 * 2**20).numel() == 32 * 2**20 and small.numel() == 4 * 2**20


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


def test_a_check_that_runs_out_of_memory_says_so_and_keeps_the_best_placement(tmp_path, monkeypatch):
    import placer
    from graphs.errors import PlacerError

    (tmp_path / "wide.py").write_text(WIDE)
    # 16 MiB of weights: the check's copies (weights, gradients, Adam's moments) need ~130 MiB.
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 48 * 2**20)
    out = tmp_path / "out"
    with pytest.raises(PlacerError, match="the numerical check ran out of host memory") as caught:
        placer.optimize(str(tmp_path / "wide.py"), cluster="4xK40", budget="50", out_dir=out, progress=False,
                        baselines=("single",), verbose=0, cache_dir=tmp_path / "cache")
    assert "--no-check" in str(caught.value)
    assert (out / "best_placement.json").exists() and not (out / "placement.json").exists()
    assert torch.empty(64 * 2**20).numel() == 64 * 2**20  # the limit is gone with the check
