"""Where a model mixes the samples of its batch (envs.runtime.sample_mixing), named by the check of a batch split."""

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from envs.runtime.check import check_batch_split
from envs.runtime.sample_mixing import find_sample_mixing
from graphs.capture import capture
from graphs.model_file import ModelSpec


class Contrastive(nn.Module):
    """CLIP's logits: every image against every text of the batch; features as wide as the batch."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(8, width), nn.Linear(4, width)

    def forward(self, img, txt):
        a, b = F.normalize(self.image(img), dim=-1), F.normalize(self.text(txt), dim=-1)
        return a @ b.t()


def pairs_loss(logits, img, txt):
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x, y):
        return self.net(x), self.net(y)


def simclr_loss(out, x, y):
    a, b = F.normalize(out[0], dim=-1), F.normalize(out[1], dim=-1)
    return F.cross_entropy(a @ b.t() / 0.1, torch.arange(a.shape[0]))


def batch(width=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(width, 8, generator=g), torch.randn(width, 4, generator=g)


def test_the_op_that_pairs_samples_is_named_not_the_transpose_before_it():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Contrastive(width=16))  # b.t() of a (16, 16) batch: its feature dim is the batch's size
    found = find_sample_mixing(gm, batch(16), 16, 2)
    assert (found.node, found.how) == ("matmul", "pairs")


def test_a_model_whose_ops_are_all_sample_wise_leaves_the_loss_as_what_mixes_them():
    torch.manual_seed(0)
    x, _ = batch()
    found = find_sample_mixing(fx.symbolic_trace(Embedder()), (x, x + 1), 16, 4)
    assert found.node is None
    assert "the loss (get_loss) mixes the samples" in found.describe(0)


def test_a_reduction_over_the_batch_is_named_with_its_module():
    class CentredHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True)

    found = find_sample_mixing(fx.symbolic_trace(CentredHead()), (batch()[0],), 16, 2)
    assert (found.node, found.how) == ("mean", "reduces")
    assert "in " not in found.describe(0).split(")")[0]  # a top-level op names no module


def test_the_failed_split_check_names_the_op_or_the_loss():
    torch.manual_seed(0)
    spec = ModelSpec(model=Contrastive(), example_inputs=batch(), loss_fn=pairs_loss, name="clip")
    report = check_batch_split(spec, capture(spec.model, spec.example_inputs, loss_fn=pairs_loss), 1, 2)
    assert not report.split_ok
    assert report.describe_split().startswith("replicas' shares of 8 samples change what the model computes (op "
                                              "'matmul' (operator.matmul) pairs the samples of the batch (dim 0)")

    x, _ = batch()
    spec = ModelSpec(model=Embedder(), example_inputs=(x, x + 1), loss_fn=simclr_loss, name="simclr")
    report = check_batch_split(spec, capture(spec.model, spec.example_inputs, loss_fn=simclr_loss), 2, 1)
    assert not report.split_ok
    assert "so the loss (get_loss) mixes the samples" in report.describe_split()
