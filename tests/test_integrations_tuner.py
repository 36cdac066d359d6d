"""PlacementTuner: switching placements mid-training keeps the trajectory of the untuned run."""

from __future__ import annotations

import copy

import pytest
import torch

from graphs.capture import capture
from graphs.errors import PlacerError
from placer.integrations.tuner import PlacementTuner, move_optimizer_state
from tests.helpers.eval_models import StochasticDepth
from tests.helpers.keyword_models import Masked

CLUSTER = "4xK40"  # cpu + gpu0..gpu3, all mapped to the CPU here (virtual devices)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.BatchNorm1d(32),
        torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4),
    )


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]


def _candidates(model: torch.nn.Module, x: torch.Tensor) -> list[dict[str, str]]:
    """Three different placements: all on gpu0, split in halves, round robin over four devices."""
    nodes = [n for n in capture(model, (x,)).graph.nodes]
    half = len(nodes) // 2
    return [
        {n: "gpu0" for n in nodes},
        {n: ("gpu1" if i < half else "gpu2") for i, n in enumerate(nodes)},
        {n: f"gpu{i % 4}" for i, n in enumerate(nodes)},
    ]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["sgd_momentum", "adam"])
def test_tuner_switches_and_matches_untuned_run(make_opt):
    data = _data(10)
    model = _model()
    reference = copy.deepcopy(model)
    tuner = PlacementTuner(model, (data[0][0],), cluster=CLUSTER, trials=6,
                           candidates=_candidates(model, data[0][0]), steps_per_candidate=2)
    opt = make_opt(tuner.model.parameters())
    ref_opt = make_opt(reference.parameters())
    seen, losses, ref_losses = set(), [], []
    for x, y in data:
        seen.add(tuner.current)
        losses.append(float(tuner.step(lambda m: _loss(m(x), y), opt)))
        ref_opt.zero_grad()
        ref_loss = _loss(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(float(ref_loss.detach()))
    assert tuner.switches >= 2 and seen == {0, 1, 2}
    assert tuner.settled and tuner.best is not None
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    params = dict(tuner.model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6)
    for name, b in reference.named_buffers():  # BatchNorm running statistics too
        torch.testing.assert_close(tuner.model.get_buffer(name), b, rtol=1e-5, atol=1e-6)
    # The optimizer kept one state per parameter (momentum buffers / Adam moments were moved, not rebuilt).
    assert len(opt.state) == len(list(reference.parameters()))
    report = tuner.report()
    assert sum(r["steps"] for r in report.rows()) == 6  # the tuning steps, each a real training step
    assert "<- chosen" in str(report)


def test_switch_keeps_parameter_objects_and_moves_placement():
    x = _data(1)[0][0]
    model = _model()
    tuner = PlacementTuner(model, (x,), cluster=CLUSTER, trials=2, candidates=_candidates(model, x),
                           steps_per_candidate=1)
    before = [id(p) for p in tuner.model.parameters()]
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        tuner.step(lambda m: m(x).sum(), opt)
    assert [id(p) for p in tuner.model.parameters()] == before
    # The graph in use is the current candidate's (the output is gathered on the cluster's first device).
    placed = tuner.model.placer_placement
    assert all(placed[n] == d for n, d in tuner.placement.items() if n in placed and n != "output")
    assert placed["output"] == "cpu"


def test_timed_context_manager_is_the_same_step():
    data = _data(4)
    model = _model()
    reference = copy.deepcopy(model)
    tuner = PlacementTuner(model, (data[0][0],), cluster=CLUSTER, trials=4,
                           candidates=_candidates(model, data[0][0]), steps_per_candidate=1)
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.1, momentum=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.5)
    for x, y in data:
        with tuner.timed(opt) as m:
            opt.zero_grad()
            _loss(m(x), y).backward()
            opt.step()
        ref_opt.zero_grad()
        _loss(reference(x), y).backward()
        ref_opt.step()
    assert tuner.switches >= 2
    for (name, p), q in zip(tuner.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_move_optimizer_state_follows_parameters():
    # A parameter on another device than its state (meta stands in for an accelerator here).
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = torch.optim.Adam([p], lr=0.1)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    assert move_optimizer_state(opt) == 2
    state = opt.state[p]
    assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
    assert state["step"].device.type == "cpu"  # the scalar step stays where non-capturable Adam wants it
    assert move_optimizer_state(opt) == 0  # nothing left to move


def test_bad_arguments_are_clear():
    x = _data(1)[0][0]
    model = _model()
    with pytest.raises(PlacerError, match="trials"):
        PlacementTuner(model, (x,), cluster=CLUSTER, trials=0, candidates=[{}])
    with pytest.raises(PlacerError, match="expected a"):
        PlacementTuner(model, (x,), cluster=CLUSTER, candidates=["gpu0"])
    with pytest.raises(PlacerError, match="uses devices"):
        PlacementTuner(model, (x,), cluster=CLUSTER, candidates=[{n: "tpu9" for n in _candidates(model, x)[0]}])
    with pytest.raises(PlacerError, match="nn.Module"):
        PlacementTuner("model.py", (x,), cluster=CLUSTER)
    tuner = PlacementTuner(model, (x,), cluster=CLUSTER, candidates=_candidates(model, x)[:1])
    with pytest.raises(PlacerError, match="begin_step"):
        tuner.end_step()


@pytest.mark.parametrize("times, margin, expected", [
    ([[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [1.0, 0.8, 0.8]], 0.05, 1),  # clearly faster: the measured best
    ([[1.0, 1.0, 1.0], [1.0, 0.98, 0.98], [1.0, 1.2, 1.2]], 0.05, 0),  # within the margin: the simulator's pick
    ([[1.0, 1.0, 1.0], [1.0, 0.98, 0.98], [1.0, 1.2, 1.2]], 0.0, 1),
    # 10% faster by the medians, but within what its own steps vary by: the simulator's pick
    ([[1.0, 1.0, 1.1, 0.9], [1.0, 0.9, 1.15, 0.8], [1.0, 1.2, 1.2, 1.2]], 0.05, 0),
    ([[1.0, 1.0, 1.01, 0.99], [1.0, 0.9, 0.91, 0.89], [1.0, 1.2, 1.2, 1.2]], 0.05, 1),
])
def test_settles_on_the_measured_fastest_beyond_the_margin_and_the_noise(times, margin, expected):
    x = _data(1)[0][0]
    model = _model()
    tuner = PlacementTuner(model, (x,), cluster=CLUSTER, candidates=_candidates(model, x), margin=margin)
    for c, t in zip(tuner.candidates, times):
        c.times = list(t)  # the first of each is the warm-up step and not counted
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.1, momentum=0.9)
    assert tuner.finish(opt) == expected and tuner.current == expected and tuner.settled


def test_out_of_memory_candidate_is_dropped_and_the_step_rerun():
    data = _data(8)
    model = _model()
    reference = copy.deepcopy(model)
    tuner = PlacementTuner(model, (data[0][0],), cluster=CLUSTER, trials=6,
                           candidates=_candidates(model, data[0][0]), steps_per_candidate=2)
    opt = torch.optim.Adam(tuner.model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)

    def closure(m, x, y):
        out = m(x)  # BatchNorm statistics are updated before the failure: they must be restored
        if tuner.current == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test)")
        return _loss(out, y)

    for x, y in data:
        tuner.step(lambda m: closure(m, x, y), opt)
        ref_opt.zero_grad()
        _loss(reference(x), y).backward()
        ref_opt.step()
    assert tuner.candidates[1].failed == "out of memory" and tuner.best != 1
    assert "failed: out of memory" in str(tuner.report())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(tuner.model.get_parameter(name), p, rtol=1e-5, atol=1e-6)
    for name, b in reference.named_buffers():
        torch.testing.assert_close(tuner.model.get_buffer(name), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rounds, expected", [
    (1, [0, 0, 1, 1, 2, 2]),   # one block per candidate
    (2, [0, 1, 2, 0, 1, 2]),   # interleaved turns spread drift over all candidates
])
def test_schedule_of_turns(rounds, expected):
    data = _data(6)
    model = _model()
    tuner = PlacementTuner(model, (data[0][0],), cluster=CLUSTER, trials=6, rounds=rounds,
                           candidates=_candidates(model, data[0][0]), steps_per_candidate=2)
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.1)
    used = []
    for x, y in data:
        tuner.begin_step(opt)
        used.append(tuner.current)
        opt.zero_grad()
        _loss(tuner.model(x), y).backward()
        opt.step()
        tuner.end_step()
    assert used == expected
    assert tuner.settled and all(len(c.times) == 2 for c in tuner.candidates)


