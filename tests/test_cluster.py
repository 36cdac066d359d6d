"""Clusters: presets, spec files, units and the errors bad specs get."""

from __future__ import annotations

import json

import pytest

from envs.hardware.cluster import Cluster, ClusterSpecError, Device, Link, cluster_from_spec
from envs.hardware.loading import list_presets, load_cluster
from envs.hardware.units import UnitError, parse_bandwidth, parse_bytes, parse_flops, parse_seconds
from graphs.errors import PlacerError


def _spec(**overrides):
    spec = {
        "name": "t",
        "devices": [
            {"name": "cpu", "kind": "cpu", "memory": "64GiB", "peak_flops": "0.5T", "mem_bandwidth": "60GB/s"},
            {"name": "g0", "kind": "K40", "memory": "12GiB", "peak_flops": "4.29T", "mem_bandwidth": "288GB/s"},
        ],
        "links": [{"between": ["cpu", "g0"], "latency": "10us", "bandwidth": "12GB/s"}],
    }
    spec.update(overrides)
    return spec


def test_units():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes(1024) == 1024
    assert parse_flops("4.29 TFLOPS") == 4.29e12
    assert parse_bandwidth("1.5TB/s") == 1.5e12
    assert parse_seconds("10us") == 1e-5 and parse_seconds("2ms") == 2e-3 and parse_seconds(0) == 0.0
    for bad, fn in (("12 parsecs", parse_bytes), ("-3GB/s", parse_bandwidth), ("fast", parse_flops), ("1 week", parse_seconds)):
        with pytest.raises(UnitError):
            fn(bad)
    with pytest.raises(UnitError, match="positive"):
        parse_bandwidth(0)


def test_every_preset_loads_and_is_fully_linked():
    names = list_presets()
    assert {"4xK40", "8xK40", "4xV100-nvlink", "8xA100-nvlink", "8xH100", "cpu+gpu"} <= set(names)
    for name in names:
        cluster = load_cluster(name)
        assert cluster.simulated and cluster.name == name
        for a in cluster.device_names:
            for b in cluster.device_names:
                if a != b:
                    assert cluster.link(a, b).bandwidth_Bps > 0
    k40 = load_cluster("4xK40")
    assert k40.device_names == ["cpu", "gpu0", "gpu1", "gpu2", "gpu3"]
    assert k40.device("gpu0").memory_bytes == 12 * 2**30
    assert k40.link("gpu1", "cpu").bandwidth_Bps == 12e9  # mirrored direction
    assert k40.link("gpu1", "gpu2").bandwidth_Bps == 10e9  # default link


def test_spec_files_yaml_and_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_spec()))
    cluster = load_cluster(str(path))
    assert cluster.device("g0").kind == "K40" and cluster.link("g0", "cpu").latency_s == 1e-5
    ypath = tmp_path / "c.yaml"
    ypath.write_text("name: y\ndevices:\n  - {name: a, kind: v100, memory: 16GiB, peak_flops: 15.7T, mem_bandwidth: 900GB/s}\n")
    assert load_cluster(ypath).devices[0].kind == "V100"  # kinds are case-insensitive


def test_asymmetric_links():
    spec = _spec(links=[
        {"from": "cpu", "to": "g0", "latency": "10us", "bandwidth": "12GB/s"},
        {"from": "g0", "to": "cpu", "latency": "20us", "bandwidth": "6GB/s"},
    ])
    cluster = cluster_from_spec(spec)
    assert cluster.link("cpu", "g0").bandwidth_Bps == 12e9
    assert cluster.link("g0", "cpu").bandwidth_Bps == 6e9


