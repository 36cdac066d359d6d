"""Loss targets in the example inputs of a model whose forward() does not take them
(graphs.loss_targets): the model is used as it is, the targets reach the loss only."""

import inspect
import textwrap

import pytest
import torch
from torch import nn

import placer
from graphs.capture import capture
from graphs.errors import ModelFileError
from graphs.loss_targets import accepting_targets, forward_takes
from graphs.model_file import load_model_file

CLASSIFIER_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x))

def get_model():
    torch.manual_seed(0)
    return Net()

def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(8, 16), torch.randint(0, 5, (8,)))
"""

LOSS = """
def get_loss(output, x, y):
    return nn.functional.cross_entropy(output, y)
"""


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x))


def cross_entropy(output, x, y):
    return nn.functional.cross_entropy(output, y)


def write(tmp_path, text):
    path = tmp_path / "classifier.py"
    path.write_text(textwrap.dedent(text))
    return path


def test_inputs_beyond_forward_are_the_losss_targets_and_the_graph_keeps_them_as_unused_placeholders(tmp_path):
    spec = load_model_file(write(tmp_path, CLASSIFIER_FILE + LOSS))
    x, y = spec.example_inputs
    assert forward_takes(spec.model) == 2
    assert type(spec.model).__name__ == "Net"
    loss = spec.loss_fn(spec.model(x, y), x, y)
    assert loss.shape == () and loss.requires_grad

    captured = capture(spec.model, spec.example_inputs, loss_fn=spec.loss_fn)
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["x", "target"]
    assert not placeholders[1].users
    # the placed model also runs without its targets, as a training loop calls it
    torch.testing.assert_close(captured.gm(x), spec.model(x, y))


def test_the_view_is_the_model_itself_its_parameters_training_flag_and_hooks():
    model = Classifier()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    view = accepting_targets(model, 2)

    assert isinstance(view, Classifier)
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    view.eval()
    assert not model.training and not model.head.training
    x = torch.randn(3, 16)
    torch.testing.assert_close(view(x, torch.zeros(3)), model(x))
    assert calls == [2, 1]  # the hook ran on the view's call (with the targets) and on the model's
    assert accepting_targets(model, 1) is model


def test_a_forward_that_takes_any_number_of_inputs_is_left_as_it_is():
    class Varargs(nn.Module):
        def forward(self, *xs):
            return xs[0]

    model = Varargs()
    assert forward_takes(model) is None
    assert accepting_targets(model, 3) is model


def test_target_names_do_not_clash_with_forwards_parameters():
    class TakesTarget(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, target):
            return self.fc(target)

    gm = capture(accepting_targets(TakesTarget(), 3), (torch.randn(2, 4), torch.zeros(2), torch.zeros(2))).gm
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["target", "target_0", "target_1"]


def test_extra_inputs_without_a_loss_are_refused_saying_how_to_make_them_targets(tmp_path):
    with pytest.raises(ModelFileError) as info:
        load_model_file(write(tmp_path, CLASSIFIER_FILE))
    message = str(info.value)
    assert "gives 2 inputs, but forward() of Net takes 1" in message
    assert "get_loss(output, *inputs)" in message


def test_optimize_places_a_model_whose_loss_takes_targets_and_the_placement_applies_to_the_same_model():
    torch.manual_seed(0)
    model = Classifier()
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    result = placer.optimize(model, (x, y), loss_fn=cross_entropy, cluster="4xV100-nvlink", budget="200",
                             baselines="single,m_etf", out_dir=None, progress=False)
    assert result.check is not None and result.check.ok, result.check
    placed = placer.apply(model, result.placement, (x, y))
    torch.testing.assert_close(placed(x), model(x))


def test_a_compiled_model_gets_its_targets_inside_the_compiled_wrapper():
    """torch.compile's wrapper sets its forward on the instance, where a view's class forward cannot reach."""
    torch.manual_seed(0)
    model = torch.compile(Classifier(), backend="eager")
    view = accepting_targets(model, 2)
    assert type(view) is type(model) and view.dynamo_ctx is model.dynamo_ctx
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 16)
    torch.testing.assert_close(view(x, torch.zeros(3)), model(x))


def test_the_views_forward_keeps_the_models_plain_defaults_so_the_placed_model_runs_as_the_model_did():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask=None, scale=2.0):
            h = self.lin(x) * scale
            return h if mask is None else h * mask

    x = torch.randn(3, 4)
    view = accepting_targets(Masked(), 4)
    assert str(inspect.signature(type(view).forward)) == "(self, x, mask=None, scale=2.0, target=None)"
    torch.testing.assert_close(view(x), view(x, None, 2.0, torch.zeros(3)))


def test_keys_of_a_batch_dict_that_forward_does_not_take_are_the_losss_targets(tmp_path):
    path = write(tmp_path, CLASSIFIER_FILE.replace(
        "return (torch.randn(8, 16), torch.randint(0, 5, (8,)))",
        'return {"x": torch.randn(8, 16), "labels": torch.randint(0, 5, (8,))}') + LOSS)
    spec = load_model_file(path)
    x, labels = spec.example_inputs
    assert labels.dtype == torch.int64 and forward_takes(spec.model) == 2

    without_loss = path.read_text().replace("def get_loss(output, x, y):", "def _unused(output, x, y):")
    path.write_text(without_loss)
    with pytest.raises(ModelFileError, match=r"name 'labels', which forward\(\) of Net does not take by position .*"
                                             r"if they are the loss's targets, a loss that uses them"):
        load_model_file(path)


def test_batch_keys_a_keyword_forward_does_not_name_are_the_losss_targets_with_a_warning(tmp_path, caplog):
    """forward(x, **kwargs) with a batch {"x", "labels", "idx"} was refused naming 'labels' and 'idx'."""
    path = write(tmp_path, CLASSIFIER_FILE.replace("def forward(self, x):", "def forward(self, x, **kwargs):").replace(
        "return (torch.randn(8, 16), torch.randint(0, 5, (8,)))",
        'return {"x": torch.randn(8, 16), "labels": torch.randint(0, 5, (8,)), "idx": torch.arange(8)}')
        + LOSS.replace("def get_loss(output, x, y):", "def get_loss(output, x, y, idx):"))
    with caplog.at_level("WARNING", logger="graphs.model_file"):
        spec = load_model_file(path)
    x, labels, idx = spec.example_inputs
    assert labels.dtype == torch.int64 and torch.equal(idx, torch.arange(8))
    assert "'labels', 'idx' are not parameters of forward() of Net" in caplog.text
    assert "not into forward's **kwargs" in caplog.text
    loss = spec.loss_fn(spec.model(x), *spec.example_inputs)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(spec.model(x), labels))


def test_apply_takes_the_dict_of_inputs_optimize_took():
    """placer.apply captured a dict of inputs as one positional input: 'linear(): argument 'input'
    must be Tensor, not dict'."""
    torch.manual_seed(0)
    model = Classifier()
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    result = placer.optimize(model, {"x": x, "labels": y}, loss_fn=cross_entropy, cluster="4xV100-nvlink",
                             budget="100", baselines="single", out_dir=None, progress=False)
    placed = placer.apply(model, result.placement, {"x": x, "labels": y})
    torch.testing.assert_close(placed(x), model(x))
