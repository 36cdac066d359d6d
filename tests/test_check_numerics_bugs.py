"""The numerical check from the user walkthrough: models that cannot be trained are refused
before the search, NaN the original model computes itself is not a placement's difference,
and a pipeline's micro-batches and replicas are checked for what splitting the batch changes."""

from __future__ import annotations

import copy
import json
import struct
import textwrap
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from envs.runtime.apply import apply_placement
from envs.runtime.check import check_batch_split, check_placement
from envs.runtime.tensor_diff import _finite_scaled_diff, _masked_scaled_diff, _scaled_diff
from envs.sim.pipeline_layout import Pipeline
from graphs.capture import capture
from graphs.errors import ModelFileError, PlacerError
from graphs.input_batch import batch_slice
from graphs.model_file import ModelSpec
from tests.helpers.placements import alternating_placement


def _model_file(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text("import torch\nfrom torch import nn\n" + textwrap.dedent(body))
    return path


def _optimize_cli(model_file, out, *extra: str) -> int:
    from placer.cli.main import main

    return main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "100", "--baselines", "single",
                 "--out", str(out), "-q", *extra])


@pytest.fixture
def no_search(monkeypatch):
    """Fails the test if the run gets as far as the baselines (the first stage after preparation)."""
    import placer.optimizing.stages as stages

    def reached(*_args, **_kwargs):
        raise AssertionError("the run reached the baselines: the model was not refused in preparation")

    monkeypatch.setattr(stages, "run_baselines", reached)


# ----------------------------------------------------------------------------- bug 1: nothing to train

UNTRAINABLE = {
    "noparams": ("""
        class M(nn.Module):
            def forward(self, x):
                return torch.relu(x) * 2
        model = M()
        example_inputs = (torch.randn(3, 4),)
        """, "model 'noparams' has nothing to train: it has no parameters"),
    "frozen": ("""
        model = nn.Linear(4, 2).requires_grad_(False)
        example_inputs = (torch.randn(3, 4),)
        """, "model 'frozen' has nothing to train: its 2 parameter tensors are frozen"),
    "intout": ("""
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(4, 2)
            def forward(self, x):
                return self.l(x).argmax(-1)
        model = M()
        example_inputs = (torch.randn(3, 4),)
        """, "the loss of model 'intout' does not require grad: its output has dtype int64"),
}


@pytest.mark.parametrize("name", sorted(UNTRAINABLE))
def test_a_model_with_nothing_to_train_is_refused_in_preparation_in_one_line_with_exit_2(
        tmp_path, capsys, no_search, name):
    body, said = UNTRAINABLE[name]
    out = tmp_path / "out"
    code = _optimize_cli(_model_file(tmp_path, name, body), out)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {said}") and "Traceback" not in err
    assert "expected a model with trainable parameters whose loss depends on them" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written, not even the best so far


def test_check_placement_refuses_a_model_without_parameters_with_a_model_error_not_the_optimizers():
    model = nn.ReLU()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(3, 4),), name="relu")
    cap = capture(model, spec.example_inputs, name="relu")
    with pytest.raises(ModelFileError, match="model 'relu' has nothing to train"):
        check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})


# ----------------------------------------------------------------------------- bug 2: NaN on both sides


def test_nan_in_the_same_places_on_both_sides_is_no_difference_and_on_one_side_is():
    nan, inf = float("nan"), float("inf")
    assert _scaled_diff(torch.tensor([1.0, nan, inf]), torch.tensor([1.0, nan, inf])) == 0.0
    assert _scaled_diff(torch.tensor([1.0, nan]), torch.tensor([nan, 1.0])) == inf
    assert _scaled_diff(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])) == inf
    assert _scaled_diff(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0])) == inf
    # An infinity elsewhere does not hide a finite difference by inflating the scale.
    assert _scaled_diff(torch.tensor([inf, 1.5]), torch.tensor([inf, 1.0])) == pytest.approx(0.25)


def test_sparse_gradients_are_compared_dense_and_complex_values_on_both_parts():
    """nn.Embedding(sparse=True)'s gradient had no torch.equal (a traceback after the search);
    complex values were cast to real, so an imaginary difference passed unseen."""
    dense = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert _scaled_diff(dense.to_sparse(), dense) == 0.0
    assert _scaled_diff(dense.to_sparse(), dense + 0.5) == pytest.approx(0.5 / 3.5)  # scale 1 + max |b|
    z = torch.tensor([1 + 1j, 2 - 1j])
    assert _scaled_diff(z, z.clone()) == 0.0
    assert _scaled_diff(z, torch.tensor([1 + 2j, 2 - 1j])) > 0.1


class _MetaTemplateEnsemble(nn.Module):
    """PyTorch's model-ensembling recipe: the members' parameters stacked, vmap over
    functional_call of a template module kept on meta (it has no data of its own)."""

    def __init__(self, members: int = 3) -> None:
        super().__init__()
        from torch.func import stack_module_state

        nets = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(members)]
        stacked, _ = stack_module_state(nets)
        self.names = list(stacked)
        self.stacked = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v) for k, v in stacked.items()})
        self.base = copy.deepcopy(nets[0]).to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        params = {n: self.stacked[n.replace(".", "_")] for n in self.names}
        return vmap(lambda p, x: functional_call(self.base, p, (x,)), in_dims=(0, None))(params, x).mean(0)


