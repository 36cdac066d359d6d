"""A forward hook that keeps an activation on the model for forward() to read back (deep
supervision): captured with the read as the activation it is, no fake tensor left on the model,
and the numerical check's copy of the model writing its own activations."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from envs.runtime.module_copy import deep_copy
from graphs.capture import capture
from graphs.loss_targets import accepting_targets
from graphs.stale_state import refusing_stale_state


class DeepSupervision(nn.Module):
    """An auxiliary head reads the activation a hook on ``body[1]`` stored in ``self.features``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.aux = nn.Linear(16, 3)
        self.head = nn.Linear(16, 3)
        self.features: dict[str, torch.Tensor] = {}
        self.body[1].register_forward_hook(lambda m, i, o: self.features.__setitem__("mid", o))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), self.aux(self.features["mid"])


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 3, targets: tuple = ()) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        main, aux = model(x, *targets)
        (main.pow(2).mean() + aux.pow(2).mean()).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_hook_kept_activation_is_read_from_the_graph_not_baked_as_a_constant():
    """torch.fx runs no hook of a layer it keeps as a call: its graph read the activation an
    earlier call left (``_tensor_constant0``), so the auxiliary head trained on one stale input
    and no gradient reached the body through it. The capture goes to torch.export, which runs
    the hook and records the read."""
    torch.manual_seed(0)
    model = DeepSupervision()
    x = torch.randn(4, 8)
    model(x)  # an earlier call leaves an activation behind, as a trial forward does
    cap = capture(model, (x,), name="deep_supervision")
    assert cap.method == "export"
    assert not [n for n in cap.gm.graph.nodes if n.op == "get_attr" and "constant" in str(n.target)]
    assert not isinstance(model.features["mid"], FakeTensor)  # the tracers' fake runs left nothing behind
    reference = deep_copy(model)
    placed = cap.gm
    for a, b in zip(_trained(reference, x), _trained(placed, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_model_never_called_is_captured_the_same_through_its_loss_targets_view():
    """A rank worker builds the model from its file and captures it without an earlier call
    (and on meta): the hook's dict is empty, torch.fx fails on the missing key, and torch.export
    used to fail too, because the hook reads ``self.features`` through the model while the
    capture saw its loss-targets view, another object over the same ``__dict__`` (every
    un-pipelined placement over ranks ran invalid). Now the graph is the one captured after a
    call, and the dict is left as it was: empty."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    fresh = DeepSupervision()
    called = deep_copy(fresh)
    called(x)
    never = capture(accepting_targets(fresh, 2), (x, y), name="deep_supervision")
    after_call = capture(accepting_targets(called, 2), (x, y), name="deep_supervision")
    assert never.method == "export"
    assert never.fingerprint == after_call.fingerprint
    assert fresh.features == {}
    for a, b in zip(_trained(called, x), _trained(never.gm, x, targets=(y,))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_tensor_attribute_forward_never_writes_stays_a_constant():
    """A mask kept as a plain tensor attribute is read, never written: fx keeps it as a constant."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.mask = torch.tril(torch.ones(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.mask[0]

    cap = capture(Masked(), (torch.randn(2, 4),), name="masked")
    assert cap.method == "fx"


def test_the_watch_puts_back_what_the_first_run_wrote_and_names_the_stale_read():
    model = DeepSupervision()
    x = torch.randn(4, 8)
    model(x)
    kept = model.features["mid"]
    gm = torch.fx.symbolic_trace(model)
    try:
        with refusing_stale_state(gm, model):
            gm(x)
    except Exception as exc:
        assert "features['mid']" in str(exc) and "read by aux" in str(exc)
    else:
        raise AssertionError("the stale read was not named")
    assert model.features["mid"] is kept


def test_a_copy_of_the_model_runs_hooks_that_write_into_the_copy():
    """``copy.deepcopy`` copies a hook closure by reference: the copy's hook wrote into the
    original's ``features`` and the copy's forward read a stale activation (the numerical check
    called a right placement different, gradients 1.9e-02 apart)."""
    torch.manual_seed(0)
    model = DeepSupervision()
    x = torch.randn(4, 8)
    model(x)
    twin = deep_copy(model)
    before = model.features["mid"]
    twin(x * 2)
    assert model.features["mid"] is before
    torch.testing.assert_close(twin.features["mid"], twin.body[1](twin.body[0](x * 2)))
