"""What a model file defines reaches the worker processes by its module's name
(envs.runtime.file_modules): a namedtuple output type, here."""

from __future__ import annotations

import textwrap

NAMEDTUPLE_MODEL = textwrap.dedent('''
    from collections import namedtuple
    import torch
    from torch import nn

    Out = namedtuple("Out", ["logits", "embedding"])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            e = self.enc(x)
            return Out(self.head(torch.relu(e)), e)

    def get_model():
        torch.manual_seed(0)
        return Net()

    def get_example_inputs():
        torch.manual_seed(1)
        return (torch.randn(8, 8), torch.randint(0, 3, (8,)))

    def get_loss(out, x, y):
        return nn.functional.cross_entropy(out.logits, y)
''')


def test_a_namedtuple_output_defined_in_the_model_file_is_measured_over_worker_ranks(tmp_path):
    """Every placement measured over cpu:0,cpu:1 failed: "No module named 'placer_model_namedtuple_out_...'"."""
    from envs.runtime.distributed.measure import DistributedMeasurer
    from graphs.capture import capture
    from graphs.model_file import load_model_file

    path = tmp_path / "namedtuple_out.py"
    path.write_text(NAMEDTUPLE_MODEL)
    spec = load_model_file(path)
    captured = capture(spec.model, spec.example_inputs, name=spec.name)
    nodes = [n.name for n in captured.gm.graph.nodes]
    ranks = DistributedMeasurer(str(path), {}, "cpu:0,cpu:1", warmup=0, repeats=1, min_timed_s=0,
                                spec=spec, captured=captured, fingerprint=captured.fingerprint)
    [split] = ranks.measure([{n: ("cpu:0" if i < len(nodes) // 2 else "cpu:1") for i, n in enumerate(nodes)}])
    assert split.valid, split.reason