def test_a_template_module_on_meta_stays_there_and_its_tensors_compare_by_shape():
    """Its placement was applied by moving every tensor the graph reads, meta ones too: "Cannot
    copy out of meta tensor; no data!", a traceback after the whole search."""
    torch.manual_seed(0)
    model = _MetaTemplateEnsemble()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(6, 4),), name="ensemble",
                     loss_fn=lambda out, *_: out.pow(2).mean())
    cap = capture(model, spec.example_inputs, name="ensemble")
    report = check_placement(spec, cap, alternating_placement(cap.graph, ("cpu", "cpu")))
    assert report.ok and report.output_diff == 0.0, report.describe()
    assert all(p.is_meta for p in model.base.parameters())
    meta = torch.empty(3, 2, device="meta")
    assert _scaled_diff(meta, torch.empty(3, 2, device="meta")) == 0.0
    assert _scaled_diff(meta, torch.empty(2, 3, device="meta")) == float("inf")
    assert _scaled_diff(meta, torch.zeros(3, 2)) == float("inf")


def test_a_placed_model_reproducing_the_originals_nan_outputs_checks_the_same():
    class HalfNaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.sqrt(self.lin(x))  # NaN where the linear output is negative

    torch.manual_seed(0)
    model = HalfNaN()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(8, 4),), name="halfnan",
                     loss_fn=lambda out, *_: torch.nan_to_num(out).mean())
    cap = capture(model, spec.example_inputs, name="halfnan")
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert bool(model(*spec.example_inputs).isnan().any())  # the case this test is about
    assert report.ok and report.output_diff == 0.0, report.describe()
    assert not report.original_nonfinite


def test_a_model_whose_own_loss_is_nan_is_refused_up_front_and_the_placement_is_not_blamed(
        tmp_path, capsys, no_search):
    path = _model_file(tmp_path, "nanmodel", """
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(4, 4)
            def forward(self, x):
                return torch.sqrt(self.l(x))
        model = M()
        torch.manual_seed(0)
        example_inputs = (torch.randn(8, 4),)
        """)
    code = _optimize_cli(path, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the original model's loss is nan on the example inputs" in err and "expected finite values" in err
    assert "does not compute the same thing" not in err and len(err.strip().splitlines()) == 1


def test_a_model_whose_own_backward_fails_is_refused_up_front_naming_the_forward_line_at_fault(
        tmp_path, capsys, no_search):
    """An in-place op on a tensor autograd saved fails in the backward only: the search ran and the
    check's reference step raised a traceback (a ninth-round model style)."""
    path = _model_file(tmp_path, "inplace", """
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(4, 4)
            def forward(self, x):
                h = self.l(x)
                h.relu_()
                h[:, :2].mul_(0.5)
                return h
        model = M()
        example_inputs = (torch.randn(8, 4),)
        """)
    code = _optimize_cli(path, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: the backward of model 'inplace' fails on the example inputs (the model itself, "
                          "before any placement): RuntimeError: one of the variables needed for gradient computation "
                          "has been modified by an inplace operation")
    assert "; the failing backward is that of inplace.py:" in err and "in forward: h.relu_()" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_place_refuses_a_model_whose_own_backward_fails_with_placers_error_type():
    import placer

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            h = self.l(x)
            h.relu_()
            return h.mul_(2)  # overwrites what relu_ saved for its backward

    with pytest.raises(placer.PlacerError, match="the backward of model 'InPlace' fails on the example inputs"):
        placer.place(InPlace(), (torch.randn(8, 4),), cluster="4xK40", budget="20", use_cache=False)
    assert placer.PlacerError is PlacerError


def test_the_backward_probe_leaves_the_gradients_as_they_were():
    from envs.runtime.trainable import check_trainable
    model = nn.Linear(4, 2)
    model.weight.grad = torch.ones(2, 4)
    check_trainable(ModelSpec(model=model, example_inputs=(torch.randn(3, 4),), name="lin"))
    assert torch.equal(model.weight.grad, torch.ones(2, 4)) and model.bias.grad is None


def test_a_loss_that_turns_nan_in_later_steps_is_blamed_on_the_model_not_the_placement(tmp_path):
    import placer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    # Finite at step 1 (so preparation lets it through), overflowing after one huge SGD step.
    with pytest.raises(PlacerError, match=r"the original model's loss is (nan|inf) at step 2 .*expected finite "
                                          r"values") as exc:
        placer.optimize(model, (torch.randn(8, 4),), cluster="4xK40", budget="20", baselines=("single",),
                        out_dir=tmp_path / "out", progress=False, verbose=0,
                        loss_fn=lambda out, *_: (out ** 2).mean(),
                        optimizer_fn=lambda params: torch.optim.SGD(params, lr=1e30))
    assert "does not compute the same thing" not in str(exc.value)
    assert not (tmp_path / "out" / "placement.json").exists()


# ----------------------------------------------------------------------------- bug 3: the pipeline's split


def _mlp(norm: bool, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(8, 8), *([nn.BatchNorm1d(8)] if norm else []), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(8, 2))


def _check(model: nn.Module, microbatches: int, replicas: int = 1, batch: int = 16, **spec_kwargs):
    spec = ModelSpec(model=model, example_inputs=(torch.randn(batch, 8),), name="mlp", **spec_kwargs)
    cap = capture(model, spec.example_inputs, name="mlp")
    return check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes}, microbatches=microbatches,
                           replicas=replicas)


def test_a_batchnorm_models_pipeline_with_several_microbatches_is_reported_different_when_the_batch_is_split():
    report = _check(_mlp(norm=True), microbatches=2)
    assert report.placement_ok  # applied un-pipelined it is the same math: only the split differs
    assert not report.ok and report.describe().startswith("same results applied whole, DIFFERENT results with the "
                                                          "batch split")
    assert "micro-batches of 8 samples change what the model computes (BatchNorm in training mode ('1', '5')" \
        in report.describe_split()
    assert report.split_grad_diff > report.tolerance


@pytest.mark.parametrize("microbatches, replicas", [(2, 1), (2, 2), (1, 4)])
def test_a_model_without_batch_coupled_ops_splits_into_microbatches_and_replicas_with_the_same_results(
        microbatches, replicas):
    report = _check(_mlp(norm=False, dropout=0.5), microbatches, replicas)  # dropout draws per micro-batch
    assert report.ok, report.describe()
    assert report.split_samples == 16 // (microbatches * replicas)
    assert "give the full batch's loss, gradients and buffers" in report.describe()
    assert report.split_without_dropout and "compared with dropout off" in report.describe()


