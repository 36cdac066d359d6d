"""torch.nn's transformer stacks are captured layer by layer and compute what the original does."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from envs.runtime.check import check_placement
from graphs.capture import capture
from graphs.model_file import ModelSpec
from tests.helpers.placements import alternating_placement

TWO_CPUS = {"gpu0": "cpu", "gpu1": "cpu"}


class EncoderLM(nn.Module):
    """A causal encoder stack given a boolean mask and no is_causal: the stack detects it."""

    def __init__(self, layers: int = 3, padding: bool = False) -> None:
        super().__init__()
        self.padding = padding
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(16))
        self.out = nn.Linear(16, 50)

    def forward(self, tokens):
        steps = tokens.size(1)
        mask = torch.triu(torch.ones(steps, steps, dtype=torch.bool), diagonal=1)
        pad = (tokens == 0) if self.padding else None
        return self.out(self.enc(self.emb(tokens), mask=mask, src_key_padding_mask=pad))


class Seq2Seq(nn.Module):
    """nn.Transformer, sequence-first, with a causal target mask."""

    def __init__(self) -> None:
        super().__init__()
        self.src_emb, self.tgt_emb = nn.Embedding(40, 16), nn.Embedding(40, 16)
        self.core = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                                   dropout=0.0)
        self.out = nn.Linear(16, 40)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.size(0))
        return self.out(self.core(self.src_emb(src), self.tgt_emb(tgt), tgt_mask=mask))


def _tokens(*shape: int) -> torch.Tensor:
    return torch.randint(1, 50, shape, generator=torch.Generator().manual_seed(1))


def _layer_nodes(captured) -> list[str]:
    return _layer_nodes_of(captured.gm)


def test_an_encoder_stack_is_one_node_per_layer_and_a_placement_over_them_checks_the_same():
    torch.manual_seed(0)
    spec = ModelSpec(model=EncoderLM(), example_inputs=(_tokens(4, 7),), name="lm")
    cap = capture(spec.model, spec.example_inputs, name="lm")
    assert cap.method == "fx"
    assert _layer_nodes(cap) == ["enc.layers.0", "enc.layers.1", "enc.layers.2"]
    assert "enc.norm" in [n.target for n in cap.gm.graph.nodes if n.op == "call_module"]
    report = check_placement(spec, cap, alternating_placement(cap.graph), real_devices=TWO_CPUS)
    assert report.ok, report.describe()
    assert report.eval_output_diff == 0.0  # eval mode: the layers take their own path, as in the original


def test_an_encoder_decoder_transformer_is_one_node_per_layer_of_both_stacks_and_checks_the_same():
    torch.manual_seed(0)
    spec = ModelSpec(model=Seq2Seq(), example_inputs=(_tokens(6, 3) % 40, _tokens(5, 3) % 40), name="s2s")
    cap = capture(spec.model, spec.example_inputs, name="s2s")
    assert _layer_nodes(cap) == ["core.encoder.layers.0", "core.encoder.layers.1", "core.decoder.layers.0",
                                 "core.decoder.layers.1"]
    report = check_placement(spec, cap, alternating_placement(cap.graph), real_devices=TWO_CPUS)
    assert report.ok, report.describe()


def test_a_stack_named_as_a_leaf_module_stays_one_node():
    torch.manual_seed(0)
    model = EncoderLM()
    cap = capture(model, (_tokens(4, 7),), leaf_modules=["enc"])
    assert _layer_nodes(cap) == [] and "enc" in [n.target for n in cap.gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_the_traced_stack_gives_the_originals_outputs_and_gradients_for_each_kind_of_mask(mask_kind):
    """The masks are canonicalised and the causal hint detected from their values at run time,
    as nn.TransformerEncoder does: a float or boolean causal mask, or none."""
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2,
                                             enable_nested_tensor=False)

        def forward(self, x):
            mask = None if mask_kind == "none" else nn.Transformer.generate_square_subsequent_mask(x.size(0))
            return self.enc(x, mask=mask if mask_kind != "bool" else mask.isinf())

    torch.manual_seed(0)
    model = Encoder()
    x = torch.randn(5, 3, 8)
    placed = capture(model, (x,)).gm
    assert torch.equal(placed(x), model(x))
    placed(x).square().sum().backward()
    model(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), placed.parameters()):
        assert torch.equal(p.grad, q.grad), name


class PaddedEncoder(nn.Module):
    """An encoder given a padding mask and no mask: in eval mode under no_grad its nested fast path."""

    def __init__(self, nested: bool = True) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 16), nn.Linear(16, 50)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=nested)

    def forward(self, tokens):
        return self.out(self.enc(self.emb(tokens), src_key_padding_mask=(tokens == 0)))


@pytest.mark.parametrize("nested", [True, False])
def test_an_encoder_given_only_a_padding_mask_is_kept_whole_where_its_eval_fast_path_would_differ(nested, caplog):
    torch.manual_seed(0)
    model, tokens = PaddedEncoder(nested), torch.tensor([[5, 6, 7, 0, 0], [3, 4, 0, 0, 0]])
    with caplog.at_level(logging.WARNING, logger="graphs.transformer_stacks"):
        placed = capture(model, (tokens,)).gm
    assert (_layer_nodes_of(placed) == []) == nested
    assert caplog.text.count("kept as one op") == (1 if nested else 0)
    model.eval(), placed.eval()
    with torch.no_grad():  # the nested path: 0 at the padded positions (1.81 apart from the standard path's)
        assert torch.equal(placed(tokens), model(tokens))


def _layer_nodes_of(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and ".layers." in str(n.target)]


class _HalvingEncoder(nn.TransformerEncoder):
    """A subclass with a forward of its own: the user's code, traced as written."""

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        for layer in self.layers:
            src = layer(src) * 0.5
        return src


def test_a_stack_subclass_with_its_own_forward_is_traced_through_that_forward():
    torch.manual_seed(0)
    model = nn.Sequential(_HalvingEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                          enable_nested_tensor=False))
    x = torch.randn(3, 5, 8)
    placed = capture(model, (x,)).gm
    assert [n.target for n in placed.graph.nodes if n.op == "call_module"] == ["0.layers.0", "0.layers.1"]
    assert torch.equal(placed(x), model(x))
