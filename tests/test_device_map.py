"""device_map.json is what ``accelerate.dispatch_model`` takes as it is, or it is not written and the report says why."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from envs.runtime.device_map import accelerate_device_map
from graphs.capture import capture
from placer.placement_file import PlacementFileError, save_device_map
from tests.helpers.model_files import TINY_MLP


class _Net(nn.Module):
    """Two blocks, a parameter of the model itself, and a buffer forward() never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("saved_only", torch.zeros(3))

    def forward(self, x):
        return self.head(self.block2(self.block1(x))) * self.scale


def _captured():
    torch.manual_seed(0)
    model = _Net()
    return model, capture(model, (torch.randn(5, 8),))


def _by_module(cap, devices: dict[str, str], default: str) -> dict[str, str]:
    out = {}
    for n, a in cap.graph.nodes(data=True):
        module = a.get("module") or ""
        out[n] = next((d for prefix, d in devices.items() if module.startswith(prefix)), default)
    return out


def test_every_parameter_and_buffer_is_covered_with_real_device_names():
    model, cap = _captured()
    placement = _by_module(cap, {"block1": "cuda:0", "block2": "cuda:1", "head": "cuda:1"}, "cuda:1")
    device_map, reason = accelerate_device_map(cap.graph, placement, model=model)
    assert reason == "" and device_map is not None
    assert device_map["block1"] == "cuda:0" and device_map["block2"] == "cuda:1"
    assert device_map["scale"] == "cuda:1"  # a parameter outside any submodule
    assert device_map["saved_only"] == "cuda:0"  # never read by forward(): on the main device
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert all(any(n == k or n.startswith(k + ".") for k in device_map) for n in names)


def test_accelerate_accepts_the_map_as_complete():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import check_device_map

    model, cap = _captured()
    placement = _by_module(cap, {"block1": "cuda:0"}, "cuda:1")
    device_map, _ = accelerate_device_map(cap.graph, placement, model=model)
    check_device_map(model, device_map)  # raises when a parameter is not covered
    assert accelerate is not None


def test_cpu_next_to_a_gpu_is_not_a_device_map_and_the_reason_says_why(tmp_path):
    model, cap = _captured()
    placement = _by_module(cap, {"block1": "cpu"}, "cuda:0")
    device_map, reason = accelerate_device_map(cap.graph, placement, model=model)
    assert device_map is None
    assert "'cpu' entries on the main device (cuda:0)" in reason
    with pytest.raises(PlacementFileError, match="offloaded weights"):
        save_device_map(placement, cap, tmp_path / "device_map.json", model=model)
    assert not (tmp_path / "device_map.json").exists()


def test_simulated_device_names_are_not_written():
    model, cap = _captured()
    device_map, reason = accelerate_device_map(cap.graph, _by_module(cap, {"block1": "gpu0"}, "gpu1"), model=model)
    assert device_map is None and "'gpu0'" in reason and "real_device" in reason


def _dispatch_and_compare(devices: dict[str, str], default: str, tmp_path) -> dict:
    accelerate = pytest.importorskip("accelerate")
    model, cap = _captured()
    x = torch.randn(5, 8)
    expected = copy.deepcopy(model)(x)
    path = save_device_map(_by_module(cap, devices, default), cap, tmp_path / "device_map.json", model=model)
    device_map = json.loads(path.read_text())  # as the user loads the file
    dispatched = accelerate.dispatch_model(copy.deepcopy(model), device_map=device_map)
    assert torch.allclose(dispatched(x).cpu(), expected, atol=1e-6)
    return device_map


def test_device_map_json_loads_as_it_is_into_dispatch_model_on_the_cpu(tmp_path):
    assert _dispatch_and_compare({}, "cpu", tmp_path) == {"": "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_map_json_over_cuda_modules_dispatches_with_the_same_outputs(tmp_path):
    last = f"cuda:{torch.cuda.device_count() - 1}"
    device_map = _dispatch_and_compare({"block1": "cuda:0", "block2": last}, last, tmp_path)
    assert device_map["block1"] == "cuda:0"


def test_optimize_on_a_cluster_without_real_devices_writes_no_device_map_and_says_why(tmp_path):
    import placer

    path = tmp_path / "net.py"
    path.write_text(TINY_MLP)
    out = tmp_path / "out"
    result = placer.optimize(str(path), cluster="4xK40", budget="50", out_dir=out, progress=False,
                             baselines=("round_robin",), verbose=0)
    result.save(out)
    used = set(result.placement.assignment.values())
    report = (out / "report.md").read_text()
    if len(used) > 1:
        assert not (out / "device_map.json").exists()
        assert "no `device_map.json`: the placement's devices" in report and "real_device" in report
    else:
        assert json.loads((out / "device_map.json").read_text()) == {"": "cpu"}
