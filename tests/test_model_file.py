"""The model-file loader: the happy paths and one clear ModelFileError per kind of bad file."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs.capture import capture
from graphs.errors import ModelFileError, PlacerError
from graphs.input_batch import batch_slice, first_tensor
from graphs.model_file import ModelSpec, default_loss, load_model_file

GOOD = """
import torch
from torch import nn

def get_model(size="small"):
    width = {"small": 4, "paper": 8}[size]
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))

def get_example_inputs(size="small"):
    return (torch.randn(5, 3),)
"""


def write(tmp_path, text, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path, text, name="model.py", **kwargs) -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ModelFileError) as info:
        load_model_file(path, **kwargs)
    assert isinstance(info.value, PlacerError)
    return str(info.value)


def test_loads_functions_with_defaults(tmp_path):
    spec = load_model_file(write(tmp_path, GOOD))
    assert isinstance(spec, ModelSpec)
    assert spec.name == "model"
    assert isinstance(spec.example_inputs, tuple) and spec.example_inputs[0].shape == (5, 3)
    out = spec.model(*spec.example_inputs)
    loss = spec.loss_fn(out, *spec.example_inputs)
    assert loss.shape == () and torch.isclose(loss, out.float().mean())
    opt = spec.optimizer_fn(spec.model.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.01


def test_model_args_reach_both_functions(tmp_path):
    spec = load_model_file(write(tmp_path, GOOD), model_args={"size": "paper"})
    assert spec.model[0].out_features == 8
    assert spec.model_args == {"size": "paper"}


def test_unknown_model_arg_is_named(tmp_path):
    msg = load_error(tmp_path, GOOD, model_args={"layrs": 3})
    assert "layrs" in msg and "size" in msg


def test_custom_loss_and_optimizer(tmp_path):
    spec = load_model_file(write(tmp_path, GOOD + """
def get_loss(output, x):
    return (output ** 2).sum()

def get_optimizer(params):
    return torch.optim.Adam(params, lr=1e-3)
"""))
    out = spec.model(*spec.example_inputs)
    assert torch.isclose(spec.loss_fn(out, *spec.example_inputs), (out ** 2).sum())
    assert isinstance(spec.optimizer_fn(spec.model.parameters()), torch.optim.Adam)


def test_module_level_shortcut_and_single_tensor(tmp_path):
    spec = load_model_file(write(tmp_path, """
        import torch
        model = torch.nn.Linear(3, 2)
        example_inputs = torch.randn(4, 3)
    """))
    assert isinstance(spec.example_inputs, tuple) and len(spec.example_inputs) == 1


def test_default_loss_uses_first_tensor_of_structure():
    out = {"logits": torch.ones(2, 3) * 2, "other": torch.zeros(1)}
    assert first_tensor(out) is out["logits"]
    assert default_loss((out,)).item() == pytest.approx(2.0)
    with pytest.raises(ModelFileError, match="get_loss"):
        default_loss("no tensor here")


@dataclasses.dataclass
class _Scores:
    name: str
    logits: torch.Tensor


def test_default_loss_finds_the_tensors_of_a_dataclass_output_too():
    out = _Scores("head", torch.ones(2, 3) * 3)
    assert first_tensor([out]) is out.logits
    assert default_loss(out).item() == pytest.approx(3.0)


def test_default_loss_is_the_loss_a_dict_output_carries():
    """A forward that computes its own loss from labels among its inputs ({"logits", "loss"},
    as Hugging Face models do) was trained on the mean of its logits."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    loss = torch.nn.functional.cross_entropy(logits, labels)
    chosen = default_loss({"logits": logits, "loss": loss})
    assert chosen is not None and torch.equal(chosen, loss)
    assert default_loss({"logits": logits, "loss": None}).item() == pytest.approx(1.0)  # no labels: no loss


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model_file(tmp_path / "nope.py")


def test_not_a_python_file(tmp_path):
    msg = load_error(tmp_path, "x = 1", name="model.txt")
    assert "not a Python file" in msg and ".py" in msg


def test_directory(tmp_path):
    with pytest.raises(ModelFileError, match="directory"):
        load_model_file(tmp_path)


def test_syntax_error_names_line(tmp_path):
    msg = load_error(tmp_path, "import torch\n\ndef get_model(:\n    pass\n")
    assert "syntax error" in msg and "line 3" in msg and "def get_model(:" in msg


def test_import_error_inside_file(tmp_path):
    msg = load_error(tmp_path, "import torch\nimport not_a_real_package_xyz\n")
    assert "line 2" in msg and "not_a_real_package_xyz" in msg and "installed" in msg


