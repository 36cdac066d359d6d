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


def _fake_links(devices, threads=1, repeats=9, timeout_s=120.0):
    names = devices.split(",") if isinstance(devices, str) else list(devices)
    return {(names[0], b): (50e-6, 1e9) for b in names[1:]}


def test_resolve_cluster_builds_a_measured_rank_cluster(monkeypatch):
    monkeypatch.setattr(rank_cluster_module, "measure_links", _fake_links)
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