def test_a_link_given_by_between_and_again_for_one_direction_with_other_figures_is_refused():
    """``between`` covers both directions: a second entry for the reverse with other figures
    contradicts it (it was accepted and silently made the link asymmetric)."""
    first = {"between": ["cpu", "g0"], "latency": "10us", "bandwidth": "12GB/s"}
    for second in ({"between": ["g0", "cpu"], "latency": "20us", "bandwidth": "12GB/s"},
                   {"from": "g0", "to": "cpu", "latency": "10us", "bandwidth": "6GB/s"}):
        with pytest.raises(ClusterSpecError, match=r"links\[1\] \('g0'-'cpu'\) gives 'g0'->'cpu' other figures than "
                                                   r"links\[0\] \('cpu'-'g0'\), and links\[0\]'s 'between' covers both"):
            cluster_from_spec(_spec(links=[first, second]))
    same = cluster_from_spec(_spec(links=[first, {"between": ["g0", "cpu"], "latency": "10us", "bandwidth": "12GB/s"}]))
    assert same.link("g0", "cpu").bandwidth_Bps == 12e9


def test_a_gpu_in_a_spec_reserves_its_cuda_context_unless_the_spec_says_otherwise():
    """A placement may fill a GPU's memory less what the CUDA context holds before the first
    tensor; a placement that fills total_memory to the byte runs out of memory on the real GPU."""
    from envs.hardware.cluster import GPU_CONTEXT_BYTES

    cluster = cluster_from_spec(_spec())
    cpu, gpu = cluster.device("cpu"), cluster.device("g0")
    assert (cpu.reserved_bytes, cpu.usable_bytes) == (0, cpu.memory_bytes)
    assert gpu.reserved_bytes == GPU_CONTEXT_BYTES and gpu.usable_bytes == gpu.memory_bytes - GPU_CONTEXT_BYTES
    assert "usable" in cluster.describe()
    given = _spec()
    given["devices"][1] = {**given["devices"][1], "reserved": "1GiB"}
    assert cluster_from_spec(given).device("g0").usable_bytes == cluster_from_spec(given).device("g0").memory_bytes - 2**30
    tiny = _spec()
    tiny["devices"][1] = {**tiny["devices"][1], "memory": "256MiB"}
    with pytest.raises(ClusterSpecError, match=r"devices\[1\] \('g0'\): memory '256MiB' is no more than the 512 MiB "
                                               r"a GPU's CUDA context takes.*'reserved' given explicitly"):
        cluster_from_spec(tiny)
    tiny["devices"][1]["reserved"] = 0
    assert cluster_from_spec(tiny).device("g0").usable_bytes == 256 * 2**20
    with pytest.raises(ClusterSpecError, match=r"reserved \(1073741824 bytes\) leaves nothing of its memory"):
        Device("g", "K40", 2**30, 1e12, 1e11, reserved_bytes=2**30)


def test_the_simulator_refuses_a_placement_that_fits_total_memory_but_not_beside_the_context():
    """The simulated peak is checked against usable memory in both simulators."""
    import numpy as np
    import torch

    from envs.sim.problem_compile import compile_problem
    from envs.sim.reference_simulator import simulate_reference
    from envs.sim.simulator import simulate
    from graphs.capture import capture

    graph = capture(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4)),
                    (torch.randn(8, 256),)).graph
    roomy = Cluster("c", (Device("g", "K40", 2**30, 4.29e12, 288e9),))
    roomy_problem = compile_problem(graph, roomy)
    peak = float(simulate(roomy_problem, np.zeros(roomy_problem.num_nodes, dtype=np.int64)).peak_memory[0])
    # total memory holds the step with room to spare; beside a context of the rest it does not
    squeezed = Cluster("c", (Device("g", "K40", int(2 * peak), 4.29e12, 288e9, reserved_bytes=int(1.5 * peak)),))
    problem = compile_problem(graph, squeezed)
    assert problem.memory_capacity[0] == squeezed.devices[0].usable_bytes
    placement = np.zeros(problem.num_nodes, dtype=np.int64)
    assert not simulate(problem, placement).fits
    assert not simulate_reference(graph, squeezed, {n: "g" for n in graph.nodes}).fits


