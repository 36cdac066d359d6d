"""The optimize integration of the distributed runtime: rank device lists and measured reward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from envs.hardware.rank_devices import RankDeviceError, is_distributed_cluster
from envs.runtime.distributed import rank_cluster as rank_cluster_module
from envs.runtime.distributed.rank_cluster import rank_cluster
from placer.optimizing.devices import resolve_cluster
from placer.options import OptionError
from tests.helpers.measurers import fixed_links


def test_resolve_cluster_builds_a_measured_rank_cluster(monkeypatch):
    monkeypatch.setattr(rank_cluster_module, "measure_links", fixed_links)
    cluster = resolve_cluster(devices="cpu:0,cpu:1")
    assert cluster.device_names == ["cpu:0", "cpu:1"]
    assert not cluster.simulated and is_distributed_cluster(cluster)
    link = cluster.link("cpu:1", "cpu:0")
    assert link.latency_s == pytest.approx(50e-6) and link.bandwidth_Bps == pytest.approx(1e9)
    # In one process (the numerical check of the winner) both ranks are the CPU.
    assert {torch.device(v).type for v in cluster.real_device_map().values()} == {"cpu"}
    capped = resolve_cluster(devices="cpu:0,cpu:1", memory="cpu:1=1GiB")
    assert capped.device("cpu:1").usable_bytes == 2**30  # the cap; the rank process's own memory on top
    assert cluster.device("cpu:0").reserved_bytes > 0


def test_remote_ranks_need_their_link_figures():
    with pytest.raises(RankDeviceError, match="other hosts"):
        rank_cluster("cpu:0,node2:cpu:0")
    with pytest.raises(OptionError, match="other hosts"):
        resolve_cluster(devices="cpu:0,node2:cpu:0")
    given = rank_cluster("cpu:0,node2:cpu:0", links={("cpu:0", "node2:cpu:0"): (1e-4, 1e8)})
    assert given.link("cpu:0", "node2:cpu:0").bandwidth_Bps == pytest.approx(1e8)


def test_remote_ranks_are_refused_in_the_users_terms_not_by_an_internal_function():
    """The refusal named measure_links(), which the user never calls; it names the ranks and what to use."""
    with pytest.raises(OptionError) as exc:
        resolve_cluster(devices="cpu:0,node2:cpu:0")
    message = str(exc.value)
    assert "()" not in message and "node2:cpu:0" in message and "--cluster" in message


def test_plain_real_devices_keep_the_single_process_path():
    cluster = resolve_cluster(devices="cpu")
    assert cluster.device_names == ["cpu"] and not is_distributed_cluster(cluster)


@pytest.mark.slow
def test_optimize_cli_measures_over_two_workers(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "placer", "optimize", "zoo:rnnlm", "--devices", "cpu:0,cpu:1",
         "--reward", "measured", "--budget", "5s", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    placement = json.loads((out / "placement.json").read_text())
    assert set(placement["devices"]) == {"cpu:0", "cpu:1"}
    assert "measured" in (out / "report.md").read_text()


def test_a_memory_cap_on_a_gpu_is_what_the_placement_may_fill_beside_its_cuda_context():
    """``--memory gpu0=8GiB`` lets the placement fill 8 GiB: the context's reserve comes on top
    (it was taken from the cap, so a cap below the reserve left nothing)."""
    from envs.hardware.loading import load_cluster

    preset = load_cluster("4xK40")
    capped = resolve_cluster(cluster="4xK40", memory="gpu0=8GiB,gpu1=64MiB")
    assert capped.device("gpu0").usable_bytes == 8 * 2**30
    assert capped.device("gpu1").usable_bytes == 64 * 2**20
    assert capped.device("gpu2") == preset.device("gpu2")
    roomy = resolve_cluster(cluster="4xK40", memory="gpu0=64GiB")
    assert roomy.device("gpu0").usable_bytes == preset.device("gpu0").usable_bytes  # a cap never adds memory


def _machine(cpu_memory: int, gpu_reserved: int = 300 * 2**20):
    from envs.hardware.cluster import Device, make_cluster

    return make_cluster([Device("cpu", "cpu", cpu_memory, 1e11, 1e10, real_device="cpu"),
                         Device("cuda:0", "cuda", 16 * 2**30, 1e13, 9e11, real_device="cuda:0",
                                reserved_bytes=gpu_reserved)],
                        name="machine", simulated=False, default_link=(1e-5, 1e10))


def test_a_gpu_rank_reserves_its_own_cuda_context_beside_the_measured_one(monkeypatch):
    """The measured reserve holds this process's context; the rank process opens another."""
    from envs.hardware.cluster import GPU_CONTEXT_BYTES

    monkeypatch.setattr(rank_cluster_module, "discover_cluster", lambda cache_dir=None: _machine(8 * 2**30))
    cluster = rank_cluster("cpu:0,cuda:0", links={("cpu:0", "cuda:0"): (1e-5, 1e9)})
    assert cluster.device("cuda:0").reserved_bytes == 300 * 2**20 + GPU_CONTEXT_BYTES


def test_more_cpu_workers_than_the_machine_has_memory_for_are_refused_naming_why(monkeypatch):
    monkeypatch.setattr(rank_cluster_module, "discover_cluster", lambda cache_dir=None: _machine(2**30))
    names = [f"cpu:{i}" for i in range(5)]
    with pytest.raises(RankDeviceError, match=r"5 worker processes share this machine's 1.0 GiB: 205 MiB each, no more "
                                              r"than a worker process takes before its first tensor \(240 MiB\)"):
        rank_cluster(names, links={(a, b): (1e-5, 1e9) for a in names for b in names if a != b})