def test_error_at_import_time(tmp_path):
    msg = load_error(tmp_path, "x = 1\nraise RuntimeError('boom at load')\n")
    assert "line 2" in msg and "RuntimeError" in msg and "boom at load" in msg


def test_missing_functions_names_what_was_expected(tmp_path):
    msg = load_error(tmp_path, "import torch\ndef build():\n    return torch.nn.Linear(1, 1)\n")
    assert "get_model()" in msg and "get_example_inputs()" in msg and "example_inputs" in msg


def test_only_get_model(tmp_path):
    msg = load_error(tmp_path, "import torch\ndef get_model():\n    return torch.nn.Linear(1, 1)\n")
    assert "not get_example_inputs()" in msg


def test_get_model_not_callable(tmp_path):
    msg = load_error(tmp_path, "get_model = 3\ndef get_example_inputs():\n    return ()\n")
    assert "get_model" in msg and "expected a function" in msg


def test_get_model_raising(tmp_path):
    msg = load_error(tmp_path, """
        import torch
        def get_model():
            raise ValueError("no weights for this size")
        def get_example_inputs():
            return (torch.randn(1),)
    """)
    assert "get_model() in model.py raised ValueError: no weights for this size" in msg
    assert "model.py:4" in msg


def test_a_get_model_argument_without_a_default_is_named_with_how_to_give_it(tmp_path):
    """It read "get_model() in model.py raised TypeError: get_model() missing 1 required
    positional argument: 'hidden'": Python's words, nothing of how to pass a value."""
    msg = load_error(tmp_path, """
        import torch
        def get_model(hidden, layers=2):
            return torch.nn.Linear(3, hidden)
        def get_example_inputs():
            return (torch.randn(1, 3),)
    """)
    assert msg == ("get_model() in model.py needs the argument(s) hidden, which have no default; expected a value "
                   "for each: --model-arg hidden=VALUE (model_args={'hidden': ...} from Python)")
    spec = load_model_file(write(tmp_path, """
        import torch
        def get_model(hidden, layers=2):
            return torch.nn.Linear(3, hidden)
        def get_example_inputs():
            return (torch.randn(1, 3),)
    """), model_args={"hidden": 5})
    assert spec.model.out_features == 5


def test_sys_exit_in_get_model_is_the_model_files_failure_not_placers_exit(tmp_path):
    msg = load_error(tmp_path, """
        import sys
        import torch
        def get_model():
            sys.exit("no weights here")
        def get_example_inputs():
            return (torch.randn(1, 3),)
    """)
    assert "get_model() in model.py raised SystemExit: no weights here" in msg


def test_get_model_returns_non_module(tmp_path):
    msg = load_error(tmp_path, """
        import torch
        def get_model():
            return [torch.nn.Linear(1, 1)]
        def get_example_inputs():
            return (torch.randn(1),)
    """)
    assert "list" in msg and "expected a torch.nn.Module" in msg


@pytest.mark.parametrize("inputs,expected", [
    ("[torch.randn(2, 3)]", "gave a list"),
    ("()", "empty tuple"),
    ("(1, 'a')", "holds no tensor"),
])
def test_bad_example_inputs(tmp_path, inputs, expected):
    msg = load_error(tmp_path, f"""
        import torch
        def get_model():
            return torch.nn.Linear(3, 2)
        def get_example_inputs():
            return {inputs}
    """)
    assert expected in msg and "get_example_inputs()" in msg


def test_inputs_that_do_not_fit(tmp_path):
    msg = load_error(tmp_path, """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 2)
            def forward(self, x):
                return self.fc(x)
        def get_model():
            return Net()
        def get_example_inputs():
            return (torch.randn(4, 5),)
    """)
    assert "do not fit" in msg and "tensor[4, 5]" in msg
    assert "model.py:8" in msg and "self.fc(x)" in msg
    assert "\n" not in msg  # one clear line, no traceback


def test_fit_check_leaves_buffers_untouched(tmp_path):
    spec = load_model_file(write(tmp_path, """
        import torch
        model = torch.nn.BatchNorm1d(3)
        example_inputs = (torch.randn(8, 3) + 5,)
    """))
    assert torch.equal(spec.model.running_mean, torch.zeros(3))


