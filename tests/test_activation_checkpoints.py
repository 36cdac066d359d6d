"""Activation checkpointing that torch.fx traces through is said at capture, and a leaf keeps it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.utils.checkpoint as checkpointing
from torch import nn
from torch.utils.checkpoint import checkpoint

from graphs.capture import capture
from graphs.errors import CaptureError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return x + self.f(x)


class Checkpointed(nn.Module):
    """Calls checkpoint in its own forward: as a leaf module, the placed graph calls it whole."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


class Net(nn.Module):
    def __init__(self, reentrant: bool = False, wrapped: bool = False):
        super().__init__()
        self.reentrant, self.wrapped = reentrant, wrapped
        self.blocks = nn.ModuleList((Checkpointed() if wrapped else Block()) for _ in range(2))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if self.wrapped else checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(x)


def test_checkpointing_that_the_trace_drops_is_named_at_capture(caplog):
    generator, function = checkpointing._checkpoint_without_reentrant_generator, checkpointing.CheckpointFunction
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="graphs"):
        cap = capture(Net(), (torch.randn(4, 16),), name="net")
    assert cap.method == "fx"
    assert "net: forward() checkpoints activations (torch.utils.checkpoint, of 'blocks.0', 'blocks.1')" in caplog.text
    assert "keep every activation" in caplog.text
    assert not any(n.op == "call_module" and str(n.target).startswith("blocks.") and "." not in str(n.target)[7:]
                   for n in cap.gm.graph.nodes)  # the blocks' ops are plain nodes: nothing recomputes them
    # The patched entry points are put back, also after a trace that failed (the reentrant form).
    with pytest.raises(CaptureError):
        capture(Net(reentrant=True), (torch.randn(4, 16),), name="net")
    assert checkpointing._checkpoint_without_reentrant_generator is generator
    assert checkpointing.CheckpointFunction is function


def test_the_reentrant_form_is_refused_at_capture_naming_the_blocks_and_the_remedy():
    """Its no_grad region sends the capture to torch.export, whose graph carried no gradient: every
    placement failed the check after the search as 'the loss does not require grad'."""
    torch.manual_seed(0)
    with pytest.raises(CaptureError) as info:
        capture(Net(reentrant=True), (torch.randn(4, 16, requires_grad=True),), name="net")
    text = str(info.value)
    assert "forward() checkpoints 'blocks.0', 'blocks.1' with use_reentrant=True" in text
    assert "expected use_reentrant=False" in text and "\n" not in text


def test_checkpointing_inside_a_leaf_module_is_kept_and_not_warned_about(caplog):
    torch.manual_seed(0)
    model = Net(wrapped=True)
    x = torch.randn(4, 16, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="graphs"):
        cap = capture(model, (x,), leaf_modules=[Checkpointed], name="net")
    assert "checkpoints activations" not in caplog.text
    calls = [n.target for n in cap.gm.graph.nodes if n.op == "call_module"]
    assert calls[:2] == ["blocks.0", "blocks.1"]  # whole: their forward (and its checkpoint) runs
    assert torch.allclose(cap.gm(x), model(x))
