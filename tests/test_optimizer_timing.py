"""The optimizer's share of a step: per parameter-owning node, the model's own optimizer, copies only."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from graphs.capture import capture
from graphs.profile.optimizer_timing import (
    InSituOptimizerTimer,
    node_parameters,
    optimizer_key,
    optimizer_kind,
    optimizer_times,
)
from graphs.profile.profiler import profile_graph


class Shared(nn.Module):
    """A linear layer called twice, a batch norm (buffers) and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(self.norm(self.lin(self.lin(x)))))


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def test_parameters_belong_to_their_first_user_and_only_trainable_ones_count():
    gm = fx.symbolic_trace(Shared())
    owned = node_parameters(gm)
    assert set(owned) == {"lin", "norm", "head"}  # lin_1 reuses lin's; frozen trains nothing
    assert [tuple(p.shape) for p in owned["lin"]] == [(8, 8), (8,)]
    assert len(owned["norm"]) == 2  # weight and bias, not the running statistics


def test_optimizer_times_time_copies_and_leave_the_model_untouched():
    model = Shared()
    gm = fx.symbolic_trace(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = optimizer_times(gm, _adam, torch.device("cpu"), repeats=3)
    assert set(times.per_node) == {"lin", "norm", "head"}
    assert all(t > 0 for t in times.per_node.values())
    assert times.kind == "adam" and times.whole > 0 and times.fixed >= 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_kind_and_key_tell_optimizers_apart():
    assert optimizer_kind(_adam) == "adam"
    assert optimizer_kind(lambda p: torch.optim.SGD(p, lr=0.1)) == "sgd"
    assert optimizer_kind(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) == "sgd_momentum"
    assert optimizer_key(lambda p: torch.optim.SGD(p, lr=0.1)) != optimizer_key(lambda p: torch.optim.SGD(p, lr=0.2))


def test_a_node_whose_update_fails_is_reported_and_left_without_opt_time(tmp_path):
    class PickyOptimizer(torch.optim.SGD):
        """Refuses the head's parameters (a 2x8 weight and its bias) when given them alone."""

        def __init__(self, params, lr=0.1):
            params = list(params)
            if len(params) == 2 and params[0].dim() == 2 and params[0].shape[0] == 2:
                raise ValueError("no head here")
            super().__init__(params, lr=lr)

    model = Shared()
    cap = capture(model, (torch.randn(4, 8),), name="shared")
    with pytest.warns(UserWarning, match="optimizer step not timed"):
        profile_graph(cap, (torch.randn(4, 8),), devices=["cpu"], repeats=2, cache_dir=tmp_path,
                      optimizer_fn=PickyOptimizer)
    nodes = cap.graph.nodes
    assert "cpu" not in nodes["head"]["opt_time"]
    assert nodes["lin"]["opt_time"]["cpu"] > 0 and nodes["lin_1"]["opt_time"]["cpu"] == 0.0
    assert cap.graph.graph["optimizer"] == "pickyoptimizer"
    assert any("head" in f for f in cap.graph.graph["profile_info"]["cpu"]["failures"])


def test_profiles_with_different_optimizers_are_cached_apart(tmp_path):
    model = Shared()
    inputs = (torch.randn(4, 8),)
    cap = capture(model, inputs, name="shared")
    profile_graph(cap, inputs, devices=["cpu"], repeats=2, cache_dir=tmp_path)
    assert cap.graph.graph["optimizer"] == "sgd"  # the model-file default
    profile_graph(cap, inputs, devices=["cpu"], repeats=2, cache_dir=tmp_path, optimizer_fn=_adam)
    assert cap.graph.graph["optimizer"] == "adam"
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert cap.graph.graph["profile_info"]["cpu"]["cached"] is False


def test_in_situ_profiling_times_updates_after_real_backwards_and_trains_nothing(tmp_path):
    model = Shared()
    inputs = (torch.randn(4, 8),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cap = capture(model, inputs, name="shared")
    profile_graph(cap, inputs, devices=["cpu"], repeats=3, cache_dir=tmp_path, optimizer_fn=_adam)
    info = cap.graph.graph["profile_info"]["cpu"]
    assert info["method"] == "in_situ" and info["optimizer_whole"] > 0
    assert {n for n, d in cap.graph.nodes(data=True) if d["opt_time"]["cpu"] > 0} == {"lin", "norm", "head"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("optimizer_fn", [_adam, lambda p: torch.optim.Adagrad(p, lr=0.2)],
                         ids=["adam (lazy state)", "adagrad (state built eagerly)"])
def test_in_situ_whole_step_shares_the_node_optimizers_state(optimizer_fn):
    # One state per parameter, as in a training step: the whole step and the node steps
    # must touch the same moments, not two copies each touched every other run.
    gm = fx.symbolic_trace(Shared())
    timer = InSituOptimizerTimer(optimizer_fn, torch.device("cpu"))
    gm(torch.randn(4, 8)).sum().backward()
    timer.after_backward(gm, True, True)
    timer.after_backward(gm, False, True)
    timer.restore()
    assert timer.whole is not None and set(timer.nodes) == {"lin", "norm", "head"}
    for name, optimizer in timer.nodes.items():
        for p in timer.owned[name]:
            assert timer.whole.state[p] is optimizer.state[p]
            assert optimizer.state[p], f"{name}: no state after the steps"
    assert {"lin", "norm", "head", "(whole)"} <= set(timer.samples)


def test_every_in_situ_run_computes_with_the_models_own_weights_not_the_timed_steps():
    """The timed optimizer steps were undone only at the end: up to 60 of them on the profile's
    gradient of ones saturated a bidirectional LSTM's gates into denormal floats, and its
    profile read 50 + 345 ms for what a training step runs in 53."""
    gm = fx.symbolic_trace(Shared())
    before = {k: v.clone() for k, v in gm.named_parameters()}
    timer = InSituOptimizerTimer(lambda p: torch.optim.SGD(p, lr=1.0), torch.device("cpu"))
    for timed_run in (True, False, True):
        gm(torch.randn(4, 8)).sum().backward()
        timer.after_backward(gm, timed_run, True)
        for name, value in gm.named_parameters():
            assert torch.equal(value, before[name]), name
    assert {"lin", "head", "(whole)"} <= set(timer.samples)
