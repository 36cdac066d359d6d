"""A model with a ``torch.jit.script``-ed layer: captured as one op, copied, checked and sent to
pipeline workers (graphs.fx_tracer, envs.runtime.module_copy, graphs.portable_graph)."""

import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

from envs.runtime.check import check_placement
from envs.runtime.module_copy import deep_copy
from envs.runtime.pipeline.launcher import run_training
from envs.sim.pipeline_layout import Pipeline
from graphs.capture import capture
from graphs.model_file import ModelSpec
from graphs.portable_graph import PortableGraph, portable_pickle


class Gate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lin(x).chunk(2, dim=-1)
        return a * torch.sigmoid(b)


class Gated(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.gates = nn.ModuleList([torch.jit.script(Gate(d)) for _ in range(2)])
        self.out = nn.Linear(d, 3)

    def forward(self, x, y):
        h = self.inp(x)
        for g in self.gates:
            h = h + g(h)
        return F.cross_entropy(self.out(h), y)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_a_scripted_layer_is_captured_as_one_op_that_runs_its_own_forward():
    torch.manual_seed(0)
    model = Gated()
    captured = capture(model, batch())
    assert [n.name for n in captured.gm.graph.nodes if n.op == "call_module"] == ["inp", "gates_0", "gates_1", "out"]
    torch.testing.assert_close(captured.gm(*batch()), model(*batch()))


def test_a_copy_of_a_scripted_layer_has_leaf_parameters_of_its_own():
    """copy.deepcopy of a ScriptModule gives parameters with a grad_fn (CloneBackward0), which no
    optimizer takes and whose gradient reaches the original's."""
    model = Gated()
    twin = deep_copy(model)
    assert all(p.is_leaf for p in twin.parameters())
    twin(*batch()).backward()
    assert all(p.grad is None for p in model.parameters())
    assert not all(p.is_leaf for p in copy.deepcopy(model).parameters())  # what deep_copy mends


def test_the_check_passes_a_placement_that_splits_the_scripted_layers():
    torch.manual_seed(0)
    model = Gated()
    spec = ModelSpec(model=model, example_inputs=batch(), loss_fn=lambda out, *_: out, name="gated")
    captured = capture(model, spec.example_inputs)
    assignment = {n: ("gpu1" if n in ("gates_1", "out") else "gpu0") for n in captured.graph.nodes}
    report = check_placement(spec, captured, assignment, {"gpu0": "cpu", "gpu1": "cpu"})
    assert report.ok, report.describe()


def test_a_graph_holding_a_scripted_layer_reaches_a_worker_and_a_pipeline_trains_like_the_unsplit_model():
    torch.manual_seed(0)
    model = Gated()
    gm = capture(model, batch()).gm
    buffer = io.BytesIO()
    torch.save({"gm": PortableGraph.of(gm)}, buffer, pickle_module=portable_pickle)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)["gm"].module()
    torch.testing.assert_close(again(*batch()), gm(*batch()))

    x, y = batch()
    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = compute.index("gates_1")
    pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe")
    run = run_training(gm, {"x": x, "y": y}, pipe, steps=2, optimizer=("sgd", {"lr": 0.1}), timeout_s=120)
    reference = deep_copy(gm)
    reference(x, y).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(run.grads[name], p.grad, rtol=1e-5, atol=1e-7)