def test_a_split_with_no_dropout_that_drops_anything_does_not_say_it_was_compared_without_it():
    report = _check(_mlp(norm=False, dropout=0.0), 2)  # nn.Dropout(0.0): F.dropout with p = 0
    assert report.ok and not report.split_without_dropout and "dropout" not in report.describe()


class _WarmingUp(nn.Module):
    """Scales its output up once its forward has run twice: a warm-up counter, a fake-quant switch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) * (1 + 0.5 * (self.calls - 2).clamp(min=0))


class _RunningMean(nn.Module):
    """Keeps a running mean of its inputs in a buffer, as a normalisation layer would."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x)


def test_a_buffer_the_forward_updates_once_per_call_sets_a_pipeline_with_microbatches_aside():
    """The pipeline runs each stage once per micro-batch, so the counter advances M times a
    step: one step's loss and gradients agree, the next step's do not."""
    torch.manual_seed(0)
    report = _check(_WarmingUp(), microbatches=2)
    assert report.placement_ok and not report.ok
    assert report.split_loss_diff == 0 and report.split_grad_diff < 1e-12 and report.split_buffer_diff >= 1 / 2
    assert report.split_worst == "buffer:calls"
    assert "the forward updates buffer 'calls': a stage runs once per micro-batch" in report.describe_split()


def test_a_counter_read_back_within_the_step_is_named_as_the_cause_not_batchnorm():
    """With 4 micro-batches the counter passes 2 within the step, so the loss differs too;
    the cause was 'e.g. BatchNorm statistics' on a model with no BatchNorm."""
    torch.manual_seed(0)
    report = _check(_WarmingUp(), microbatches=4)
    assert report.split_loss_diff > report.tolerance
    assert "the forward updates buffer 'calls'" in report.describe_split()
    assert "BatchNorm" not in report.describe_split()


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_dropout_between_recurrent_layers_is_off_in_the_split_check_so_the_split_checks_the_same(cell):
    """nn.LSTM's dropout between layers is an argument of torch.lstm, not an F.dropout call:
    it was left on and blamed as 'random numbers besides dropout's'."""
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(8, 8, num_layers=2, dropout=0.5, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    spec = ModelSpec(model=Recurrent(), example_inputs=(torch.randn(8, 5, 8),), name="recurrent")
    cap = capture(spec.model, spec.example_inputs, name="recurrent")
    report = check_batch_split(spec, cap, microbatches=2, replicas=2)
    assert report.split_ok and report.split_without_dropout, report.describe_split()


def test_a_counter_buffer_under_ddp_without_microbatches_is_the_same_as_the_full_batch():
    torch.manual_seed(0)
    report = _check(_WarmingUp(), microbatches=1, replicas=2)
    assert report.ok, report.describe()


def test_a_running_statistic_under_ddp_replicas_is_not_the_full_batchs_and_is_named():
    torch.manual_seed(0)
    report = _check(_RunningMean(), microbatches=1, replicas=2)
    assert not report.ok and report.split_worst == "buffer:mean"
    assert "each of the 2 replicas sees 8 samples and DDP keeps the first replica's buffers" in report.describe_split()


class _MaxNormBag(nn.Module):
    """Mean of embedding rows looked up with max_norm: the forward renormalises them in place."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 8, max_norm=1.0)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_an_embedding_with_max_norm_under_ddp_replicas_is_named_as_what_drifts_apart():
    """Each DDP replica renormalises the rows its own samples look up and parameters are never
    synchronised (3 steps over 2 gloo processes left the tables 12.5 apart); the check passed,
    its example batch's rows renormalised already by the capture's forward."""
    torch.manual_seed(0)
    model = _MaxNormBag()
    spec = ModelSpec(model=model, example_inputs=(torch.randint(0, 100, (16, 5)),), name="bag")
    cap = capture(model, spec.example_inputs, name="bag")
    assert check_batch_split(spec, cap, microbatches=2).split_ok  # one stage writes every row, as one pass does
    report = check_batch_split(spec, cap, microbatches=1, replicas=2)
    assert not report.split_ok
    assert ("nn.Embedding 'emb' renormalises the embedding rows its batch looks up, in place (max_norm): each of "
            "the 2 replicas writes the rows of its own 8 samples") in report.describe_split()


def test_an_observer_that_sizes_its_buffers_on_the_first_call_is_named_not_a_failure_to_run_the_parts():
    """Quantization-aware training: each replica starts from the observer's (0,) min_val, which its
    first call sizes to (channels,); putting the start back failed ("The size of tensor a (8) must
    match the size of tensor b (0)") and the split read as one the parts cannot run."""
    from torch.ao.quantization import PerChannelMinMaxObserver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), PerChannelMinMaxObserver(ch_axis=1), nn.Linear(8, 2))
    spec = ModelSpec(model=model, example_inputs=(torch.randn(16, 8),), name="observed")
    cap = capture(model, spec.example_inputs, name="observed")
    report = check_batch_split(spec, cap, microbatches=1, replicas=2)
    assert not report.split_ok and report.split_worst.startswith("buffer:1."), report.describe_split()
    assert "each of the 2 replicas sees 8 samples" in report.describe_split()


