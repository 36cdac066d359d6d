"""The numerical check of an applied placement catches a placement that changes the model."""

import copy
import random

import pytest
import torch

from envs.runtime.check import check_placement
from graphs.capture import capture
from graphs.pipeline import load_source


def _module_aligned(captured, devices, seed=0):
    rnd = random.Random(seed)
    by_module, assignment = {}, {}
    for n, d in captured.graph.nodes(data=True):
        key = d.get("module") or n
        assignment[n] = by_module.setdefault(key, rnd.choice(devices))
    return assignment


@pytest.mark.parametrize("name", ["gpt2", "rnnlm"])
def test_a_random_placement_of_a_zoo_model_computes_the_same(name):
    spec = load_source(f"zoo:{name}")
    cap = capture(spec.model, spec.example_inputs, name=name)
    report = check_placement(spec, cap, _module_aligned(cap, ["a", "b", "c"]), real_devices={"a": "cpu", "b": "cpu", "c": "cpu"})
    assert report.ok, report.describe()
    assert report.compared_grads == sum(1 for p in spec.model.parameters() if p.requires_grad)


def test_a_changed_model_is_reported_as_different():
    spec = load_source("zoo:gpt2")
    cap = capture(spec.model, spec.example_inputs, name="gpt2")
    object.__setattr__(cap, "gm", copy.deepcopy(cap.gm))  # the gm shares weights with the model: unshare
    with torch.no_grad():  # other weights (a random change: a constant shift would cancel in LayerNorm)
        for p in cap.gm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
            break
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert not report.ok
    assert "DIFFERENT" in report.describe()


class _StatefulModel(torch.nn.Module):
    """An EMA and a step counter updated in place inside forward(), and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 3)
        self.register_buffer("ema", torch.zeros(6))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = self.norm(self.lin(x))
        self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        self.calls.add_(1)
        return self.out(h + self.ema)


def _stateful_spec():
    from graphs.model_file import ModelSpec

    torch.manual_seed(0)
    return ModelSpec(model=_StatefulModel(), example_inputs=(torch.randn(8, 6),), name="stateful")


def test_a_model_that_updates_buffers_in_forward_checks_the_same_over_several_steps():
    spec = _stateful_spec()
    cap = capture(spec.model, spec.example_inputs, name="stateful")
    devices = {"a": "cpu", "b": "cpu"}
    assignment = {n: ("a" if i % 2 else "b") for i, n in enumerate(cap.graph.nodes)}
    report = check_placement(spec, cap, assignment, real_devices=devices)
    assert report.ok, report.describe()
    assert report.steps == 3 and "over 3 training steps" in report.describe()
    # ema, calls, and BatchNorm's running_mean, running_var, num_batches_tracked
    assert report.compared_buffers == 5


def test_a_placed_model_that_loses_a_buffer_update_fails_the_check_from_the_second_step():
    spec = _stateful_spec()
    cap = capture(spec.model, spec.example_inputs, name="stateful")
    gm = copy.deepcopy(cap.gm)
    for node in list(gm.graph.nodes):  # what capture produced before buffers were proxied
        if node.op == "call_method" and node.target == "add_" and node.args[0].op == "get_attr":
            gm.graph.erase_node(node)
    gm.recompile()
    object.__setattr__(cap, "gm", gm)
    report = check_placement(spec, cap, {n.name: "cpu" for n in gm.graph.nodes if n.op != "output"})
    assert not report.ok
    assert report.first_bad_step == 1  # the counter differs after the first step already
    assert report.details["buffer:calls"] > report.tolerance
    assert "DIFFERENT" in report.describe() and "buffer:calls" in report.describe()


def test_the_check_leaves_the_users_model_and_random_state_unchanged():
    spec = _stateful_spec()
    cap = capture(spec.model, spec.example_inputs, name="stateful")
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert all(torch.equal(before[k], v) for k, v in spec.model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_the_check_pauses_the_garbage_collector_and_restores_it():
    import gc

    from graphs.gc_pause import paused_gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_failed_check_leaves_no_placement_json_only_the_best_so_far(tmp_path, monkeypatch):
    import envs.runtime.check as check_module
    import placer
    from graphs.errors import PlacerError

    real_apply = check_module.apply_placement

    def wrong_apply(*args, **kwargs):  # a placement that changes what the model computes
        placed = real_apply(*args, **kwargs)
        with torch.no_grad():
            next(placed.parameters()).add_(0.5)
        return placed

    monkeypatch.setattr(check_module, "apply_placement", wrong_apply)
    path = tmp_path / "tiny.py"
    path.write_text("import torch\n"
                    "def get_model():\n"
                    "    torch.manual_seed(0)\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n"
                    "def get_example_inputs():\n"
                    "    return (torch.randn(4, 8),)\n")
    out = tmp_path / "out"
    with pytest.raises(PlacerError, match="does not compute the same thing: DIFFERENT results over 3"):
        placer.optimize(str(path), cluster="4xK40", budget="50", out_dir=out, progress=False,
                        baselines=("single",), verbose=0)
    assert not (out / "placement.json").exists()
    assert (out / "best_placement.json").exists()


class _FunctionalDropout(torch.nn.Module):
    """Dropout as a function of self.training: a tracer bakes the mode into the graph."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return torch.nn.functional.dropout(self.norm(self.lin(x)), 0.5, self.training)


