"""Models built of lazy modules (nn.LazyLinear...): their parameters get their shapes from the
example inputs before placer reads them, through the model file, optimize() and apply()."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import placer
from graphs.lazy_modules import has_lazy_state, materialize
from graphs.model_file import load_model_file


def lazy_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(4))


def test_materialize_gives_every_parameter_its_shape_and_keeps_training_mode():
    model = lazy_net()
    assert has_lazy_state(model)
    materialize(model, (torch.randn(3, 7),))
    assert not has_lazy_state(model) and tuple(model[0].weight.shape) == (16, 7) and model.training


def test_a_fresh_lazy_model_is_optimized_and_the_placement_applies_to_another_fresh_copy():
    """Before: optimize raised 'Attempted to use an uninitialized parameter' from placer's own code."""
    x, y = torch.randn(8, 7), torch.randint(0, 4, (8,))
    result = placer.optimize(lazy_net(), (x, y), loss_fn=lambda out, x, y: F.cross_entropy(out, y),
                             cluster="4xV100-nvlink", budget="100", baselines="single", out_dir=None,
                             progress=False)
    assert result.check is not None and result.check.ok, result.check
    fresh = lazy_net()
    placed = placer.apply(fresh, result.placement, (x, y))
    reference = lazy_net()
    materialize(reference, (x, y)[:1])
    torch.testing.assert_close(placed(x), reference(x))


LAZY = """
import torch
from torch import nn

def get_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Dropout(0.5), nn.LazyLinear(2))

def get_example_inputs():
    return (torch.randn(6, 5),)
"""


def test_lazy_modules_get_their_shapes_from_the_example_inputs_without_moving_running_stats(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(LAZY)
    spec = load_model_file(path)
    model = spec.model
    assert tuple(model[0].weight.shape) == (8, 5) and tuple(model[4].weight.shape) == (2, 8)
    assert torch.equal(model[1].running_mean, torch.zeros(8)) and int(model[1].num_batches_tracked) == 0
    assert model.training and all(m.training for m in model.modules())
