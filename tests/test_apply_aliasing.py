"""A placed model keeps what views and in-place writes share: the same numbers when transfers are real copies.

On a CPU-only machine the virtual devices map onto one CPU and a transfer returns the very
tensor it was given, so a copy made too early still sees a later in-place update. These
tests make every transfer a copy, as a move between two real devices is, so that a
placement that would read a stale copy on GPUs fails here too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import envs.runtime.transfers as transfers_module
from envs.runtime.apply import apply_placement
from graphs.capture import capture
from graphs.ops import in_place_writes
from graphs.tensor_tree import map_tensors

DEVICES = {"a": "cpu", "b": "cpu"}


@pytest.fixture(autouse=True)
def _transfers_copy(monkeypatch):
    """Every transfer gives the destination its own storage, as a move to another device does."""
    moved = transfers_module.to_device

    def copying(value, device, non_blocking=False):
        return map_tensors(torch.clone, moved(value, device, non_blocking))

    monkeypatch.setattr(transfers_module, "to_device", copying)


class _ViewsThenInPlace(nn.Module):
    """Views of an activation taken before an in-place update of it, read after."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        t = h.transpose(0, 1)
        n = h.narrow(1, 0, 4)
        h.mul_(2.0)
        return self.b(n) + t.sum()


class _WriteThroughAView(nn.Module):
    """A buffer updated through views of it (``buf[:2].add_``), and an activation written through a view."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)
        self.register_buffer("hist", torch.zeros(4))

    def forward(self, x):
        h = self.a(x)
        self.hist[:2].add_(1.0)
        self.hist[2:].add_(h.detach().mean())
        g = h + 0.5
        g[:, :4].mul_(3.0)
        return self.b(g) * self.hist.sum()


def _trains_alike(model: nn.Module, placed: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    reference = copy.deepcopy(model)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(placed.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        out_ref, out = reference(x), placed(x)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        opt_ref.zero_grad()
        opt.zero_grad()
        out_ref.square().mean().backward()
        out.square().mean().backward()
        opt_ref.step()
        opt.step()
    for (name, ref), (_, mine) in zip(reference.state_dict().items(), placed.state_dict().items()):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0, msg=name)


def _placed(model: nn.Module, x: torch.Tensor, on_b: set[str]) -> fx.GraphModule:
    cap = capture(model, (x,))
    assert cap.method == "fx"
    placement = {n.name: ("b" if n.name in on_b else "a") for n in cap.gm.graph.nodes}
    return apply_placement(cap, placement, real_devices=DEVICES)


def test_a_view_read_on_another_device_sees_the_in_place_update_of_its_base_made_after_it():
    torch.manual_seed(0)
    model, x = _ViewsThenInPlace(), torch.randn(6, 8)
    # the views stay with their tensor (grouping keeps them there); only their readers move
    _trains_alike(model, _placed(model, x, on_b={"b", "sum_1", "add"}), x)


def test_views_placed_apart_from_their_tensor_still_see_its_update():
    torch.manual_seed(0)
    model, x = _ViewsThenInPlace(), torch.randn(6, 8)
    _trains_alike(model, _placed(model, x, on_b={"transpose", "narrow", "b"}), x)


@pytest.mark.parametrize("on_b", [{"getitem", "getitem_1"}, {"add_", "add__1", "getitem_2", "mul_"},
                                  {"getitem_2", "b"}])
def test_a_write_through_a_view_reaches_the_tensor_it_views_wherever_the_view_is_placed(on_b):
    torch.manual_seed(0)
    model, x = _WriteThroughAView(), torch.randn(6, 8)
    _trains_alike(model, _placed(model, x, on_b=on_b), x)


def test_in_place_writes_follow_views_to_the_buffer_they_write():
    torch.manual_seed(0)
    cap = capture(_WriteThroughAView(), (torch.randn(6, 8),))
    written = {(writer.name, held.op, str(held.target)) for writer, held in in_place_writes(cap.gm)}
    assert ("add_", "get_attr", "hist") in written and ("add__1", "get_attr", "hist") in written


class _InputDerivative(nn.Module):
    """A physics-informed net: ``x.requires_grad_()`` on its input, then du/dx by autograd in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 16)
        self.b = nn.Linear(16, 1)

    def forward(self, x):
        x = x.requires_grad_(True)
        u = self.b(torch.tanh(self.a(x)))
        return torch.autograd.grad(u.sum(), x, create_graph=True)[0]


@pytest.mark.parametrize("on_b", [set(), {"a", "tanh"}, {"requires_grad_", "b", "grad"}])
def test_requires_grad_on_an_input_is_not_a_write_and_the_input_derivative_is_placed_anywhere(on_b):
    """Counted as an in-place write, the placed model copied its input back into the caller's,
    which the original's call had made a leaf requiring grad: 'a leaf Variable that requires
    grad is being used in an in-place operation'."""
    torch.manual_seed(0)
    model, x = _InputDerivative(), torch.rand(8, 2)
    cap = capture(model, (x,))
    assert not in_place_writes(cap.gm)
    _trains_alike(model, _placed(model, x, on_b=on_b), x)