class _DecayedScale(nn.Module):
    """Shrinks a parameter in place at every call (a hand-written decay in forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        self.scale.data.mul_(0.5)
        return self.lin(x) * self.scale


def test_a_parameter_the_forward_writes_once_per_call_sets_micro_batches_aside_and_is_named():
    torch.manual_seed(0)
    report = _check(_DecayedScale(), microbatches=2)
    assert not report.ok and report.split_worst == "param:scale", report.describe_split()
    assert "the forward writes parameter 'scale' in place: a stage runs once per micro-batch" in report.describe_split()
    assert _check(_DecayedScale(), microbatches=1, replicas=2).ok  # every replica writes the same


def test_a_frozen_batchnorm_uses_its_running_statistics_and_splits_with_the_same_results():
    model = _mlp(norm=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    assert _check(model, microbatches=4).ok


def test_a_loss_summed_over_samples_is_named_as_the_cause_of_a_different_split():
    report = _check(_mlp(norm=False), microbatches=2, loss_fn=lambda out, *_: out.sum())
    assert not report.ok and "the loss sums over samples" in report.describe_split()


def test_random_numbers_besides_dropout_are_replayed_in_the_parts_so_the_split_checks_the_same():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x):
            return self.lin(x + torch.randn_like(x))

    torch.manual_seed(0)
    report = _check(Noisy(), microbatches=2)
    assert report.ok and report.split_replayed_draws == 1
    assert "the parts took the full batch's 1 random draw(s)" in report.describe_split()


def test_stochastic_depth_as_timm_draws_it_is_replayed_so_the_split_checks_the_same():
    """A per-sample keep mask behind a 1e-6 layer scale (ConvNeXt): every pipeline and DDP of
    such a model was set aside, the mask drawn otherwise for a batch and its parts."""

    class DropPathBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.gamma = nn.Parameter(1e-6 * torch.ones(8))

        def forward(self, x):
            keep = x.new_empty(x.shape[0], 1).bernoulli_(0.8) / 0.8  # timm's DropPath
            mask = (torch.rand(x.shape[0], 1) > 0.1).to(x.dtype)  # the hand-written form
            return x + self.gamma * self.lin(x) * keep * mask

    torch.manual_seed(0)
    model = nn.Sequential(DropPathBlock(), DropPathBlock(), nn.Linear(8, 2))
    for microbatches, replicas in ((4, 1), (2, 2)):
        report = _check(model, microbatches=microbatches, replicas=replicas)
        assert report.ok and report.split_replayed_draws == 4, report.describe_split()


def test_a_random_draw_that_cannot_be_cut_to_the_parts_makes_the_split_fail_as_not_comparable():
    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x):
            return self.lin(torch.tanh(x * x[torch.randperm(x.shape[0])]))  # mixes samples, at random

    torch.manual_seed(0)
    report = _check(Shuffled(), microbatches=2)
    assert not report.ok and report.describe_split().startswith("cannot compare micro-batches with the full batch")


def test_batchnorm_is_named_as_the_cause_where_the_random_draws_were_replayed():
    class NoisyNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(8)
            self.lin = nn.Linear(8, 2)

        def forward(self, x):
            return self.lin(torch.tanh(3 * self.norm(x) + torch.rand_like(x))).square()

    torch.manual_seed(0)
    report = _check(NoisyNorm(), microbatches=2)
    assert not report.ok and "BatchNorm in training mode ('norm')" in report.describe_split()


def test_inputs_without_a_shared_batch_dimension_make_the_split_fail_as_unrunnable_not_raise():
    """A full-graph GNN: node features (N, d) beside an edge list (2, E). Cut along dim 0, the
    parts index nodes they no longer hold; the check raised IndexError out of placer optimize."""

    class MessagePassing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, edges):
            out = torch.zeros_like(x).index_add(0, edges[1], self.lin(x)[edges[0]])
            return torch.relu(out)

    torch.manual_seed(0)
    x, edges = torch.randn(16, 8), torch.randint(0, 16, (2, 40))
    spec = ModelSpec(model=MessagePassing(), example_inputs=(x, edges), name="gnn")
    cap = capture(spec.model, spec.example_inputs, name="gnn")
    report = check_batch_split(spec, cap, microbatches=2)
    assert not report.split_ok
    assert report.describe_split().startswith("cannot run the model on parts of 8 samples (IndexError")


def _conv_net() -> tuple[ModelSpec, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    spec = ModelSpec(model=model, example_inputs=(torch.randn(16, 3, 128, 128),), name="cnn")
    return spec, capture(model, spec.example_inputs, name="cnn")


def test_a_split_that_differs_by_float32_rounding_alone_checks_the_same():
    """A convolution's bias gradient sums 16 x 128 x 128 float32 terms: summed in 4 parts it
    differs from the sum at once by more than the tolerance, rounding alone (no BatchNorm
    here). The split is compared in float64, so it passes; in float32 it would not have."""
    from envs.runtime.batch_split import _split_step
    from envs.runtime.no_dropout import _NoDropout

    spec, cap = _conv_net()
    report = check_batch_split(spec, cap, microbatches=2, replicas=2)
    assert report.split_ok, report.describe_split()
    assert report.split_grad_diff < 1e-12
    chunks = [[batch_slice(spec.example_inputs, 16, 4 * (2 * r + k), 4 * (2 * r + k + 1)) for k in range(2)]
              for r in range(2)]
    with _NoDropout():
        _, whole, _ = _split_step(cap, spec, {"": True}, [[spec.example_inputs]], 0)
        _, split, _ = _split_step(cap, spec, {"": True}, chunks, 0)
    assert max(_scaled_diff(split[n], whole[n]) for n in whole) > report.tolerance


@pytest.mark.parametrize("need_weights", [False, True])  # dropout inside SDPA, or F.dropout on the weights
def test_attentions_own_dropout_is_off_in_the_split_check_so_attention_splits_the_same(need_weights):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True, dropout=0.5)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=need_weights)[0])

    torch.manual_seed(0)
    spec = ModelSpec(model=Attention(), example_inputs=(torch.randn(4, 5, 16),), name="attention")
    cap = capture(spec.model, spec.example_inputs, name="attention")
    report = check_batch_split(spec, cap, microbatches=2, replicas=2)
    assert report.split_ok, report.describe_split()
    assert report.split_without_dropout


def test_a_model_that_cannot_run_in_float64_is_split_checked_in_its_own_dtype():
    class Float32Input(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.norm = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            # x.float() against a float64 weight: torch.mm refuses the mixed dtypes
            return self.head(torch.relu(self.norm(torch.mm(x.float(), self.w))))

    torch.manual_seed(0)
    spec = ModelSpec(model=Float32Input(), example_inputs=(torch.randn(16, 8),), name="f32")
    cap = capture(spec.model, spec.example_inputs, name="f32")
    with pytest.raises(RuntimeError):  # the float64 copy cannot run: the float32 comparison decides
        copy.deepcopy(cap.gm).to(torch.float64)(spec.example_inputs[0].double())
    report = check_batch_split(spec, cap, microbatches=2)
    assert not report.split_ok and "BatchNorm in training mode ('norm')" in report.describe_split()
    assert check_batch_split(spec, cap, microbatches=1).split_ok


def _winner(model: nn.Module, pipeline_of) -> tuple:
    """check_winner's three arguments for ``model`` with the pipeline ``pipeline_of(captured)`` winning."""
    from placer.optimizing.config import OptimizeConfig

    spec = ModelSpec(model=model, example_inputs=(torch.randn(16, 8),), name="mlp")
    cap = capture(model, spec.example_inputs, name="mlp")
    pipeline = pipeline_of(cap)
    run = SimpleNamespace(spec=spec, captured=cap, cluster=SimpleNamespace(real_device_map=lambda: {"cpu": "cpu"}))
    placement = SimpleNamespace(assignment={n: "cpu" for n in cap.graph.nodes}, pipeline=pipeline)
    confirmed = SimpleNamespace(placement=placement, winner=SimpleNamespace(method="placer (pipeline x DDP)"),
                                split_checks={})
    return OptimizeConfig(model=model, example_inputs=spec.example_inputs), SimpleNamespace(run=run), confirmed