def test_fit_check_leaves_a_buffer_it_resized_at_its_shape_so_a_worker_captures_the_same_model(tmp_path):
    """A per-channel observer (quantization-aware training) sizes its min_val/max_val from (0,) to
    (channels,) on its first call: the fit check left them resized, so the parent's capture had
    another fingerprint than a worker's, which skips that check, and every placement measured over
    worker ranks failed ("rank 0 captured model 5ce8..., the job is for c040...")."""
    path = write(tmp_path, """
        import torch
        from torch.ao.quantization import PerChannelMinMaxObserver
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 4)
                self.observe = PerChannelMinMaxObserver(ch_axis=1)
            def forward(self, x):
                return self.observe(self.fc(x))
        model = Net()
        example_inputs = (torch.randn(8, 3),)
    """)
    checked, unchecked = load_model_file(path), load_model_file(path, check_inputs=False)
    assert checked.model.observe.min_val.shape == (0,)
    assert capture(checked.model, checked.example_inputs).fingerprint == \
        capture(unchecked.model, unchecked.example_inputs).fingerprint


def test_a_model_file_imports_the_helper_module_beside_it_as_python_would(tmp_path):
    """``from mylayers import Block`` beside the model file: 'No module named mylayers' unless the
    command ran in that folder (``python path/to/model.py`` imports it from anywhere)."""
    (tmp_path / "mylayers.py").write_text("import torch\nclass Block(torch.nn.Linear):\n    pass\n")
    (tmp_path / "envs.py").write_text("raise RuntimeError('a sibling named like placer must not shadow it')\n")
    spec = load_model_file(write(tmp_path, """
        import torch
        from mylayers import Block
        model = torch.nn.Sequential(Block(3, 2))
        example_inputs = (torch.randn(4, 3),)
    """))
    assert type(spec.model[0]).__name__ == "Block"
    # at the end of the path: a sibling named like an installed package (graphs.py) does not shadow it
    assert sys.path.index(str(tmp_path.resolve())) > 0
    assert importlib.util.find_spec("envs").origin != str(tmp_path / "envs.py")


def test_a_relative_import_in_a_model_file_says_how_to_import_instead(tmp_path):
    (tmp_path / "layers.py").write_text("import torch\nBlock = torch.nn.Linear\n")
    msg = load_error(tmp_path, """
        import torch
        from .layers import Block
        model = Block(3, 2)
        example_inputs = (torch.randn(4, 3),)
    """)
    assert msg.startswith("model.py line 3 imports relatively (from .module import ...), but a model file is "
                          "loaded by its path") and "expected an absolute import" in msg


def test_two_files_with_same_name_do_not_clash(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    spec_a = load_model_file(write(a, "import torch\nmodel = torch.nn.Linear(3, 1)\nexample_inputs = (torch.randn(1, 3),)\n"))
    spec_b = load_model_file(write(b, "import torch\nmodel = torch.nn.Linear(3, 7)\nexample_inputs = (torch.randn(1, 3),)\n"))
    assert spec_a.model.out_features == 1 and spec_b.model.out_features == 7


def test_large_models_checked_on_fake_tensors(tmp_path, monkeypatch):
    import graphs.inputs_fit as fit_check

    monkeypatch.setattr(fit_check, "REAL_CHECK_MAX_PARAMS", 1)
    text = """
        import torch
        calls = []
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 2)
            def forward(self, x):
                calls.append(type(x).__name__)
                return self.fc(x)
        model = Net()
        example_inputs = ({inputs},)
    """
    spec = load_model_file(write(tmp_path, text.format(inputs="torch.randn(4, 3)")))
    assert spec.model.fc.out_features == 2
    module = __import__("sys").modules[type(spec.model).__module__]
    assert module.calls == ["FakeTensor"]  # never ran on real tensors
    msg = load_error(tmp_path, text.format(inputs="torch.randn(4, 5)"), name="model2.py")
    assert "do not fit" in msg and "model2.py:10" in msg


def test_half_of_the_shortcut(tmp_path):
    msg = load_error(tmp_path, "import torch\nmodel = torch.nn.Linear(3, 2)\n")
    assert "defines `model` but not `example_inputs`" in msg


def test_a_forward_that_modifies_its_input_in_place_is_refused_naming_it_and_the_input_is_restored():
    from torch import nn

    from graphs.inputs_fit import check_inputs_fit

    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, batch):
            batch["mask"].mul_(2.0)
            return self.lin(x * batch["mask"])

    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    with pytest.raises(ModelFileError, match=r"forward\(\) of doubling modifies its input batch\['mask'\] in place; "
                                             r"expected a forward that leaves its inputs as they are"):
        check_inputs_fit(Doubling(), (x, {"mask": mask}), "doubling")
    assert torch.equal(mask, torch.ones(3, 4))
    check_inputs_fit(nn.Linear(4, 2), (x,), "linear")  # reading inputs is fine