@pytest.mark.parametrize(
    "spec, message",
    [
        (_spec(devices=[{"name": "cpu", "kind": "cpu", "memory": "1GiB", "peak_flops": "1T"}]),
         r"devices\[0\] \('cpu'\) misses field\(s\) \['mem_bandwidth'\]"),
        (_spec(links=[{"between": ["cpu", "g0"], "latency": "1us", "bandwidth": "-5GB/s"}]),
         r"links\[0\] \('cpu'-'g0'\).*bandwidth"),
        (_spec(links=[{"between": ["cpu", "g0"], "latency": "1us", "bandwidth": 0}]), r"links\[0\].*positive"),
        (_spec(devices=[{"name": "x", "kind": "TPU", "memory": 1, "peak_flops": 1, "mem_bandwidth": 1}]),
         r"devices\[0\] \('x'\) has unknown device kind 'TPU'"),
        (_spec(links=[{"between": ["cpu", "g9"], "latency": "1us", "bandwidth": "1GB/s"}]),
         r"links\[0\].*'g9', which does not exist"),
        (_spec(devices=[_spec()["devices"][0], _spec()["devices"][0]], links=[]), r"devices\[1\]: duplicate device name 'cpu'"),
        (_spec(links=[]), r"no link between 'cpu' and 'g0'.*default_link"),
        (_spec(devices=[]), r"non-empty list"),
        ({"name": "x"}, r"misses 'devices'"),
        (_spec(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (_spec(default_link={"latency": "1us"}), r"default_link misses field\(s\) \['bandwidth'\]"),
        (_spec(devices=[{"name": "a", "kind": "cpu", "memory": "lots", "peak_flops": 1, "mem_bandwidth": 1}], links=[]),
         r"devices\[0\] \('a'\): cannot read memory size 'lots'"),
    ],
)
def test_bad_specs_name_the_entry(spec, message):
    with pytest.raises(ClusterSpecError, match=message) as info:
        cluster_from_spec(spec)
    assert isinstance(info.value, PlacerError)


def test_unknown_cluster_and_missing_file(tmp_path):
    with pytest.raises(ClusterSpecError, match="unknown cluster 'nope'.*4xK40"):
        load_cluster("nope")
    with pytest.raises(ClusterSpecError, match="does not exist"):
        load_cluster(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [unclosed")
    with pytest.raises(ClusterSpecError, match="not valid YAML"):
        load_cluster(str(bad))


def test_programmatic_construction_and_lookup():
    devs = (Device("a", "cpu", 10, 1.0, 1.0), Device("b", "H100", 10, 1.0, 1.0, real_device="cpu"))
    cluster = Cluster("p", devs, default_link=(1e-6, 1e9))
    assert cluster.device_index("b") == 1
    assert cluster.link("a", "b").transfer_time(1e9) == pytest.approx(1.0 + 1e-6)
    assert cluster.real_device_map() == {"a": "cpu", "b": "cpu"}
    with pytest.raises(ClusterSpecError, match="no device 'c'"):
        cluster.device_index("c")
    with pytest.raises(ClusterSpecError, match="to itself"):
        Link("a", "a", 0.0, 1.0)
    with pytest.raises(ClusterSpecError, match="unknown kind"):
        Device("z", "gpu", 1, 1.0, 1.0)


def test_a_contradiction_names_the_between_entry_whichever_comes_first_and_two_from_to_entries_are_given_twice():
    from_to = {"from": "g0", "to": "cpu", "latency": "20us", "bandwidth": "12GB/s"}
    between = {"between": ["cpu", "g0"], "latency": "10us", "bandwidth": "12GB/s"}
    with pytest.raises(ClusterSpecError, match=r"and links\[1\]'s 'between' covers both"):
        cluster_from_spec(_spec(links=[from_to, between]))
    with pytest.raises(ClusterSpecError, match=r"links\[1\]: the link 'g0'->'cpu' is given twice"):
        cluster_from_spec(_spec(links=[from_to, {**from_to, "latency": "30us"}]))
