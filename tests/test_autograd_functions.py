"""Custom autograd Functions are captured whole: the placed model runs their own backward."""

import pickle

import pytest
import torch
from torch import nn

from envs.runtime.apply import apply_placement
from graphs.autograd_functions import apply_function, is_function_call
from graphs.capture import capture
from graphs.errors import CaptureError
from placer.cli.main import main


class GradReverse(torch.autograd.Function):
    """Identity forward, negated and scaled gradient (domain-adversarial training)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.alpha * grad, None


class SplitHalves(torch.autograd.Function):
    """Two outputs, each with its own gradient rule."""

    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=1)
        return a.clone(), b.clone()

    @staticmethod
    def backward(ctx, ga, gb):
        return torch.cat([ga * 3, gb], dim=1)


class Adversarial(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 8)
        self.label = nn.Linear(4, 3)
        self.domain = nn.Linear(8, 2)

    def forward(self, x):
        f = torch.relu(self.features(x))
        a, b = SplitHalves.apply(f)
        return self.label(a + b).sum() + self.domain(GradReverse.apply(f, 0.5)).sum()


def _captured():
    torch.manual_seed(0)
    model = Adversarial()
    return model, capture(model, (torch.randn(5, 6),), name="adversarial")


def _placed_on_two(cap):
    nodes = list(cap.gm.graph.nodes)
    assignment = {n.name: ("a", "b")[i % 2] for i, n in enumerate(nodes)}
    return apply_placement(cap, assignment, real_devices={"a": "cpu", "b": "cpu"})


def test_each_function_call_is_one_node_named_by_its_class():
    _, cap = _captured()
    calls = [n for n in cap.gm.graph.nodes if is_function_call(n)]
    assert [n.args[0] for n in calls] == [f"{__name__}:SplitHalves", f"{__name__}:GradReverse"]
    assert {cap.graph.nodes[n.name]["target"] for n in calls} == {f"{__name__}.SplitHalves.apply",
                                                                  f"{__name__}.GradReverse.apply"}


def test_a_placed_model_runs_the_functions_own_backward_not_its_forwards_gradient():
    model, cap = _captured()
    placed = _placed_on_two(cap)
    x = torch.randn(5, 6)
    placed(x).backward()
    model(x).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(placed.get_parameter(name).grad, p.grad, msg=name)
    # The reversal is there: without it the features' gradient from the domain head flips sign.
    assert not torch.allclose(model.features.weight.grad, torch.zeros(8, 6))


def test_a_placed_model_keeps_the_function_through_pickle():
    model, cap = _captured()
    again = pickle.loads(pickle.dumps(_placed_on_two(cap)))
    assert sum(is_function_call(n) for n in again.graph.nodes) == 2
    x = torch.randn(5, 6)
    again(x).backward()
    model(x).backward()
    torch.testing.assert_close(again.get_parameter("features.weight").grad, model.features.weight.grad)


def test_apply_function_calls_the_named_function():
    x = torch.ones(3, requires_grad=True)
    apply_function(f"{__name__}:GradReverse", x, 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -2.0))


def test_a_function_defined_inside_a_function_is_refused_with_the_fix():
    class Local(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return Local.apply(self.lin(x))

    with pytest.raises(CaptureError, match="define it at module level.*or call it inside a submodule named as a leaf"):
        capture(Net(), (torch.randn(2, 3),), name="local_function")


FUNCTION_FILE = '''
import torch
from torch import nn


class ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * -0.25


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
        self.side = nn.Linear(16, 2)

    def forward(self, x):
        return self.body(x) + self.side(ScaleGradient.apply(x * 2))


def get_model():
    torch.manual_seed(0)
    return Net()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(32, 16),)
'''


def test_optimize_places_and_checks_a_model_file_calling_a_custom_function(tmp_path, capsys):
    path = tmp_path / "reversal.py"
    path.write_text(FUNCTION_FILE)
    out = tmp_path / "out"
    assert main(["optimize", str(path), "--cluster", "4xK40", "--budget", "100", "--out", str(out), "-q"]) == 0
    assert "check: same results" in capsys.readouterr().out
    assert (out / "placement.json").exists()


class ReversedChain(nn.Module):
    """A loss-returning model whose second stage starts with a custom Function."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x, y):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(GradReverse.apply(h, 0.5)))
        return nn.functional.cross_entropy(self.head(h), y)


def test_a_pipeline_stage_in_another_process_runs_the_functions_own_backward():
    import copy

    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline_layout import Pipeline
    from graphs.fx_tracer import fx_trace

    torch.manual_seed(0)
    model = ReversedChain()
    gm = fx_trace(model)
    names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = names.index("grad_reverse")
    pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe")
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(8, 8, generator=g), "y": torch.randint(0, 5, (8,), generator=g)}
    run = run_training(gm, batch, pipe, steps=1, optimizer=("sgd", {"lr": 0.1}), timeout_s=120)
    reference = copy.deepcopy(model)  # the user's module, whose forward calls GradReverse.apply itself
    reference(batch["x"], batch["y"]).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(run.grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_function_is_charged_the_kernels_its_forward_launches():
    _, cap = _captured()
    # SplitHalves: chunk (a view) and two clones; GradReverse: a view only, at least one launch
    assert cap.graph.nodes["split_halves"]["num_ops"] == 2
    assert cap.graph.nodes["grad_reverse"].get("num_ops", 1) == 1


def test_a_reloaded_model_file_calls_its_new_function(tmp_path, monkeypatch):
    import importlib
    import os
    import sys
    import time

    source = ("import torch\n\n\nclass Scale(torch.autograd.Function):\n    @staticmethod\n"
              "    def forward(ctx, x):\n        return x * {k}\n\n    @staticmethod\n"
              "    def backward(ctx, g):\n        return g * {k}\n")
    path = tmp_path / "reloaded_function_file.py"
    path.write_text(source.format(k=2))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloaded_function_file")
    try:
        assert apply_function("reloaded_function_file:Scale", torch.ones(1)).item() == 2
        path.write_text(source.format(k=3))
        os.utime(path, (time.time() + 5, time.time() + 5))  # a newer mtime than the cached bytecode
        importlib.reload(module)
        assert apply_function("reloaded_function_file:Scale", torch.ones(1)).item() == 3
    finally:
        sys.modules.pop("reloaded_function_file", None)