def _one_stage(microbatches: int, replicas: int):
    return lambda cap: Pipeline((tuple(cap.graph.nodes),), ("cpu",), microbatches, "gpipe",
                                tuple((f"cpu{r}",) for r in range(1, replicas)))


def test_check_winner_refuses_a_batchnorm_pipeline_naming_the_cause():
    from placer.optimizing.stages import check_winner

    with pytest.raises(PlacerError, match=r"is a pipeline, and its micro-batches of 4 samples change what the model "
                                          r"computes \(BatchNorm.*placement.json not written"):
        check_winner(*_winner(_mlp(norm=True), _one_stage(microbatches=2, replicas=2)))


def test_check_winner_accepts_an_mlp_pipeline_and_reports_the_split_it_checked():
    from placer.optimizing.stages import check_winner

    report, _ = check_winner(*_winner(_mlp(norm=False), _one_stage(microbatches=2, replicas=2)))
    assert report is not None and report.ok
    assert "2 replicas x 2 micro-batches of 4 samples give the full batch's loss, gradients and buffers" in report.describe()


def test_a_split_checked_before_is_reused_by_the_placement_check_not_run_again(monkeypatch):
    import envs.runtime.batch_split as batch_split
    import envs.runtime.check as check

    model = _mlp(norm=True)
    spec = ModelSpec(model=model, example_inputs=(torch.randn(16, 8),), name="mlp")
    cap = capture(model, spec.example_inputs, name="mlp")
    split = check.check_batch_split(spec, cap, microbatches=2, replicas=2)
    assert not split.split_ok and "BatchNorm in training mode" in split.describe_split()

    def no_second_run(*args, **kwargs):
        raise AssertionError("the split was checked again")

    monkeypatch.setattr(check, "_check_split", no_second_run)
    monkeypatch.setattr(batch_split, "_check_split", no_second_run)
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes}, microbatches=2, replicas=2, split=split)
    assert report.placement_ok and not report.split_ok
    assert report.describe_split() == split.describe_split()
    with pytest.raises(ValueError, match="the split checked before is 2 x 2"):
        check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes}, microbatches=4, replicas=1, split=split)


def test_check_winner_reuses_the_split_the_selection_checked(monkeypatch):
    import envs.runtime.batch_split as batch_split
    import envs.runtime.check as check
    from placer.optimizing.stages import check_winner

    config, compiled, confirmed = _winner(_mlp(norm=False), _one_stage(microbatches=2, replicas=2))
    run = compiled.run
    confirmed.split_checks[2, 2] = check.check_batch_split(run.spec, run.captured, 2, 2)
    for module in (check, batch_split):
        monkeypatch.setattr(module, "_check_split", lambda *a, **k: pytest.fail("the split was checked again"))
    report, _ = check_winner(config, compiled, confirmed)
    assert report is not None and report.ok and report.split_samples == 4


def test_optimize_sets_a_batchnorm_pipeline_with_microbatches_aside_and_ddp_with_synchronised_norms_can_win(
        tmp_path, capsys):
    path = _model_file(tmp_path, "mlp_bn", """
        def get_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(32, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(1024, 10))
        def get_example_inputs():
            torch.manual_seed(0)
            return (torch.randn(512, 32),)
        """)
    out = tmp_path / "out"
    code = _optimize_cli(path, out)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0, err
    table = pd.read_csv(out / "comparison.csv")
    recommended = next(line for line in captured.out.splitlines() if line.startswith("recommendation: "))
    assert not any(recommended.startswith(f"recommendation: {m} (") for m in table[table["set_aside"]]["method"])
    aside = table[table["set_aside"]]
    # The case: pipelines that split the batch were faster (as on 4xK40: "placer (pipeline x DDP)").
    assert not aside.empty and (aside["kind"] != "placement").all()
    assert aside["note"].str.contains(r"micro-batches of (?:128|256) samples change what the model computes "
                                      r"\(BatchNorm in training mode").all() and "set aside" in err
    written = json.loads((out / "placement.json").read_text())
    pipeline = written.get("pipeline")
    # What wins splits the batch into one micro-batch per replica at most: DDP's replicas
    # synchronise their BatchNorms (envs.runtime.replica_batch_norm), micro-batches cannot.
    assert pipeline is None or pipeline["microbatches"] == 1
    if pipeline is not None and pipeline.get("replicas"):
        assert "BatchNorm(s) synchronised over the replicas" in captured.out
    assert float(aside["step_time"].min()) < written["metadata"]["step_time"]
    # No pipeline row with micro-batches is left looking checked and exact.
    split = table[table["kind"].isin(["pipeline", "ddp"]) & table["fits"]]
    for _, row in split.iterrows():
        note = str(row["note"])
        assert (row["set_aside"] or "batch split not checked" in note or "M=1," in note
                or row["method"] == "ddp"), note