@pytest.mark.slow
def test_proposed_candidates_are_distinct_and_ranked_by_simulation():
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(32, 128), torch.nn.ReLU()]
    for _ in range(4):
        layers += [torch.nn.Linear(128, 128), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(128, 10))
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    tuner = PlacementTuner(model, (x,), cluster=CLUSTER, trials=8, candidates=4, budget="300")
    sims = [c.simulated for c in tuner.candidates]
    assert 2 <= len(sims) <= 4 and sims == sorted(sims)
    assert len({tuple(sorted(c.assignment.items())) for c in tuner.candidates}) == len(sims)
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        tuner.step(lambda m: _loss(m(x), y), opt)
    assert tuner.settled and tuner.switches >= 1


def test_the_report_says_worker_process_devices_were_measured_in_this_one_process():
    """Over cpu:0,cpu:1 the tuner measured in its own process and called them 'real devices'."""
    from placer.integrations.tuner import TunerReport

    report = TunerReport([], None, 0, 0, False, 1, False, "ranks(cpu:0,cpu:1)", False, rank_devices=True)
    assert "(worker-process devices, measured in this one process on the cores they share)" in str(report)
    assert "(real devices)" in str(TunerReport([], None, 0, 0, False, 1, False, "cpu,cuda:0", False))


def test_a_given_candidate_that_splits_a_tied_weight_is_refused_before_training():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.emb(ids)))

    model, ids = Tied(), torch.randint(0, 20, (4, 5))
    # Named a leaf, the head stays a module holding the embedding's tensor (traced through
    # otherwise, graphs.tied_layers, and then it reads the weight over a copy).
    nodes = list(capture(model, (ids,), leaf_modules=["head"]).graph.nodes)
    split = {n: ("gpu1" if n == "head" else "gpu0") for n in nodes}
    # Found when the tuner switched to it, mid-training, with the model half moved.
    with pytest.raises(PlacerError, match="candidate 'given 1' cannot be applied: .*'head'.*'emb'"):
        PlacementTuner(model, (ids,), cluster=CLUSTER, trials=4, candidates=[{n: "gpu0" for n in nodes}, split],
                       leaf_modules=["head"])