def test_a_forward_that_needs_autograd_fits_its_inputs():
    """h.register_hook raises under torch.no_grad: the inputs fit, the model needs gradients
    (it was refused as 'the example inputs do not fit the model'; walkthrough)."""
    from torch import nn

    from graphs.inputs_fit import check_inputs_fit

    class Reversing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            h = self.lin(x)
            h.register_hook(lambda grad: -grad)
            return h

    check_inputs_fit(Reversing(), (torch.randn(3, 4),), "reversing")
    with pytest.raises(ModelFileError, match="do not fit"):
        check_inputs_fit(Reversing(), (torch.randn(3, 5),), "reversing")


SEQUENCE_FIRST = """
import torch
from torch import nn

model = nn.GRU(3, 4)                       # torch's default layout: (time, batch, features)
example_inputs = (torch.randn(7, 5, 3),)
batch_dim = {value}
"""


def test_a_model_file_names_its_batch_dimension_and_the_spec_carries_it(tmp_path):
    assert load_model_file(write(tmp_path, SEQUENCE_FIRST.format(value=1))).batch_dim == 1
    assert load_model_file(write(tmp_path, GOOD, "plain.py")).batch_dim == 0  # unsaid: dim 0


@pytest.mark.parametrize("value, expected", [
    ("'1'", "`batch_dim` in model.py is '1'; expected the inputs' batch dimension as an integer >= 0"),
    ("-1", "`batch_dim` in model.py is -1; expected the inputs' batch dimension as an integer >= 0"),
    ("True", "`batch_dim` in model.py is True; expected"),
    ("3", "`batch_dim` in model.py is 3, but the first input tensor has shape (7, 5, 3) (3 dimension(s)); "
          "expected a dimension it has"),
])
def test_a_batch_dimension_that_is_not_one_of_the_inputs_is_refused_saying_what_was_expected(tmp_path, value,
                                                                                              expected):
    assert expected in load_error(tmp_path, SEQUENCE_FIRST.format(value=value))


KEYWORD_INPUTS = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x, past=None, mask=None, **extra):
        return self.a(x) * (1 if mask is None else mask)

def get_model():
    return Net()

def get_example_inputs():
    return {inputs}
"""


def test_keyword_inputs_become_the_positional_inputs_of_forward_with_the_defaults_between(tmp_path):
    spec = load_model_file(write(tmp_path, KEYWORD_INPUTS.format(
        inputs='{"mask": torch.ones(5, 2), "x": torch.randn(5, 3)}')))
    x, past, mask = spec.example_inputs
    assert x.shape == (5, 3) and past is None and torch.equal(mask, torch.ones(5, 2))
    assert torch.equal(spec.model(*spec.example_inputs), spec.model(x=x, mask=mask))


@pytest.mark.parametrize("inputs, expected", [
    ('{"x": torch.randn(5, 3), "labels": torch.zeros(5)}',
     "get_example_inputs() in model.py name 'labels', which forward() of Net does not take by position "
     "(its parameters: x, past, mask); expected keys that are parameters of forward()"),
    ('{"mask": torch.ones(5, 2)}', "get_example_inputs() in model.py leave out 'x', a parameter of forward() "
                                   "without a default; expected every such parameter"),
    ("{}", "get_example_inputs() in model.py is an empty dict; expected the model's inputs by parameter name"),
])
def test_keyword_inputs_forward_cannot_take_are_refused_naming_them(tmp_path, inputs, expected):
    assert expected in load_error(tmp_path, KEYWORD_INPUTS.format(inputs=inputs))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.integers(0, 3), st.lists(st.integers(1, 5), min_size=0, max_size=3),
       st.sampled_from([1, 2, 4]))
def test_the_parts_of_a_batch_put_back_along_its_axis_are_the_batch(batch_dim, axis, others, parts):
    """batch_axis and batch_slice: every tensor holding the batch, on the model's batch dimension
    or on the one other dimension of its size, is cut into parts that concatenate back to it;
    a tensor without the batch is given whole to every part."""
    batch = 6 * 4  # no other dimension has this size
    shape = list(others)
    axis = min(axis, len(shape))
    shape.insert(axis, batch)
    holder = torch.arange(math.prod(shape)).reshape(shape)
    whole = torch.zeros(3, 5)
    inputs = ({"state": holder}, whole)
    size = batch // parts
    cut = [batch_slice(inputs, batch, k * size, (k + 1) * size, batch_dim) for k in range(parts)]
    assert torch.equal(torch.cat([c[0]["state"] for c in cut], dim=axis), holder)
    assert all(c[1] is whole for c in cut)
