"""Real-machine discovery: the latency/bandwidth fit and the on-disk cache (GPU links where present)."""

from __future__ import annotations

import pytest

from envs.hardware import links
from envs.hardware.loading import discover_cluster


def test_fit_latency_bandwidth_recovers_a_line():
    sizes = [4096, 10**6, 64 * 2**20]
    times = [10e-6 + s / 12e9 for s in sizes]
    latency, bandwidth = links.fit_latency_bandwidth(sizes, times)
    assert latency == pytest.approx(10e-6, rel=1e-6)
    assert bandwidth == pytest.approx(12e9, rel=1e-6)
    with pytest.raises(ValueError, match="two different sizes"):
        links.fit_latency_bandwidth([4096, 4096], [1e-5, 1e-5])
    with pytest.raises(ValueError, match="does not grow"):
        links.fit_latency_bandwidth([4096, 8192], [2e-5, 1e-5])


def test_a_link_between_processes_is_its_fastest_trips_not_the_late_wake_ups():
    """A receive woken a scheduler tick late adds milliseconds to some trips (more of them on a
    busy machine): the median read 1.69 ms of latency for a link whose trips take 60 us. The
    rank simulator charges those wake-ups apart (R3), so the link is the fastest trips' line."""
    small, large = 4096, 8 << 20

    def trip(size: int, late: float = 0.0) -> float:
        return 60e-6 + size / 3e9 + late

    one_way = {small: [trip(small, 2e-3), trip(small), trip(small, 2e-3), trip(small, 2e-6), trip(small, 2e-3)],
               large: [trip(large, 2e-3), trip(large), trip(large, 2e-3)]}
    latency, bandwidth = links.link_from_trips(one_way)
    assert latency == pytest.approx(60e-6, rel=1e-3) and bandwidth == pytest.approx(3e9, rel=1e-3)
    medians = [sorted(one_way[s])[len(one_way[s]) // 2] for s in (small, large)]
    assert links.fit_latency_bandwidth([small, large], medians)[0] > 1e-3  # what the median said
    with pytest.raises(ValueError, match="two different sizes"):
        links.link_from_trips({small: [1e-4]})


def test_discover_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    calls = []
    real = links.measure_devices_and_links

    def counting(torch=None):
        calls.append(1)
        return real(torch)

    monkeypatch.setattr(links, "measure_devices_and_links", counting)
    first = discover_cluster(cache_dir=tmp_path)
    second = discover_cluster(cache_dir=tmp_path)
    assert len(calls) == 1
    assert not first.simulated and first.device_names[0] == "cpu"
    assert first.devices == second.devices
    cpu = first.device("cpu")
    assert cpu.memory_bytes > 2**28 and cpu.peak_flops > 1e8 and cpu.mem_bandwidth > 1e8
    torch = pytest.importorskip("torch")
    assert first.num_devices == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for a in first.device_names:
        for b in first.device_names:
            if a != b:  # only on GPU machines
                assert first.link(a, b).bandwidth_Bps > 0


def test_a_cached_machine_gets_each_gpus_reserve_measured_again():
    """What other processes hold on a GPU changes between runs: the cached figure would be stale."""
    from types import SimpleNamespace

    from envs.hardware.links import _with_current_reserve

    cuda = SimpleNamespace(is_available=lambda: True, mem_get_info=lambda name: (10 * 2**30, 16 * 2**30))
    record = {"devices": [{"name": "cpu", "kind": "cpu", "reserved_bytes": 0},
                          {"name": "cuda:0", "kind": "cuda", "reserved_bytes": 1}]}
    fresh = _with_current_reserve(SimpleNamespace(cuda=cuda), record)
    assert [d["reserved_bytes"] for d in fresh["devices"]] == [0, 6 * 2**30]
    assert record["devices"][1]["reserved_bytes"] == 1  # the cached record itself is left as read
