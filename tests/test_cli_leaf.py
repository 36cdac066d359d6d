"""``placer optimize --leaf``: user-chosen modules stay single ops; a name that matches nothing is
refused; and every later capture of the model (measuring workers, ``apply``, ``show``) keeps them too."""

from __future__ import annotations

import json
import textwrap

import pytest

from placer.cli.main import main
from tests.helpers.model_files import FUNCTION_MODEL

MODEL = textwrap.dedent("""
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.a(x)) + self.b(x)


    def get_model():
        torch.manual_seed(0)
        return nn.Sequential(Block(), Block(), nn.Linear(16, 2))


    def get_example_inputs():
        return (torch.randn(4, 16),)
    """)


@pytest.fixture
def function_model_file(tmp_path):
    path = tmp_path / "scaled.py"
    path.write_text(FUNCTION_MODEL)
    return path


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "blocks.py"
    path.write_text(MODEL)
    return path


def test_leaf_keeps_each_named_module_one_op(model_file, tmp_path):
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "50", "--baselines", "single",
                 "--leaf", "Block", "--out", str(out), "-q"]) == 0
    nodes = set(json.loads((out / "placement.json").read_text())["assignment"])
    assert {"_0", "_1"} <= nodes  # the two blocks, whole
    assert not any(n.startswith(("_0_a", "_0_b", "relu")) for n in nodes)


def test_a_leaf_that_matches_no_module_is_refused_in_one_line(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--leaf", "Blok", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "leaf module 'Blok' matches no module" in err and "Traceback" not in err
    assert not out.exists()


def test_a_leaf_naming_the_model_itself_is_refused_not_ignored(model_file, tmp_path, capsys):
    """The tracer never asks whether the root is a leaf: --leaf Sequential here changed nothing."""
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--leaf", "Sequential", "--out", str(out),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "leaf module 'Sequential' names the model itself" in err and "Traceback" not in err
    assert not out.exists()


def test_graph_reads_leaf_as_optimize_does_comma_separated_or_repeated(model_file, capsys):
    """``placer graph`` shows the graph ``placer optimize`` places, so one ``--leaf`` grammar:
    ``--leaf 0,1`` is ``--leaf 0 --leaf 1`` (graph refused ``'0,1'`` as one module name)."""

    def nodes(*leaf_args):
        assert main(["graph", str(model_file), "--no-profile", "--json", *leaf_args]) == 0
        return json.loads(capsys.readouterr().out)["nodes"]

    repeated = nodes("--leaf", "0", "--leaf", "1")
    assert nodes("--leaf", "0,1") == repeated < nodes()


def test_a_model_that_needs_a_leaf_names_the_option_to_use(function_model_file, tmp_path, capsys):
    assert main(["optimize", str(function_model_file), "--cluster", "4xK40", "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "autograd Function Halve" in err and "--leaf MODULE" in err and "Traceback" not in err


def test_apply_and_show_capture_the_model_with_the_leaf_modules_optimize_recorded(function_model_file, tmp_path,
                                                                                 capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(function_model_file), "--cluster", "4xK40", "--budget", "50", "--baselines",
                 "single", "--leaf", "Scaled", "--out", str(out), "-q"]) == 0
    placement = json.loads((out / "placement.json").read_text())
    assert placement["metadata"]["leaf_modules"] == ["1"]  # the module path, not the class name given
    capsys.readouterr()
    assert main(["show", str(out / "placement.json"), "--model", str(function_model_file),
                 "--out", str(tmp_path / "pics")]) == 0
    assert "leaf modules (recorded by optimize): 1" in capsys.readouterr().out
    assert main(["apply", str(function_model_file), str(out / "placement.json"), "--steps", "2", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "leaf modules (recorded by optimize): 1" in printed and "step time" in printed


@pytest.mark.slow
def test_measuring_workers_capture_the_model_with_the_callers_leaf_modules(function_model_file):
    """A worker loads the model file and captures it again: without the leaves the parent
    captured with, it cannot (this model) or places another graph's nodes."""
    from envs.runtime.distributed.measure import DistributedMeasurer
    from envs.runtime.measure import SingleProcessMeasurer
    from graphs.capture import capture
    from graphs.model_file import load_model_file

    spec = load_model_file(function_model_file)
    captured = capture(spec.model, spec.example_inputs, leaf_modules=["Scaled"], name=spec.name)
    assert captured.leaf_paths == ("1",)
    nodes = [n.name for n in captured.gm.graph.nodes]
    with SingleProcessMeasurer(str(function_model_file), warmup=0, repeats=1, min_timed_s=0, num_threads=1,
                               leaf_modules=captured.leaf_paths) as m:
        assert m.node_names == nodes
        [single] = m.measure([dict.fromkeys(nodes, "cpu")])
    assert single.valid, single.reason
    ranks = DistributedMeasurer(str(function_model_file), {}, "cpu:0,cpu:1", warmup=0, repeats=1, min_timed_s=0,
                                spec=spec, captured=captured, fingerprint=captured.fingerprint)
    [split] = ranks.measure([{n: ("cpu:0" if i < len(nodes) // 2 else "cpu:1") for i, n in enumerate(nodes)}])
    assert split.valid, split.reason


def test_a_recorded_leaf_the_model_no_longer_has_says_it_came_from_the_placement(function_model_file, tmp_path,
                                                                                 capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(function_model_file), "--cluster", "4xK40", "--budget", "20", "--baselines",
                 "single", "--leaf", "Scaled", "--no-check", "--out", str(out), "-q"]) == 0
    renamed = tmp_path / "renamed.py"
    # Another model: one layer, so no module '1' to keep whole.
    renamed.write_text(FUNCTION_MODEL.replace("return nn.Sequential(nn.Linear(16, 16), Scaled(), nn.Tanh(), "
                                              "nn.Linear(16, 2))", "return nn.Sequential(nn.Linear(16, 2))"))
    assert "nn.Sequential(nn.Linear(16, 2))" in renamed.read_text()
    capsys.readouterr()
    assert main(["apply", str(renamed), str(out / "placement.json"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "leaf module '1' matches no module" in err and "Traceback" not in err
    assert f"{out / 'placement.json'} was made with the leaf modules 1 (optimize --leaf, recorded in the file)" in err


def test_resuming_without_the_leaf_modules_says_the_placement_was_made_with_them(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "20", "--baselines", "single",
                 "--leaf", "Block", "--no-check", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "20", "--baselines", "single",
                 "--resume", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "was made for another model" in err and "it was made with the leaf modules 0, 1 (--leaf)" in err
