"""A loss that differentiates through the model is found at capture, and the model then stays whole
wherever a process boundary would cut the autograd graph behind its output (graphs.loss_reach)."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

from graphs.capture import capture
from graphs.grouping import group_graph
from graphs.loss_reach import loss_differentiates_through_model
from graphs.model_file import with_loss_targets
from graphs.placement_graph import differentiated_runs


def _critic() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _gradient_penalty(out: torch.Tensor, x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (out * sign).mean() + 10 * ((g.norm(dim=1) - 1) ** 2).mean()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(6, 4, requires_grad=True), torch.randn(6, 1).sign()


class _CriticWithFeatures(nn.Module):
    """Returns its hidden features too; the loss penalises the output's gradient by them."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.head(h), h


def _penalty_by_features(out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    score, h = out
    (g,) = torch.autograd.grad(score.sum(), h, create_graph=True)
    return score.mean() + g.pow(2).mean()


def test_a_gradient_penalty_by_the_input_differentiates_through_the_model():
    gm = fx.symbolic_trace(_critic())
    x, sign = _inputs()
    assert loss_differentiates_through_model(gm, (x,), lambda out, x: _gradient_penalty(out, x, sign))


def test_a_gradient_penalty_by_an_activation_the_model_returns_differentiates_through_it():
    """The cut hands each output tensor over as a leaf of its own, so the gradient of the score by
    the features it was computed from is unreachable there."""
    gm = fx.symbolic_trace(_CriticWithFeatures())
    x, _ = _inputs()
    assert loss_differentiates_through_model(gm, (x,), _penalty_by_features)


def test_a_loss_of_the_output_alone_does_not():
    gm = fx.symbolic_trace(_critic())
    x, sign = _inputs()
    assert not loss_differentiates_through_model(gm, (x,), lambda out, x: ((out - sign) ** 2).mean())


def test_a_loss_that_fails_on_the_whole_output_is_not_taken_for_one_that_differentiates():
    """That failure is the training step's to report, not a reason to keep the model whole."""
    gm = fx.symbolic_trace(_critic())
    x, _ = _inputs()

    def broken(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(out.sum(), torch.ones(3, requires_grad=True))
        return g.sum()

    assert not loss_differentiates_through_model(gm, (x,), broken)


def test_asking_on_real_tensors_leaves_the_model_and_the_random_state_as_they_were(caplog):
    """Fake tensors first; a model with an op fake tensors cannot run (a boolean mask's
    data-dependent size) runs on real tensors, and its buffers (batch norm statistics) and the
    random state are put back."""

    class NoFake(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.lin = nn.BatchNorm1d(4), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.dropout(self.norm(x), 0.5)
            return self.lin(h[h.sum(1) > -1e9])

    model = NoFake().train()
    gm = fx.symbolic_trace(model)
    x, sign = _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="graphs.loss_reach"):
        assert loss_differentiates_through_model(gm, (x,), lambda out, x: _gradient_penalty(out, x, sign))
    assert "asking on real tensors" in caplog.text
    assert torch.equal(torch.rand(3), expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_capture_keeps_a_model_whose_loss_differentiates_through_it_in_one_group():
    """The whole graph, the loss's target input included, is the output's differentiated run, so the
    grouping makes one group: no placement over worker processes splits it and no pipeline stage
    holds a target alone (a WGAN-GP critic over cpu:0,cpu:1 measured 10 of 16 placements and 4 of
    4 pipelines that could not run)."""
    x, sign = _inputs()
    captured = capture(with_loss_targets(_critic(), (x, sign), True, "test"), (x, sign), loss_fn=_gradient_penalty)
    graph = captured.graph
    [run] = differentiated_runs(graph)
    assert run == list(graph.nodes)
    grouping = group_graph(graph, max_groups=8)
    assert len(set(grouping.op_to_group.values())) == 1


def test_the_capture_leaves_a_model_with_a_plain_loss_free_to_split():
    x, sign = _inputs()
    captured = capture(with_loss_targets(_critic(), (x, sign), True, "test"), (x, sign),
                       loss_fn=lambda out, x, sign: ((out - sign) ** 2).mean())
    assert differentiated_runs(captured.graph) == []
    grouping = group_graph(captured.graph, max_groups=8)
    assert len(set(grouping.op_to_group.values())) > 1
