"""A model that cannot fit is refused before the search, with what it needs per device and the limits."""

from __future__ import annotations

import pytest
import torch

import placer
from envs.hardware.cluster import Cluster, Device
from envs.sim.problem_compile import compile_problem
from graphs.capture import capture
from placer.memory_fit import MemoryFitError, check_memory_fits, memory_needs

MODEL = """
import torch

def get_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))

def get_example_inputs():
    return (torch.randn(4, 64),)
"""


def _cluster(memory: str) -> dict:
    # reserved 0: these GPUs are smaller than a CUDA context; the limits are what is tested
    device = {"kind": "K40", "memory": memory, "reserved": 0, "peak_flops": "4.29T", "mem_bandwidth": "288GB/s"}
    return {"name": "tiny", "devices": [{"name": f"gpu{i}", **device} for i in range(2)],
            "default_link": {"latency": "10us", "bandwidth": "10GB/s"}}


def test_a_model_larger_than_all_devices_together_fails_before_the_search(tmp_path, monkeypatch):
    import placer.search.search as search_module

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran for a model that cannot fit")

    monkeypatch.setattr(search_module, "search", no_search)
    path = tmp_path / "mlp.py"
    path.write_text(MODEL)
    with pytest.raises(MemoryFitError) as info:
        placer.optimize(str(path), cluster=_cluster("64KiB"), budget="100", progress=False, verbose=0,
                        baselines=("single", "round_robin"), out_dir=tmp_path / "out")
    message = str(info.value)
    assert "the model needs" in message and "per device if spread evenly" in message
    assert "device limits: gpu0=64 KiB, gpu1=64 KiB" in message
    assert not (tmp_path / "out").exists()


def test_memory_needs_adds_parameters_gradients_and_activations():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    cap = capture(model, (torch.randn(4, 64),))
    devices = tuple(Device(f"gpu{i}", "K40", 2**30, 4.29e12, 288e9) for i in range(2))
    problem = compile_problem(cap.graph, Cluster("two", devices, (), True, (1e-5, 1e10)))
    static, text = memory_needs(problem)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert static.sum() >= 2 * params  # parameters and their gradients at least
    assert "device limits: gpu0=1 GiB, gpu1=1 GiB" in text
    check_memory_fits(problem)  # 1 GiB each holds it


def test_a_group_whose_optimizer_step_overfills_every_device_is_refused_naming_the_step():
    """A Linear(512, 512) with Adam: parameters, gradients and moments (4 MiB) fit 5 MiB, but
    Adam's update allocates temporaries of the weight's size one parameter at a time (4x the
    parameters: 4 MiB more), so no device can run its step; the message says so."""
    model = torch.nn.Sequential(torch.nn.Linear(512, 512))
    cap = capture(model, (torch.randn(2, 512),))
    devices = tuple(Device(f"gpu{i}", "K40", 5 * 2**20, 4.29e12, 288e9) for i in range(2))
    problem = compile_problem(cap.graph, Cluster("two", devices, (), True, (1e-5, 1e10)), optimizer="adam")
    with pytest.raises(MemoryFitError) as info:
        check_memory_fits(problem)
    message = str(info.value)
    assert "at the optimizer step" in message and "the update's temporaries 4.01 MiB" in message
    assert "does not fit the largest device (5 MiB)" in message


def test_when_no_method_fits_the_error_says_how_far_the_closest_placement_is_over(tmp_path):
    """Four Linear(256, 256) on two 1.5 MiB GPUs: the needs read as if they fit (1.02 MiB per
    device at best, the largest group 779 KiB), yet every placement overflows by the optimizer
    step's temporaries; the error says by how much, device by device."""
    from graphs.errors import PlacerError

    path = tmp_path / "mlp4.py"
    path.write_text("""
import torch

def get_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])

def get_example_inputs():
    return (torch.randn(8, 256),)
""")
    with pytest.raises(PlacerError) as info:
        placer.optimize(str(path), cluster=_cluster("1536KiB"), budget="50", progress=False, verbose=0,
                        baselines=("single", "expert"), out_dir=tmp_path / "out", check=False)
    message = str(info.value)
    assert message.startswith("no method found a placement that fits in device memory")
    assert "the closest placement tried (simulated) needs gpu0=" in message
    assert "of 1.5 MiB usable (" in message and " over)" in message


def test_the_limits_say_what_a_spec_gpu_reserves_for_its_cuda_context():
    """A spec's ``memory: 520MiB`` GPU leaves 8 MiB to a placement (512 MiB for the CUDA
    context); "gpu0=8 MiB" alone reads like a typo in the spec, so the limit says why."""
    from envs.hardware.loading import load_cluster

    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    cap = capture(model, (torch.randn(2, 1024),))
    spec = {"name": "spec", "devices": [{"name": f"gpu{i}", "kind": "K40", "memory": "520MiB", "peak_flops": "4.29T",
                                         "mem_bandwidth": "288GB/s"} for i in range(2)],
            "default_link": {"latency": "10us", "bandwidth": "10GB/s"}}
    cluster = load_cluster(spec)
    problem = compile_problem(cap.graph, cluster, optimizer="adam")
    with pytest.raises(MemoryFitError) as info:
        check_memory_fits(problem, cluster)
    assert "gpu0=8 MiB (of 520 MiB, 512 MiB reserved for the CUDA context)" in str(info.value)