def test_a_tuned_model_whose_eval_mode_takes_another_branch_evaluates_as_the_original():
    torch.manual_seed(0)
    model, x = StochasticDepth(), torch.randn(16, 8)
    nodes = list(capture(model, (x,)).graph.nodes)
    tuner = PlacementTuner(model, (x,), cluster=CLUSTER, trials=2, steps_per_candidate=1,
                           candidates=[{n: "gpu0" for n in nodes}, {n: f"gpu{i % 4}" for i, n in enumerate(nodes)}])
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.1)
    for _ in range(3):
        tuner.step(lambda m: m(x).sum(), opt)
    assert tuner.switches >= 1
    reference = StochasticDepth()
    reference.load_state_dict(tuner.model.state_dict())
    tuner.model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(tuner.model(x), reference(x), rtol=0, atol=0)


def test_the_tuner_takes_a_batch_given_as_a_dict_and_its_model_takes_the_same_dict():
    torch.manual_seed(0)
    model = Masked()
    batch = {"mask": torch.ones(4, 16), "x": torch.randn(4, 8)}
    nodes = list(capture(model, (batch["x"], None, batch["mask"])).graph.nodes)
    tuner = PlacementTuner(model, batch, cluster=CLUSTER, trials=2, steps_per_candidate=1,
                           candidates=[{n: "gpu0" for n in nodes}, {n: f"gpu{i % 2}" for i, n in enumerate(nodes)}])
    torch.testing.assert_close(tuner.model(**batch), model(**batch), rtol=0, atol=1e-6, check_device=False)
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.1)
    for _ in range(2):  # the job's own steps, over both candidates
        tuner.step(lambda m: m(**batch).square().mean(), opt)
    assert tuner.steps == 2 and tuner.switches == 1


def test_the_tuner_takes_the_batch_dimension_of_sequence_first_inputs_and_refuses_one_they_lack():
    torch.manual_seed(0)
    model, x = torch.nn.GRU(8, 8), torch.randn(5, 3, 8)  # (time, batch, features)
    tuner = PlacementTuner(model, (x,), cluster=CLUSTER, trials=2, candidates=2, budget="100", batch_dim=1)
    torch.testing.assert_close(tuner.model(x)[0], model(x)[0], check_device=False)
    with pytest.raises(PlacerError, match=r"batch_dim is 3, but the first input tensor has shape \(5, 3, 8\)"):
        PlacementTuner(model, (x,), cluster=CLUSTER, trials=2, candidates=2, budget="100", batch_dim=3)


def test_the_tuner_takes_a_batch_that_ends_with_the_losss_targets_as_place_does():
    torch.manual_seed(0)
    model = _model()
    x, y = _data(1)[0]
    tuner = PlacementTuner(model, (x, y), cluster=CLUSTER, trials=4, candidates=2, budget="200",
                           loss_fn=lambda out, x, y: _loss(out, y))
    opt = torch.optim.SGD(tuner.model.parameters(), lr=0.05)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(3):
        loss = tuner.step(lambda m: _loss(m(x), y), opt)
        ref_opt.zero_grad()
        ref_loss = _loss(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss)