def test_a_buffer_the_forward_reassigns_is_compared_as_it_is_after_each_step():
    """``self.calls = self.calls + 1``: the original eager model holds a new tensor after every
    step, torch.export's placed graph writes into its own; the check read the original's first
    tensor (still 0) against the placed 3, and refused every placement of such a model."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls = self.calls + 1
            return self.lin(x)

    torch.manual_seed(0)
    spec = ModelSpec(model=Counting(), example_inputs=(torch.randn(4, 8),), name="counting")
    cap = capture(spec.model, spec.example_inputs, name="counting")
    assert cap.method == "export"
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok and report.compared_buffers == 1, report.describe()


def test_a_model_defining_its_tied_head_first_keeps_its_parameter_order_and_checks_the_same():
    """fx registered parameters in forward's order: an optimizer state_dict saved from the placed
    model resumed the original on the wrong weights, and the tied weight was named emb.weight
    instead of head.weight, which the check took for two missing gradients."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.mid(self.emb(x))))

    torch.manual_seed(0)
    model, x = Tied(), torch.randint(0, 20, (4, 5))
    cap = capture(model, (x,), name="tied")
    assert [n for n, _ in cap.gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(cap.gm.state_dict()) == list(model.state_dict())
    spec = ModelSpec(model=model, example_inputs=(x,), name="tied")
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok, report.describe()


class _MadeConstants(nn.Module):
    """Tensors forward() builds from constants, which fx keeps as ``_tensor_constantN``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.scale = torch.tensor(1.5)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        h = torch.nn.functional.pad(self.fc(x), (1, 1), value=0.5)
        return (h + torch.full((8,), 0.25) + torch.ones(8) * 3) * torch.tensor(2.0) * self.scale


def test_tensor_constants_made_in_forward_are_not_state_and_the_check_passes():
    torch.manual_seed(0)
    model = _MadeConstants()
    before = set(vars(model))
    spec = ModelSpec(model=model, example_inputs=(torch.randn(3, 4),), name="constants")
    first = capture(model, spec.example_inputs)
    cap = capture(model, spec.example_inputs)  # twice: fx would name the second set _tensor_constant3...
    assert cap.method == "fx"
    assert cap.fingerprint == first.fingerprint  # else place() missed its cache, load() refused its file
    assert set(vars(model)) == before, "capturing set fx's constants on the user's model"
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.missing_state == () and report.ok, report.describe()
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    assert not [n for n, _ in placed.named_buffers()]
    copy.deepcopy(model).load_state_dict(placed.state_dict())  # strict: no unexpected keys
    x = spec.example_inputs[0]
    assert torch.equal(placed(x), model(x))


def test_the_check_compares_an_eval_forward_after_the_steps(monkeypatch):
    """The placed model's eval forward is another code path than its training step (the eval
    graph run where its data is): the check ran training steps only, so an eval path that
    computed something else passed (review)."""
    from graphs.eval_interpreter import DataFollowingInterpreter
    from tests.helpers.eval_models import StochasticDepth

    torch.manual_seed(0)
    spec = ModelSpec(model=StochasticDepth(), example_inputs=(torch.randn(8, 8),), name="droppath")
    cap = capture(spec.model, spec.example_inputs)
    assignment = alternating_placement(cap.graph)
    report = check_placement(spec, cap, assignment, real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    assert report.ok and report.eval_output_diff == 0.0 and "eval mode" in report.describe()
    assert spec.model.training

    def off_by_one(self, target, args, kwargs):
        return DataFollowingInterpreter.__mro__[1].output(self, target, args, kwargs) + 1.0

    monkeypatch.setattr(DataFollowingInterpreter, "output", off_by_one)
    report = check_placement(spec, cap, assignment, real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    assert not report.ok and report.eval_output_diff > 0.1


def test_the_finite_fast_path_gives_the_masked_rules_figure_to_the_bit_and_leaves_nan_and_inf_to_it():
    """The check compares every parameter three passes at a time where it can (no NaN in the
    difference, no infinity in the original): that figure must be the masked rule's exactly,
    signed zero included, or a report would change; anything else must fall to the rule."""
    nan, inf = float("nan"), float("inf")
    gen = torch.Generator().manual_seed(0)
    finite = [(torch.randn(50, generator=gen), torch.randn(50, generator=gen)) for _ in range(20)]
    x = torch.randn(1000, dtype=torch.float64, generator=gen)
    finite += [(x, x.clone()), (x + 1e-12, x), (torch.tensor([-0.0, 0.0]), torch.tensor([0.0, -0.0])),
               (torch.tensor([-0.0]), torch.tensor([-0.0])), (torch.tensor([inf, 1.0]), torch.tensor([2.0, 1.0])),
               (torch.tensor([-inf, 1.0]), torch.tensor([2.0, 3.0])), (torch.tensor(3.0), torch.tensor(-4.0))]
    for a, b in finite:
        fast, masked = _finite_scaled_diff(a, b), _masked_scaled_diff(a, b)
        assert fast is not None
        assert struct.pack("<d", fast) == struct.pack("<d", masked), (a, b, fast, masked)
    for a, b in [(torch.tensor([1.0, nan]), torch.tensor([1.0, nan])), (torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])),
                 (torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan])), (torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0])),
                 (torch.tensor([1.0, 2.0]), torch.tensor([1.0, -inf]))]:
        assert _finite_scaled_diff(a, b) is None
        assert struct.pack("<d", _scaled_diff(a, b)) == struct.pack("<d", _masked_scaled_diff(a, b))


class _ExportedBatchSized(nn.Module):
    """torch.export captures it (iterating over a tensor) with the batch size baked into a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        x = torch.stack([row for row in x])
        return self.a(x) * torch.ones(x.shape[0], 1)


