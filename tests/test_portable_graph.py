"""graphs.portable_graph: a GraphModule pickled node by node comes back with the same node names
and computes the same thing, for graphs fx traced and graphs torch.export captured (whose
GraphModule pickling re-traces under other names)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from graphs.capture import capture
from graphs.portable_graph import PortableGraph


def _crossed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` after the trip a worker process gets: written with placer's pickler, read back."""
    from graphs.portable_graph import portable_pickle

    buffer = io.BytesIO()
    torch.save(PortableGraph.of(gm), buffer, pickle_module=portable_pickle)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False).module()


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls = self.calls + 1  # only torch.export keeps this update
        return self.norm(self.lin(x).relu() + x)[:, 1:].sum(-1)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cat([self.lin(x), x], dim=1).softmax(-1)


@pytest.mark.parametrize("model_type, method", [(_Plain, "fx"), (_Counting, "export")])
def test_a_graph_module_comes_back_with_the_same_nodes_and_outputs(model_type, method):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    cap = capture(model_type(), (x,))
    assert cap.method == method
    buffer = io.BytesIO()
    torch.save(PortableGraph.of(cap.gm), buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False).module()
    assert [(n.name, n.op) for n in again.graph.nodes] == [(n.name, n.op) for n in cap.gm.graph.nodes]
    assert torch.equal(again(x), cap.gm(x))
    # torch's own pickling re-traces the code with the graph's tracer, which for torch.export
    # cannot be built there (and would name the nodes otherwise): a captured module pickles
    # node by node instead (graphs.eval_mode), so both come back with the same nodes.
    loaded = pickle.loads(pickle.dumps(cap.gm))
    assert [(n.name, n.op) for n in loaded.graph.nodes] == [(n.name, n.op) for n in cap.gm.graph.nodes]
    assert torch.equal(loaded(x), cap.gm(x))


class _Pooling(nn.Module):
    """Calls ``F.max_pool2d``, which ``boolean_dispatch`` makes inside a factory (as Inception-v3 does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.nn.functional.max_pool2d(self.conv(x), 2).sum()


def test_a_graph_calling_a_function_made_in_a_factory_pickles_and_computes_the_same():
    with pytest.raises(AttributeError, match="Can't pickle local object"):
        pickle.dumps(torch.nn.functional.max_pool2d)  # why a reference by name is needed
    torch.manual_seed(0)
    model, x = _Pooling(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), name="pooling").gm
    again = pickle.loads(pickle.dumps(PortableGraph.of(gm))).module()
    assert [n.name for n in again.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert torch.equal(again(x), gm(x))


def test_a_lambda_hook_on_a_layer_crosses_to_a_worker_and_still_runs():
    """A forward pre-hook written as a lambda in the model's __init__: pickle refused the graph
    ("Can't pickle local object 'Net.__init__.<locals>.<lambda>'"), so no pipeline or DDP of
    such a model was measured."""

    torch.manual_seed(0)
    model = _Plain()
    model.lin.register_forward_pre_hook(lambda m, args: (args[0].clamp(max=0.1),))
    x = torch.randn(3, 4)
    gm = capture(model, (x,), name="hooked").gm
    with pytest.raises((AttributeError, pickle.PicklingError), match="local object"):
        pickle.dumps(PortableGraph.of(gm))
    again = _crossed(gm)
    torch.manual_seed(0)
    unhooked = _Plain()
    assert torch.equal(again(x), model(x)) and not torch.equal(again(x), unhooked(x))


def test_a_gradient_hook_on_a_parameter_crosses_to_a_worker_and_still_runs():
    """``weight.register_hook(...)``: torch pickles a tensor without its hooks, so a pipeline
    stage in another process trained on the unclipped gradient, silently."""

    torch.manual_seed(0)
    model = _Plain()
    model.lin.weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    x = torch.randn(3, 4)
    gm = capture(model, (x,), name="clipped").gm
    again = _crossed(gm)
    again(x).pow(2).sum().backward()
    model(x).pow(2).sum().backward()
    assert torch.equal(again.lin.weight.grad, model.lin.weight.grad)
    assert model.lin.weight.grad.abs().max() == pytest.approx(1e-3)
    assert isinstance(again.lin.weight, nn.Parameter) and again.lin.bias.grad is not None


def test_spectrally_and_weight_normalised_layers_cross_to_a_worker_and_train_the_same():
    """torch refuses to pickle a parametrized module ("Serialization of parametrized modules is
    only supported through state_dict()"): every pipeline and DDP of an SN-GAN discriminator
    failed to reach its workers. Three steps of the copy that crossed equal the original's,
    the power iteration's ``_u``/``_v`` buffers included."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm


    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(4, 8)), nn.LeakyReLU(0.2), weight_norm(nn.Linear(8, 1)))
    x = torch.randn(5, 4)
    gm = capture(model, (x,), name="sn").gm
    again = _crossed(gm)
    assert parametrize.is_parametrized(again.get_submodule("0"), "weight")
    assert parametrize.is_parametrized(again.get_submodule("2"), "weight")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (gm, again)]
    for _ in range(3):
        for m, opt in zip((gm, again), optimizers):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(gm.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(name.endswith("_u") for name in again.state_dict())


class _ClippedPair(nn.Module):
    """Two layers and their loss; the first layer's weight clips its gradient by a hook."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 1)
        self.first.weight.register_hook(lambda g: g.clamp(-1e-4, 1e-4))

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.second(torch.tanh(self.first(x))), y)


def test_a_pipeline_stage_in_another_process_trains_on_the_hooked_gradient():
    from envs.runtime.module_copy import deep_copy
    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline_layout import Pipeline
    from tests.helpers.runtime_models import stages_of

    torch.manual_seed(0)
    x, y = torch.randn(8, 8), torch.randn(8, 1)
    gm = capture(_ClippedPair(), (x, y), name="clipped").gm
    pipe = Pipeline(stages_of(gm, {"second"}), ("cpu:0", "cpu:1"), 1, "gpipe")
    run = run_training(gm, {"x": x, "y": y}, pipe, steps=1, optimizer=("sgd", {"lr": 0.1}), timeout_s=120)
    reference = deep_copy(gm)
    reference(x, y).backward()
    assert reference.first.weight.grad.abs().max() == pytest.approx(1e-4)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(run.grads[name], p.grad, rtol=1e-5, atol=1e-7)
