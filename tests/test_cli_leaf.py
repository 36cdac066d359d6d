"""``placer optimize --leaf``: user-chosen modules stay single ops; a name that matches nothing is refused."""

from __future__ import annotations

import json
import textwrap

import pytest

from placer.cli.main import main

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


def test_graph_reads_leaf_as_optimize_does_comma_separated_or_repeated(model_file, capsys):
    """``placer graph`` shows the graph ``placer optimize`` places, so one ``--leaf`` grammar:
    ``--leaf 0,1`` is ``--leaf 0 --leaf 1`` (graph refused ``'0,1'`` as one module name)."""

    def nodes(*leaf_args):
        assert main(["graph", str(model_file), "--no-profile", "--json", *leaf_args]) == 0
        return json.loads(capsys.readouterr().out)["nodes"]

    repeated = nodes("--leaf", "0", "--leaf", "1")
    assert nodes("--leaf", "0,1") == repeated < nodes()