def test_a_split_of_an_exported_graph_that_holds_the_batch_size_is_refused_with_the_reason():
    """Such a graph refuses other shapes (graphs.forward_checks.pin_shapes_unless_generic): the split
    check reports it, naming the cause, instead of failing in the middle of a search."""
    torch.manual_seed(0)
    spec = ModelSpec(model=_ExportedBatchSized(), example_inputs=(torch.randn(8, 8),), name="sized")
    cap = capture(spec.model, spec.example_inputs, name="sized")
    assert cap.method == "export"
    report = check_batch_split(spec, cap, microbatches=2)
    assert not report.split_ok
    assert "holds the example's batch of 8" in report.describe_split()


# ----------------------------------------------------------------------------- parameter hooks, pruned weights

def _rows_kept(grad: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(grad)
    mask[:3] = 0
    return grad * mask


class _HookedPruned(nn.Module):
    """A gradient hook on a weight, and a pruned layer (a computed weight kept as an attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)
        self.a.weight.register_hook(_rows_kept)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_check_compares_with_a_copy_of_the_model_that_keeps_its_parameter_hooks_and_pruned_weights():
    """The check's copy of the user's model dropped its parameters' gradient hooks (the placed
    model keeps them: a false difference) and could not copy a pruned model at all."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = _HookedPruned()
    prune.l1_unstructured(model.b, "weight", 0.5)
    spec = ModelSpec(model=model, example_inputs=(torch.randn(6, 8),), name="hooked")
    cap = capture(model, spec.example_inputs)
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok, report.describe()


class _FanOut(nn.Module):
    """One tensor read by four branches, BatchNorm at a batch of 2: an Inception block in miniature."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                                                    nn.Linear(width, width)) for _ in range(4))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(sum(b(h) for b in self.branches))


def test_gradient_terms_summed_in_another_order_through_a_copy_are_not_reported_as_a_different_computation():
    """A branch on another device adds its share of the stem's gradient through the copy's
    backward, in another order than the original's. In float32 three Adam steps grow that
    rounding to 2e-2 (Inception-v3's default run was refused so); the check compares again in
    float64, where the two agree."""
    from envs.runtime.check import _compare_steps

    torch.manual_seed(0)
    model = _FanOut()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(2, 16),), name="fan",
                     loss_fn=lambda out, *_: (out ** 2).mean(), optimizer_fn=lambda p: torch.optim.Adam(p, lr=1e-2))
    cap = capture(model, spec.example_inputs, name="fan")
    placement = {n: "gpu1" if "branches_3" in n else "gpu0" for n in cap.graph.nodes}
    assert list(placement.values()).count("gpu1") == 4
    real = {"gpu0": "cpu", "gpu1": "cpu"}
    in_float32 = _compare_steps(spec, cap, placement, real, 0, 3, 1e-5, None)
    assert max(in_float32.worst.values()) > 1e-3  # what the check would have refused
    report = check_placement(spec, cap, placement, real_devices=real)
    assert report.ok and report.compared_dtype == "float64", report.describe()
    assert report.own_dtype_diff == max(in_float32.worst.values())
    assert "compared in float64: in the model's own dtype they differed by" in report.describe()
    same_device = check_placement(spec, cap, {n: "gpu0" for n in cap.graph.nodes}, real_devices=real)
    assert same_device.ok and same_device.compared_dtype == ""  # agreeing in float32: no second run


def test_a_wrong_placement_is_still_refused_when_compared_again_in_float64(monkeypatch):
    """A copy made before an in-place update misses it in any dtype: the float64 rerun does not
    turn a real difference into a pass."""
    import envs.runtime.check as check

    torch.manual_seed(0)
    model = _FanOut()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(2, 16),), name="fan",
                     loss_fn=lambda out, *_: (out ** 2).mean())
    cap = capture(model, spec.example_inputs, name="fan")
    real_apply = check.apply_placement

    def miswired(*args, **kwargs):  # the placed model's head scaled: a different computation
        placed = real_apply(*args, **kwargs)
        with torch.no_grad():
            placed.get_submodule("head").weight.mul_(1.5)
        return placed

    monkeypatch.setattr(check, "apply_placement", miswired)
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert not report.ok and report.compared_dtype == ""


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x):
            return x.float() @ self.lin.weight.t() + self.lin.bias  # float32 whatever the weights are

    torch.manual_seed(0)
    model = Fixed()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(4, 8),), name="fixed")
    cap = capture(model, spec.example_inputs, name="fixed")
    report = check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes})
    assert report.ok and report.compared_dtype == "", report.describe()
    assert "compared in" not in report.describe()
    # and a difference it cannot retry in float64 keeps its own dtype's verdict
    assert check_placement(spec, cap, {n: "cpu" for n in cap.graph.nodes}, tolerance=-1.0).compared_dtype == ""


class _SequenceFirstLM(nn.Module):
    """An LSTM over (time, batch) tokens, torch's default layout, predicting the next token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(20, 8), nn.LSTM(8, 8), nn.Linear(8, 20)

    def forward(self, tokens):
        return self.out(self.rnn(self.emb(tokens))[0])


def _next_token_loss(output, tokens):
    return nn.functional.cross_entropy(output[:-1].reshape(-1, 20), tokens[1:].reshape(-1))


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_a_sequence_first_model_splits_exactly_along_its_batch_dimension_and_dim_0_says_how_to_name_it(batch_dim):
    torch.manual_seed(0)
    model = _SequenceFirstLM()
    spec = ModelSpec(model=model, example_inputs=(torch.randint(0, 20, (8, 4)),), loss_fn=_next_token_loss,
                     batch_dim=batch_dim)
    report = check_batch_split(spec, capture(model, spec.example_inputs, loss_fn=_next_token_loss), 2, 2)
    if batch_dim == 1:  # 2 replicas x 2 micro-batches of 1 sequence of 8 steps
        assert report.split_ok and report.split_samples == 1, report.describe_split()
    else:  # parts of 2 time steps: the recurrence restarts, the next-token pairs across parts are lost
        assert not report.split_ok
        assert "set batch_dim = 1 in the model file" in report.describe_split()


class _ExportedReshapedByItsBatch(nn.Module):
    """torch.export captures it (iterating over columns); it reshapes by its input's batch, as a
    Hugging Face model's attention does (``view(batch, seq, heads, dim)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.stack([column * 2 for column in x.unbind(1)], 1)
        return self.b(self.a(h).view(x.size(0), 2, 4).transpose(1, 2).reshape(x.size(0), 8))


def test_an_exported_graph_keeps_its_batch_symbolic_so_its_micro_batches_run_and_split_exactly():
    """Exported at the example's sizes the graph held the batch of 8 in its views, and every
    pipeline and DDP row of such a model (a Hugging Face GPT-2 among them) was set aside."""
    torch.manual_seed(0)
    spec = ModelSpec(model=_ExportedReshapedByItsBatch(), example_inputs=(torch.randn(8, 8),), name="reshaped")
    cap = capture(spec.model, spec.example_inputs, name="reshaped")
    assert cap.method == "export" and not getattr(cap.gm, "placer_input_shapes", None)
    report = check_batch_split(spec, cap, microbatches=2, replicas=2)
    assert report.split_ok and report.split_samples == 2, report.describe_split()


class _ExportedSequenceFirst(nn.Module):
    """torch.export captures it (a loop over its time steps); its batch is dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):  # (time, batch, 8)
        h = torch.stack([torch.tanh(self.a(step)) for step in x.unbind(0)])
        return h.reshape(x.size(0) * x.size(1), 8).sum(0)