def test_a_model_handed_over_in_eval_mode_is_captured_and_checked_for_training():
    from graphs.model_file import ModelSpec

    torch.manual_seed(0)
    model = _FunctionalDropout().eval()  # as from_pretrained returns a model
    spec = ModelSpec(model=model, example_inputs=(torch.randn(6, 8),), name="dropout")
    cap = capture(model, spec.example_inputs, name="dropout")
    assert not model.training and not model.norm.training  # the user's modes are restored
    assert cap.training_modes[""] and cap.training_modes["norm"]
    assert any(n.kwargs.get("training") is True for n in cap.gm.graph.nodes)  # the tracer baked training=True
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok, report.describe()
    assert report.compared_buffers == 3  # BatchNorm's statistics, updated in training mode


def test_a_module_the_user_froze_stays_frozen_in_the_capture_and_the_check():
    from graphs.model_file import ModelSpec

    torch.manual_seed(0)
    model = _FunctionalDropout().train()
    model.norm.eval()  # fine-tuning with frozen BatchNorm statistics
    spec = ModelSpec(model=model, example_inputs=(torch.randn(6, 8),), name="frozen")
    cap = capture(model, spec.example_inputs, name="frozen")
    assert cap.training_modes["norm"] is False
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok, report.describe()


def test_parameters_the_loss_gives_no_gradient_are_named_not_silently_left_out():
    from graphs.model_file import ModelSpec, default_loss, default_optimizer

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.a(h), self.b(h)  # the default loss reads the first output only

    torch.manual_seed(0)
    model = TwoHeads()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(3, 4),), loss_fn=default_loss,
                     optimizer_fn=default_optimizer, name="two_heads")
    cap = capture(model, spec.example_inputs, name="two_heads")
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok and set(report.no_gradient) == {"b.weight", "b.bias"}
    assert "2 trainable parameters get no gradient from the loss on either side (e.g. 'b." in report.describe()


def test_the_check_sees_a_copy_that_misses_an_in_place_update_as_a_real_device_would(monkeypatch):
    """Virtual devices on the CPU: a transfer there returns the tensor itself, so a copy made too
    early still saw a later in-place update; the check's transfers copy, as real devices' do."""
    import envs.runtime.apply as apply_module

    spec = _stateful_spec()
    cap = capture(spec.model, spec.example_inputs, name="stateful")
    # the EMA updated on one device and read (by add) on the other
    assignment = {n: ("b" if n in ("add", "out") else "a") for n in cap.graph.nodes}
    devices = {"a": "cpu", "b": "cpu"}
    assert check_placement(spec, cap, assignment, real_devices=devices).ok
    # apply as it would be if it copied the EMA where it is read first, before its update
    monkeypatch.setattr(apply_module, "_updated_in_place", lambda gm: set())
    report = check_placement(spec, cap, assignment, real_devices=devices)
    assert not report.ok and report.output_diff > report.tolerance, report.describe()


class _DropsOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.drop = torch.nn.Dropout(0.5)
        self.b = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def test_the_check_knows_which_devices_draw_from_another_generator_than_the_model():
    from envs.runtime.check import _draws_elsewhere

    model = torch.nn.Linear(2, 2)  # on the CPU
    assert not _draws_elsewhere(model, {"n": "a", "m": "b"}, {"a": "cpu", "b": "cpu"})
    assert not _draws_elsewhere(model, {"n": "cpu"}, None)
    assert _draws_elsewhere(model, {"n": "gpu0", "m": "cpu"}, {"gpu0": "cuda:0", "cpu": "cpu"})
    assert _draws_elsewhere(model, {"n": "cuda:1"}, None)


def test_a_dropout_model_placed_on_a_device_with_its_own_generator_is_compared_with_dropout_off(monkeypatch):
    """On a GPU, dropout draws its masks from the GPU's generator, not the CPU's the original
    uses: every dropout model failed the check there. Emulated on the CPU: the placed side's
    generator is in another state (a draw before each forward), as a GPU's would be."""
    import envs.runtime.check as check_module
    from graphs.model_file import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(model=_DropsOut(), example_inputs=(torch.randn(8, 6),), name="drops")
    cap = capture(spec.model, spec.example_inputs, name="drops")
    applied = check_module.apply_placement

    def placed_on_its_own_generator(*args, **kwargs):
        placed = applied(*args, **kwargs)
        def another_state(module, inputs):
            torch.rand(1)

        placed.register_forward_pre_hook(another_state)
        return placed

    monkeypatch.setattr(check_module, "apply_placement", placed_on_its_own_generator)
    monkeypatch.setattr(check_module, "_draws_elsewhere", lambda *args: True, raising=False)
    report = check_placement(spec, cap, {n: "gpu0" for n in cap.graph.nodes}, real_devices={"gpu0": "cpu"})
    assert report.ok, report.describe()
    assert report.without_dropout and "compared with dropout off" in report.describe()
    # where every device draws from the original's generator, masks are compared number for number
    monkeypatch.setattr(check_module, "_draws_elsewhere", lambda *args: False)
    assert not check_placement(spec, cap, {n: "gpu0" for n in cap.graph.nodes}, real_devices={"gpu0": "cpu"}).ok