def test_an_exported_sequence_first_graph_keeps_its_batch_dimension_symbolic_not_its_time():
    torch.manual_seed(0)
    spec = ModelSpec(model=_ExportedSequenceFirst(), example_inputs=(torch.randn(3, 8, 8),), name="seq",
                     loss_fn=lambda out, x: out.sum() / x.size(1), batch_dim=1)
    cap = capture(spec.model, spec.example_inputs, name="seq", batch_dim=1)
    assert cap.method == "export" and not getattr(cap.gm, "placer_input_shapes", None)
    assert check_batch_split(spec, cap, microbatches=4).split_ok


class _Bfloat16Autocast(nn.Module):
    """An MLP whose first layer runs under bfloat16 autocast (torch.export captures the region)."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
        self.norm = nn.BatchNorm1d(64) if norm else nn.Identity()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.relu(self.a(x))
        return self.b(self.norm(h.float()))


@pytest.mark.parametrize("norm", [False, True])
def test_a_split_of_a_model_under_bfloat16_autocast_is_held_to_bfloat16s_rounding_not_float32s(norm):
    """Its parts round at bfloat16 (7e-5 to 9e-5 apart from the whole batch, measured), which the
    float32 tolerance (1e-5) read as a split that changes the math: DDP and every pipeline of such
    a model was set aside. BatchNorm's statistics per micro-batch still differ by far more."""
    torch.manual_seed(0)
    spec = ModelSpec(model=_Bfloat16Autocast(norm), example_inputs=(torch.randn(16, 32),), name="amp",
                     loss_fn=lambda out, x: out.square().mean())  # the default mean is blind to BatchNorm
    cap = capture(spec.model, spec.example_inputs, name="amp")
    report = check_batch_split(spec, cap, microbatches=2)
    assert report.split_precision == "bfloat16" and report.split_tolerance == torch.finfo(torch.bfloat16).eps
    if norm:
        assert not report.split_ok and report.split_grad_diff > 5 * report.split_tolerance  # 6e-2, measured
        assert "(tolerance 8e-03 for bfloat16)" in report.describe_split()
    else:
        assert report.split_ok and report.split_grad_diff > 1e-5, report.describe_split()
        assert "bfloat16's rounding: the model computes in bfloat16" in report.describe_split()


class _ComplexBatchMixer(nn.Module):
    """Sample-wise through the real part of its complex weight, batch-wide through the imaginary part."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 0.5 + 2.0j))

    def forward(self, x):
        z = x.to(torch.complex64) * self.w
        return z.real + x.mean(0, keepdim=True) * z.imag


def test_the_float64_split_check_keeps_a_complex_weights_imaginary_part_and_sees_what_it_changes(recwarn):
    """Module.to(torch.float64) cast complex parameters to real: the split check compared a model
    without the imaginary half of its weights, here the half that reads the whole batch."""
    torch.manual_seed(0)
    spec = ModelSpec(model=_ComplexBatchMixer(), example_inputs=(torch.randn(8, 4),), name="mixer")
    cap = capture(spec.model, spec.example_inputs, name="mixer")
    report = check_batch_split(spec, cap, microbatches=2)
    assert not report.split_ok, report.describe_split()
    assert not [w for w in recwarn if "discards the imaginary part" in str(w.message)]
    assert spec.model.w.dtype == torch.complex64
