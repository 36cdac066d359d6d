"""Capture: fx at module granularity, the export fallback, shapes/bytes/FLOPs, fingerprint, graph files."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
import pickle
import random
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

from graphs.capture import capture
from graphs.errors import CaptureError, GraphError
from graphs.graph_io import load_graph, save_graph
from tests.helpers.placements import alternating_placement

NODE_KEYS = {"op", "target", "module", "shape", "dtype", "out_bytes", "param_bytes", "flops",
             "bytes_moved", "requires_grad", "fwd_time", "bwd_time", "time"}


class Block(nn.Module):
    """A user module with its own arithmetic, to be kept whole as a leaf."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.inner(x)) * 2


class Tagger(nn.Module):
    """Embedding → LSTM → Linear, a buffer used directly, a conv, a user block and a detach."""

    def __init__(self, vocab=11, width=16, out=10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.rnn = nn.LSTM(8, width, num_layers=2, batch_first=True)
        self.block = Block(width)
        self.fc = nn.Linear(width, out)
        self.conv = nn.Conv1d(5, 7, kernel_size=3, padding=1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, out))

    def forward(self, tokens):
        h, _ = self.rnn(self.emb(tokens))
        y = self.fc(self.block(h)) * self.scale
        z = self.conv(y)
        return z.softmax(-1) + z.detach().mean()


def tagger_inputs():
    return (torch.randint(0, 11, (2, 5)),)


@pytest.fixture(scope="module")
def tagger_capture():
    torch.manual_seed(0)
    return capture(Tagger(), tagger_inputs(), leaf_modules=(Block,), name="tagger")


class Recorder(fx.Interpreter):
    """Runs a GraphModule on real tensors and keeps every node's output."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def tensors_of(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    return []


def test_fx_capture_at_module_granularity(tagger_capture):
    cap = tagger_capture
    assert cap.method == "fx" and cap.fx_error is None
    g = cap.graph
    assert [n.name for n in cap.gm.graph.nodes] == list(g.nodes)
    calls = {d["target"] for _, d in g.nodes(data=True) if d["op"] == "call_module"}
    assert calls == {"emb", "rnn", "block", "fc", "conv"}  # LSTM and the user block stay whole
    assert g.graph["name"] == "tagger" and g.graph["capture"] == "fx"
    assert g.graph["fingerprint"] == cap.fingerprint and g.graph["profiled_kinds"] == []
    assert nx.is_directed_acyclic_graph(g)
    for name, attrs in g.nodes(data=True):
        assert NODE_KEYS <= set(attrs), name
        assert attrs["time"] == {} and attrs["fwd_time"] == {}


def test_buffer_is_a_get_attr_node(tagger_capture):
    g = tagger_capture.graph
    scale = [n for n, d in g.nodes(data=True) if d["op"] == "get_attr"]
    assert scale == ["scale"]
    assert g.nodes["scale"]["param_bytes"] == 10 * 4 and g.nodes["scale"]["shape"] == [10]


def test_user_leaf_by_path_and_class_name():
    for leaf in ("block", "Block"):
        cap = capture(Tagger(), tagger_inputs(), leaf_modules=(leaf,))
        assert "block" in cap.graph.nodes and cap.graph.nodes["block"]["op"] == "call_module"
        assert cap.graph.nodes["block"]["param_bytes"] == (16 * 16 + 16) * 4
    traced_through = capture(Tagger(), tagger_inputs())
    assert "block_inner" in traced_through.graph.nodes
    assert traced_through.graph.nodes["block_inner"]["module"] == "block.inner"
    assert traced_through.graph.nodes["tanh"]["module"] == "block"


def test_unknown_leaf_is_refused():
    with pytest.raises(CaptureError, match="'blok' matches no module"):
        capture(Tagger(), tagger_inputs(), leaf_modules=("blok",))
    with pytest.raises(CaptureError, match="expected an nn.Module subclass"):
        capture(Tagger(), tagger_inputs(), leaf_modules=(3,))


def test_shapes_dtypes_and_bytes_match_a_real_run(tagger_capture):
    cap = tagger_capture
    rec = Recorder(cap.gm)
    rec.run(*cap.example_inputs)
    g = cap.graph
    for name, attrs in g.nodes(data=True):
        if attrs["op"] == "output":
            continue
        ts = tensors_of(rec.values[name])
        assert ts, name
        assert attrs["shape"] == list(ts[0].shape), name
        assert attrs["dtype"] == str(ts[0].dtype), name
        assert attrs["out_bytes"] == sum(t.numel() * t.element_size() for t in ts), name
    # edges carry the producer's bytes; through a getitem only the element taken
    assert g.edges["emb", "rnn"]["bytes"] == 2 * 5 * 8 * 4
    assert g.edges["rnn", "getitem"]["bytes"] == 2 * 5 * 16 * 4
    assert g.nodes["rnn"]["out_bytes"] == (2 * 5 * 16 + 2 * 2 * 2 * 16) * 4


def test_requires_grad(tagger_capture):
    g = tagger_capture.graph
    assert g.nodes["tokens"]["requires_grad"] is False
    assert g.nodes["fc"]["requires_grad"] is True
    assert g.nodes["detach"]["requires_grad"] is False
    assert g.nodes["scale"]["requires_grad"] is False


def test_flops_exact_for_linear_conv_lstm(tagger_capture):
    g = tagger_capture.graph
    assert g.nodes["fc"]["flops"] == 2 * (2 * 5 * 10) * 16 + 2 * 5 * 10
    # conv: out [2, 7, 10], weight [7, 5, 3]
    assert g.nodes["conv"]["flops"] == 2 * (2 * 7 * 10) * (5 * 3) + 2 * 7 * 10
    lstm_matrix = 64 * 8 + 64 * 16 + 64 * 16 + 64 * 16
    steps_rows = 5 * 2
    assert g.nodes["rnn"]["flops"] == steps_rows * (2 * lstm_matrix + 2 * 64 * 5)
    assert g.nodes["getitem"]["flops"] == 0 and g.nodes["getitem"]["bytes_moved"] == 0
    assert g.nodes["fc"]["bytes_moved"] == (2 * 5 * 16 + 2 * 5 * 10 + 16 * 10 + 10) * 4


def test_functional_matmul_flops():
    class Mm(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, a, b):
            return torch.bmm(a, b), torch.nn.functional.linear(a, self.w), torch.einsum("bij,bjk->bik", a, b)

    cap = capture(Mm(), (torch.randn(3, 5, 4), torch.randn(3, 4, 7)))
    g = cap.graph
    assert g.nodes["bmm"]["flops"] == 2 * 3 * 5 * 7 * 4
    assert g.nodes["linear"]["flops"] == 2 * 3 * 5 * 6 * 4
    assert g.nodes["einsum"]["flops"] == 2 * 3 * 5 * 7 * 4
    assert g.nodes["w"]["param_bytes"] == 6 * 4 * 4


class IterBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        rows = [r * 2 for r in x]  # iterating over a tensor: fx cannot trace this, export can
        return torch.relu(self.lin(torch.stack(rows)))


class NeedsExport(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([IterBlock(), IterBlock()])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_export_fallback_maps_modules_and_runs():
    torch.manual_seed(0)
    model = NeedsExport()
    x = torch.randn(3, 4)
    cap = capture(model, (x,))
    assert cap.method == "export" and "iterated" in cap.fx_error
    g = cap.graph
    assert [n.name for n in cap.gm.graph.nodes] == list(g.nodes)
    linears = {n: d for n, d in g.nodes(data=True) if d["target"] == "aten.linear.default"}
    assert sorted(d["module"] for d in linears.values()) == ["blocks.0.lin", "blocks.1.lin", "head"]
    head = next(n for n, d in linears.items() if d["module"] == "head")
    assert g.nodes[head]["flops"] == 2 * 3 * 3 * 4 + 3 * 3 and g.nodes[head]["shape"] == [3, 3]
    relu_mods = sorted(d["module"] for d in g.nodes.values() if d["target"] == "aten.relu.default")
    assert relu_mods == ["blocks.0", "blocks.1"]
    assert sum(d["param_bytes"] for d in g.nodes.values()) == sum(p.numel() * 4 for p in model.parameters())
    assert g.nodes[head]["requires_grad"] is True
    assert torch.allclose(cap.gm(x), model(x))
    rec = Recorder(cap.gm)
    rec.run(x)
    for name, attrs in g.nodes(data=True):
        ts = tensors_of(rec.values.get(name))
        if attrs["op"] == "output" or not ts:
            continue
        assert attrs["shape"] == list(ts[0].shape), name
        assert attrs["out_bytes"] == sum(t.numel() * t.element_size() for t in ts), name


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values
            x = x + 1
        return self.lin(x)


def test_untraceable_model_error_names_the_line():
    lines, start = inspect.getsourcelines(Untraceable.forward)
    lineno = start + next(i for i, line in enumerate(lines) if "x.sum() > 0" in line)
    with pytest.raises(CaptureError) as info:
        capture(Untraceable(), (torch.randn(2, 4),), name="bad")
    msg = str(info.value)
    assert f"test_capture.py:{lineno}" in msg and "if x.sum() > 0:" in msg
    assert "torch.fx" in msg and "torch.export" in msg and "'bad'" in msg


def test_fingerprint_stable_and_sensitive():
    torch.manual_seed(1)
    a = capture(Tagger(), tagger_inputs(), leaf_modules=(Block,))
    torch.manual_seed(2)
    b = capture(Tagger(), tagger_inputs(), leaf_modules=(Block,))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    wider = capture(Tagger(out=12), tagger_inputs(), leaf_modules=(Block,))
    assert wider.fingerprint != a.fingerprint
    other_structure = capture(Tagger(), tagger_inputs())
    assert other_structure.fingerprint != a.fingerprint


@pytest.mark.slow
def test_fingerprint_same_in_another_process(tagger_capture):
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        "from test_capture import Tagger, Block, tagger_inputs; from graphs.capture import capture;"
        "torch.manual_seed(9); print(capture(Tagger(), tagger_inputs(), leaf_modules=(Block,), name='tagger').fingerprint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONHASHSEED": "123", **__import__("os").environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tagger_capture.fingerprint


@pytest.mark.parametrize("suffix", [".json", ".graphml"])
def test_graph_round_trip(tagger_capture, tmp_path, suffix):
    g = tagger_capture.graph.copy()
    g.nodes["fc"]["time"] = {"cpu": 1.5e-5, "cuda": 2e-6}
    g.nodes["fc"]["fwd_time"] = {"cpu": 1e-5, "cuda": 1e-6}
    g.nodes["fc"]["bwd_time"] = {"cpu": 0.5e-5, "cuda": 1e-6}
    g.graph["profiled_kinds"] = ["cpu", "cuda"]
    path = save_graph(g, tmp_path / f"graph{suffix}")
    back = load_graph(path)
    assert list(back.nodes) == list(g.nodes)
    assert set(back.edges) == set(g.edges)
    for n in g.nodes:
        assert back.nodes[n] == g.nodes[n], n
    for u, v in g.edges:
        assert back.edges[u, v] == g.edges[u, v]
    assert back.graph == g.graph


def test_graph_io_errors(tmp_path):
    with pytest.raises(GraphError, match=r"\.json"):
        save_graph(nx.DiGraph(), tmp_path / "g.txt")
    with pytest.raises(GraphError, match="does not exist"):
        load_graph(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraphError, match="cannot read graph file"):
        load_graph(bad)


def test_hugging_face_gpt2_comes_through_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.eval()
    tokens = torch.randint(0, 100, (2, 8))
    cap = capture(model, (tokens,), name="gpt2-tiny")
    assert cap.method == "export"
    g = cap.graph
    modules = {d["module"] for d in g.nodes.values()}
    assert {"transformer.h.0.attn", "transformer.h.1.mlp.c_fc", "transformer.ln_f", "lm_head"} <= modules
    assert sum(d["param_bytes"] for d in g.nodes.values()) == sum(
        p.numel() * 4 for p in model.parameters())
    assert sum(d["flops"] for d in g.nodes.values()) > 2 * 2 * 8 * sum(
        p.numel() for n, p in model.named_parameters() if "h." in n and p.dim() == 2)
    # Captured for training (dropout on), the user's eval mode restored; same seed, same numbers.
    assert not model.training
    torch.manual_seed(1)
    placed_logits = cap.gm(tokens).logits
    torch.manual_seed(1)
    assert torch.allclose(placed_logits, model.train()(tokens).logits, atol=1e-5)


def test_flops_formulas_for_attention_and_transposed_conv():
    from graphs.flops import attention_flops, conv_flops, einsum_flops

    # softmax(q k^T) v with batch 2, heads 3, L=5, S=7, E=4: two matmuls + ~3 per score
    assert attention_flops((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)) == 2 * 3 * 5 * 7 * (2 * 4 + 2 * 4 + 3)
    # transposed conv: weight [C_in=4, C_out=6, 3, 3] does 6*9 MACs per input element
    assert conv_flops((1, 4, 5, 5), (1, 6, 7, 7), (4, 6, 3, 3), bias=False, transposed=True) == 2 * 100 * 54
    assert einsum_flops("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)], (2, 3, 5)) == 2 * 30 * 4


def test_sdpa_and_multihead_attention_nodes():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, q):
            out, _ = self.mha(q, q, q)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q) + out

    cap = capture(Attn(), (torch.randn(2, 5, 8),))
    g = cap.graph
    assert g.nodes["scaled_dot_product_attention"]["flops"] == 2 * 5 * 5 * (2 * 8 + 2 * 8 + 3)
    proj = 4 * (2 * (2 * 5 * 8) * 8 + 2 * 5 * 8)  # q, k, v and output projections
    attention = 2 * 2 * 5 * 5 * (2 * 4 + 2 * 4 + 3)  # 2 batches x 2 heads of head_dim 4
    assert g.nodes["mha"]["flops"] == proj + attention


def test_multihead_self_attention_with_masks_counts_query_key_value_not_the_masks():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, h, pad):
            causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
            out, _ = self.mha(h, h, h, key_padding_mask=pad, attn_mask=causal, need_weights=False)
            return out

    cap = capture(Masked(), (torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)))
    proj = 4 * (2 * (2 * 5 * 8) * 8 + 2 * 5 * 8)
    attention = 2 * 2 * 5 * 5 * (2 * 4 + 2 * 4 + 3)
    assert cap.graph.nodes["mha"]["flops"] == proj + attention


def test_shapes_fall_back_to_real_tensors_for_data_dependent_shapes():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.norm(x)
            return y[y > 0].sum()  # output size depends on values: no fake-tensor shape

    model = Masked()
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, 2.0, -3.0, 1.5], [0.3, 0.2, -0.1, 4.0]])
    cap = capture(model, (x,))
    assert cap.method == "fx" and cap.shapes_from == "real"
    getitem = next(n for n, d in cap.graph.nodes(data=True) if d["target"] == "operator.getitem")
    assert cap.graph.nodes[getitem]["shape"] == [int((model.norm(x) > 0).sum())]
    model.norm.running_mean.zero_()
    capture(model, (x,))
    assert torch.equal(model.norm.running_mean, torch.zeros(4))  # real run left no trace


def test_recurrent_flops_agree_between_fx_and_export():
    from graphs.capture import propagate_shapes
    from graphs.export_tracer import export_trace
    from graphs.fx_tracer import fx_trace
    from graphs.placement_graph import build_placement_graph

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, 2, batch_first=True)
            self.cell = nn.LSTMCell(16, 16)
            self.gru = nn.GRU(16, 16)

        def forward(self, x):
            h, _ = self.lstm(x)
            c = self.cell(h[:, 0])[0]
            g, _ = self.gru(h)
            return c, g

    model, x = Recurrent(), torch.randn(3, 5, 8)
    gm = fx_trace(model)
    propagate_shapes(gm, (x,))
    by_fx = build_placement_graph(gm, name="r", method="fx", fingerprint="-")
    by_export = build_placement_graph(export_trace(model, (x,)), name="r", method="export",
                                      fingerprint="-", trust_requires_grad=False)
    assert by_export.nodes["lstm"]["flops"] == by_fx.nodes["lstm"]["flops"] > 0
    assert by_export.nodes["lstm_cell"]["flops"] == by_fx.nodes["cell"]["flops"] > 0
    assert by_export.nodes["gru"]["flops"] == by_fx.nodes["gru"]["flops"] > 0


# --------------------------------------------------------------------------- state updated in forward()


class _Counting(nn.Module):
    """An EMA and a call counter updated in place in forward(), and a buffer forward() never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("unused", torch.ones(2))

    def forward(self, x):
        y = self.lin(x)
        self.ema.mul_(0.9).add_(0.1 * y.detach().mean(0))
        self.calls.add_(1)
        return y + self.ema


def test_buffers_updated_in_place_in_forward_are_captured_and_the_model_is_left_untouched():
    model, x = _Counting(), torch.randn(3, 4)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    updates = {(n.target, n.args[0].name) for n in cap.gm.graph.nodes if n.op == "call_method" and n.target.endswith("_")}
    assert ("mul_", "ema") in updates and ("add_", "calls") in updates
    assert model.calls.item() == 0 and torch.equal(model.ema, torch.zeros(4))  # tracing ran nothing
    ref = _Counting()
    ref.load_state_dict(model.state_dict())
    for _ in range(3):
        assert torch.equal(cap.gm(x), ref(x))
    assert model.calls.item() == 3  # the captured graph shares the model's state, as fx does


def test_the_captured_models_state_dict_round_trips_into_the_original():
    model = _Counting()
    cap = capture(model, (torch.randn(3, 4),))
    assert set(cap.gm.state_dict()) == set(model.state_dict())  # `unused` included
    _Counting().load_state_dict(cap.gm.state_dict(), strict=True)


class _ReassignsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.lin(x) * self.calls


class _ListHeldBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4))
        self.held = [self.ema]

    def forward(self, x):
        self.held[0].mul_(0.5)
        return self.lin(x) + self.held[0]


class _PythonCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.steps = 0

    def forward(self, x):
        self.steps += 1
        return self.lin(x)


def test_a_reassigned_buffer_is_captured_by_export_not_lost_by_fx():
    model, x = _ReassignsBuffer(), torch.randn(2, 4)
    cap = capture(model, (x,))
    assert cap.method == "export" and "self.calls = self.calls + 1" in cap.fx_error
    assert isinstance(model.calls, torch.Tensor) and model.calls.item() == 0
    ref = copy.deepcopy(model)
    for _ in range(3):
        assert torch.equal(cap.gm(x), ref(x))


@pytest.mark.parametrize("model_type, line", [
    (_ListHeldBuffer, "self.held[0].mul_(0.5)"),
    (_PythonCounter, None),
])
def test_an_update_no_tracer_records_is_refused_naming_it(model_type, line):
    model = model_type()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 4),))
    message = str(info.value)
    assert "second step" in message
    assert ("'ema'" in message and line in message) if line else "'steps'" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert getattr(model, "steps", 0) == 0


class _NoGradScale(nn.Module):
    """A scale computed under ``torch.no_grad()``: it must carry no gradient once captured."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            scale = h.abs().mean()
        return self.b(h / (1 + scale))


def test_a_no_grad_region_keeps_its_gradients_out_of_the_captured_graph():
    torch.manual_seed(0)
    model, x = _NoGradScale(), torch.randn(3, 4)
    reference = copy.deepcopy(model)  # its own parameters: the graph may share the model's
    cap = capture(model, (x,))
    assert cap.method == "export" and "no_grad" in (cap.fx_error or "")  # fx drops the region
    reference(x).sum().backward()
    cap.gm(x).sum().backward()
    theirs = dict(cap.gm.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(theirs[name].grad, p.grad, rtol=0, atol=0)


class _InputStatisticNoGrad(nn.Module):
    """A statistic of the input under no_grad (no parameter read there), then BatchNorm and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        with torch.no_grad():
            s = x.std()
        return self.drop(self.bn(self.a(x / s)))


def test_a_no_grad_region_reading_no_parameter_stays_with_fx_and_follows_eval():
    torch.manual_seed(0)
    model, x = _InputStatisticNoGrad(), torch.randn(6, 4)
    cap = capture(model, (x,))
    assert cap.method == "fx", cap.fx_error  # torch.export's graph would keep training mode
    cap.gm.eval()
    model.eval()
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)


class _EvalCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.evaluated = 0

    def forward(self, x):
        if not self.training:
            self.evaluated += 1  # eval mode only: the training trace cannot see it
        return self.a(x)


class _ExportedEvalCounter(_EvalCounter):
    def forward(self, x):
        x = torch.stack([row for row in x])  # torch.export captures it
        return super().forward(x)


@pytest.mark.parametrize("cls", [_EvalCounter, _ExportedEvalCounter])
def test_tracing_the_eval_mode_leaves_the_models_state_as_it_was(cls):
    model = cls()
    cap = capture(model, (torch.randn(3, 4),))
    assert cap.method == ("fx" if cls is _EvalCounter else "export")
    assert model.evaluated == 0 and model.training


class _AugmentedAssignments(nn.Module):
    """``h += ...`` and ``h *= ...`` on a tensor that a view and a second name still read afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        t = h.t()
        skip = h
        h += self.b(x)
        h *= 0.5
        width = x.size(1)
        columns = width
        columns -= 4  # a number: the sum is new, width keeps its value
        return self.c(t.t() + skip) + h[:, :columns].sum() + width


def test_an_augmented_assignment_updates_the_tensor_in_place_as_the_model_does():
    torch.manual_seed(0)
    model, x = _AugmentedAssignments(), torch.randn(6, 8)
    cap = capture(model, (x,))
    assert cap.method == "fx", cap.fx_error
    assert [n.target.__name__ for n in cap.gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__module__", "") == "graphs.ops"] == ["iadd", "imul", "isub"]
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)
    reference = copy.deepcopy(model)
    reference(x).sum().backward()
    cap.gm(x).sum().backward()
    theirs = dict(cap.gm.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(theirs[name].grad, p.grad, rtol=0, atol=0)
    # a captured graph is pickled to worker processes and saved with torch.save
    torch.testing.assert_close(pickle.loads(pickle.dumps(cap.gm))(x), model(x), rtol=0, atol=0)


def test_an_augmented_assignment_stays_with_the_tensor_it_updates_in_the_groups():
    from graphs.grouping import group_graph

    torch.manual_seed(0)
    cap = capture(_AugmentedAssignments(), (torch.randn(6, 8),))
    grouping = group_graph(cap.graph, gm=cap.gm)
    assert grouping.op_to_group["iadd"] == grouping.op_to_group["imul"] == grouping.op_to_group["a"]


class _AutocastInForward(nn.Module):
    """Part of forward() under ``torch.autocast`` to bfloat16, as mixed-precision models do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.relu(self.a(x))
        return self.b(h.float())


def test_an_autocast_region_in_forward_is_captured_with_its_dtype():
    torch.manual_seed(0)
    model, x = _AutocastInForward(), torch.randn(6, 8)
    cap = capture(model, (x,))
    assert cap.method == "export" and "autocast" in (cap.fx_error or ""), cap.fx_error
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)


def test_a_model_captured_under_the_callers_autocast_stays_with_fx():
    torch.manual_seed(0)
    model, x = _AugmentedAssignments(), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = capture(model, (x,))
        assert cap.method == "fx", cap.fx_error
        torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)


class _ResidualAugmented(nn.Module):
    """``out += identity`` at the end of a residual block: nothing reads ``out``'s old value again."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        out = self.a(x)
        out += self.b(x)
        return out


def test_an_augmented_assignment_whose_old_value_nobody_reads_is_recorded_out_of_place():
    # a stage runtime hands a stage its inputs as fresh autograd leaves, which refuse an in-place update
    torch.manual_seed(0)
    model, x = _ResidualAugmented(), torch.randn(6, 8)
    cap = capture(model, (x,))
    calls = [n.target for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert calls == [operator.add]
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)


def test_forward_hooks_on_the_model_itself_are_captured_with_it():
    # fx traces forward(), not the call: a hook on the model itself was left out of the graph
    torch.manual_seed(0)
    model, x = _ResidualAugmented(), torch.randn(6, 8)
    model.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    model.register_forward_hook(lambda module, args, output: output - 1.0)
    cap = capture(model, (x,))
    assert cap.method == "export" and "forward hook(s) of its own" in (cap.fx_error or ""), cap.fx_error
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)


def _triple_input_gradient(module, grad_input, grad_output):
    return (grad_input[0] * 3.0,)


def _halve(grad):
    return grad * 0.5


class _Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.f(x))


class _GradientHooked(nn.Module):
    """A backward hook on a submodule fx would trace through, and a gradient hook forward() registers."""

    def __init__(self, block_hook: bool = True, tensor_hook: bool = False) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.block = _Tanh()
        self.out = nn.Linear(8, 2)
        if block_hook:
            self.block.register_full_backward_hook(_triple_input_gradient)
        self.tensor_hook = tensor_hook

    def forward(self, x):
        h = self.pre(x)
        if self.tensor_hook:
            h.register_hook(_halve)  # fx cannot trace it (a function as an argument)
        return self.out(self.block(h))


def _same_gradients(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> None:
    reference = copy.deepcopy(model)
    reference(x).square().sum().backward()
    gm(x).square().sum().backward()
    theirs = dict(gm.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(theirs[name].grad, p.grad, rtol=0, atol=0, msg=name)


def test_backward_hooks_of_a_submodule_run_in_the_captured_graph():
    torch.manual_seed(0)
    model, x = _GradientHooked(), torch.randn(6, 8)
    cap = capture(model, (x,))
    assert cap.method == "fx", cap.fx_error
    assert "block" in [n.target for n in cap.gm.graph.nodes if n.op == "call_module"]  # kept whole
    _same_gradients(model, cap.gm, x)


def test_gradient_hooks_the_graph_would_lose_are_refused():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    with pytest.raises(CaptureError, match=r"Tensor.register_hook\), which torch.export leaves out"):
        capture(_GradientHooked(block_hook=False, tensor_hook=True), (x,))
    with pytest.raises(CaptureError, match=r"module 'block' has backward hooks"):
        capture(_GradientHooked(tensor_hook=True), (x,))  # fx cannot trace it, so it is not kept whole
    model = _GradientHooked(block_hook=False)
    model.register_full_backward_hook(_triple_input_gradient)
    with pytest.raises(CaptureError, match="backward hooks on its own module"):
        capture(model, (x,))


class _ReverseGradient(torch.autograd.Function):
    """The identity forward, a backward of its own (a gradient reversal layer)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -0.5 * grad


class _Reversal(nn.Module):
    def forward(self, x):
        return _ReverseGradient.apply(x)


class _Adversarial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.reverse = _Reversal()
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.reverse(self.a(x))))


def test_a_custom_autograd_function_keeps_its_own_backward_called_inline_or_in_a_leaf():
    # torch.export traced the Function's forward and differentiated that: its backward was lost.
    # fx records the call whole (graphs.autograd_functions); a leaf module calls it whole too.
    torch.manual_seed(0)
    model, x = _Adversarial(), torch.randn(6, 8)
    for leaves in ([], ["reverse"]):
        model.zero_grad(set_to_none=True)
        cap = capture(model, (x,), leaf_modules=leaves)
        assert cap.method == "fx", cap.fx_error
        _same_gradients(model, cap.gm, x)


class _Options(nn.Module):
    """Arguments that are not tensors, and an optional mask: fx cannot trace the branches, torch.export bakes them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x, mask=None, scale=2, flag=True):
        h = self.a(x) * scale
        if mask is not None:
            h = h * mask
        if flag:
            h = torch.relu(h)
        return self.b(h)


def test_an_exported_graph_refuses_inputs_whose_baked_values_differ_from_the_examples():
    # called with scale=5 the graph computed with the example's 3, and ignored a mask, silently
    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    model, x = _Options(), torch.randn(6, 8)
    cap = capture(model, (x, None, 3, False))
    assert cap.method == "export"
    placed = apply_placement(cap, {n.name: "cpu" for n in cap.gm.graph.nodes})
    for module in (cap.gm, placed):
        torch.testing.assert_close(module(x[:3], None, 3, False), model(x[:3], None, 3, False))  # tensors may change
        torch.testing.assert_close(module(x, None, scale=3, flag=False), model(x, None, 3, False))
        with pytest.raises(CaptureError, match="these inputs differ: 3 became 5"):
            module(x, None, 5, False)
        with pytest.raises(CaptureError, match="False became True"):
            module(x, None, 3, flag=True)
        with pytest.raises(CaptureError, match=r"None became a tensor\[6, 8\]"):
            module(x, torch.rand(6, 8), 3, False)


def test_copies_of_an_exported_graph_still_refuse_other_baked_inputs():
    """The refusal is a forward pre-hook, which fx's rebuilds drop: a copy or an EMA deep copy of
    the placed model computed with the example's scale again, silently. (fx cannot unpickle a
    torch.export graph at all: its tracer needs an argument fx's rebuild does not give.)"""
    from envs.runtime.apply import apply_placement

    model, x = _Options(), torch.randn(6, 8)
    placed = apply_placement(capture(model, (x, None, 3, False)), {})
    for twin in (copy.copy(placed), copy.deepcopy(placed)):
        torch.testing.assert_close(twin(x, None, 3, False), model(x, None, 3, False))
        with pytest.raises(CaptureError, match="these inputs differ: 3 became 5"):
            twin(x, None, 5, False)


class _EvalStash(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if not self.training:
            self.last = h.detach()  # eval mode only: a new Python attribute
        return h


class _ExportedEvalStash(_EvalStash):
    def forward(self, x):
        x = torch.stack([row for row in x])  # torch.export captures it
        return super().forward(x)


@pytest.mark.parametrize("cls", [_EvalStash, _ExportedEvalStash, _EvalCounter])
def test_an_attribute_set_only_in_eval_mode_stays_off_the_model_and_refuses_eval_mode(cls):
    """The eval-mode trace left fx's Proxy on the user's model as 'last' (it no longer pickled),
    and the placed model evaluated without setting it or counting (review)."""
    import pickle

    from envs.runtime.apply import apply_placement
    from graphs.errors import CaptureError

    model, x = cls(), torch.randn(3, 4)
    cap = capture(model, (x,))
    assert "last" not in vars(model) and getattr(model, "evaluated", 0) == 0
    pickle.dumps(model)
    placed = apply_placement(cap, {})
    placed(x)
    placed.eval()
    with pytest.raises(CaptureError, match="Python attribute '(last|evaluated)' in eval mode"):
        placed(x)


class _EvalOnlySetitem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x):
        h = self.a(x)
        if not self.training:
            self.seen[0] = h.sum()  # item assignment on a Proxy: fx refuses it, placer records operator.setitem
        return h


class _EvalOnlyNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if not self.training:
            h = torch.from_numpy(h.detach().numpy() * 2)  # neither fx nor torch.export traces numpy
        return h


def test_eval_mode_refused_because_neither_tracer_can_trace_it_says_why():
    """The refusal said 'in eval mode it cannot be traced, or a value changes from one trace to
    the next', not which (review); it names what each tracer met."""
    from envs.runtime.apply import apply_placement

    model, x = _EvalOnlyNumpy(), torch.randn(3, 4)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    placed = apply_placement(cap, {})
    placed.eval()
    with pytest.raises(CaptureError, match=r"cannot trace forward\(\) in eval mode \(TypeError: .*\), nor "
                                           r"torch.export capture it \(RuntimeError: .numpy\(\)"):
        placed(x)


class _EvalOnlyLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.bn(self.a(x))
        if not self.training:
            h = torch.stack([row * 2 for row in h])  # fx cannot iterate over a Proxy; torch.export unrolls it
        return h


def test_a_model_fx_cannot_trace_in_eval_mode_evaluates_the_graph_torch_export_captures_in_eval_mode():
    """Refused before, which stopped every validation pass of such a model (walkthrough). The
    exported graph holds the example's shapes (its loop is unrolled over 3 rows): inputs of
    other shapes are refused, not run over the example's. Copies and pickles follow."""
    import copy
    import pickle

    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    for model_type in (_EvalOnlyLoop,):
        model, x = model_type(), torch.randn(3, 4)
        cap = capture(model, (x,))
        assert cap.method == "fx"
        placed = apply_placement(cap, alternating_placement(cap.graph),
                                 real_devices={"gpu0": "cpu", "gpu1": "cpu"})
        torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)  # a training step: BatchNorm's statistics
        placed.eval(), model.eval()
        with torch.no_grad():
            torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
        assert placed.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(placed.state_dict()[key], value, rtol=0, atol=0, msg=key)
        for twin in (copy.copy(placed), copy.deepcopy(placed), pickle.loads(pickle.dumps(placed))):
            with torch.no_grad():
                torch.testing.assert_close(twin.eval()(x), model(x), rtol=0, atol=0)
            with pytest.raises(CaptureError, match=r"input 0 has shape \(5, 4\) where the example had \(3, 4\)"):
                twin(torch.randn(5, 4))
        placed.train(), model.train()
        x5 = torch.randn(5, 4)  # the training graph is fx's: any batch size
        torch.testing.assert_close(placed(x5), model(x5), rtol=0, atol=0)


class _CachedMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.mask = None

    def forward(self, x):
        if self.mask is None:  # a tensor forward() caches on its first call, in either mode
            self.mask = torch.ones(4) * 0.5
        return self.a(x) * self.mask


class _CarriedState(nn.Module):
    """Truncated backpropagation through time with the hidden state kept on the module, beside a
    causal mask cached by its size (the same at every call)."""

    def __init__(self, export: bool = False, carry: bool = True) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.h = None
        self.mask = None
        self.export, self.carry = export, carry

    def forward(self, x):
        if self.export:
            with torch.no_grad():  # reads a parameter: torch.export captures the model
                x = x * self.rnn.weight_ih_l0.abs().mean()
        if self.mask is None:
            self.mask = torch.tril(torch.ones(x.size(1), x.size(1)))
        out, h = self.rnn(self.mask @ x, self.h)
        if self.carry:
            self.h = h.detach()
        return out


@pytest.mark.parametrize("export", [False, True])
def test_state_forward_carries_to_the_next_call_in_a_python_attribute_is_refused(export):
    """The tracers trace the first call (self.h None) and no graph holds a Python attribute: the
    placed model started every batch from a zero state where the original carried the last one
    (walkthrough: outputs 0.024 off from the second batch under fx, 0.005 under torch.export, no
    error). The cached mask alone is the same at every call: captured."""
    with pytest.raises(CaptureError, match="keeps 'h' as a Python attribute"):
        capture(_CarriedState(export), (torch.randn(2, 3, 4),))
    assert capture(_CarriedState(export, carry=False), (torch.randn(2, 3, 4),)).method == ("export" if export else "fx")


class _PrunedBlock(nn.Module):
    """A block fx traces through, pruned: prune's forward pre-hook sets ``w`` from ``w_orig`` and
    ``w_mask`` before forward() reads it, at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


def test_a_python_attribute_forward_sets_before_reading_it_is_the_calls_own_and_is_captured():
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model, x = nn.Sequential(_PrunedBlock(), nn.Tanh()), torch.randn(3, 4)
    prune.l1_unstructured(model[0], "w", 0.5)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        model[0].w_orig.add_(1.0)  # a training step: the graph recomputes w from w_orig
    torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)


def test_a_tensor_forward_caches_stays_off_the_model_and_the_placed_model_follows_eval():
    """The training trace left the cached tensor on the user's model, so the eval trace read it
    as an attribute ('mask') where the graph had a constant: eval mode was refused as 'another
    graph at every trace' (review)."""
    from envs.runtime.apply import apply_placement

    model, x = _CachedMask(), torch.randn(3, 4)
    placed = apply_placement(capture(model, (x,)), {})
    assert model.mask is None
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)


def test_a_model_annotated_under_postponed_evaluation_pickles():
    """``from __future__ import annotations`` makes forward's annotations strings; fx wrote them
    as globals of its code, and pickling the captured or placed model failed ('str' object has
    no attribute '__name__')."""
    import pickle

    from tests.helpers.eval_models import StochasticDepth

    assert isinstance(StochasticDepth.forward.__annotations__["x"], str)
    model, x = StochasticDepth(), torch.randn(6, 8)
    cap = capture(model, (x,))
    model.eval()
    twin = pickle.loads(pickle.dumps(cap.gm))
    torch.testing.assert_close(twin.eval()(x), model(x), rtol=0, atol=0)


class _FixedShapeNoise(nn.Module):
    """Noise of a fixed shape: ``torch.randn(8, 16)`` reads nothing of the model's data."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 4)

    def forward(self, x):
        return self.a(x + 0.1 * torch.randn(8, 16))


def test_a_random_draw_that_reads_no_input_draws_anew_at_every_call():
    """fx baked such a draw into a constant: the same noise at every step, with no error."""
    torch.manual_seed(0)
    model, x = _FixedShapeNoise(), torch.randn(8, 16)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    assert [n.target for n in cap.gm.graph.nodes if n.op == "call_function"][0] is torch.randn
    torch.manual_seed(1)
    first, second = cap.gm(x), cap.gm(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x)) and torch.equal(second, model(x))
    assert not torch.equal(first, second)


class _DrawsFromConstants(nn.Module):
    """Random draws that read no input: of a plain tensor attribute (a keep probability), of a
    ``torch.tensor`` made in forward (in place too), and a mixup weight from a Beta of floats."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 4)
        self.keep = torch.full((16,), 0.7)  # a plain attribute, not a buffer

    def forward(self, x):
        mask = torch.bernoulli(self.keep)
        noise = torch.tensor([0.0, 0.0, 0.0, 0.0]).normal_()
        lam = torch.distributions.Beta(0.4, 0.4).sample()
        return self.a(x * mask) * lam + noise


def test_a_random_draw_of_constants_draws_anew_at_every_call():
    """fx ran such a draw once at trace time and kept its numbers as a constant: the same mask,
    noise and mixup weight at every step (found by trying: outputs 0.68 off the original's)."""
    torch.manual_seed(0)
    model, x = _DrawsFromConstants(), torch.randn(8, 16)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    torch.manual_seed(1)
    first, second = cap.gm(x), cap.gm(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x)) and torch.equal(second, model(x))
    assert not torch.equal(first, second)


class _LayerDrop(nn.Module):
    """Python's random in forward: a layer skipped with probability 0.5, a mixup weight of numpy."""

    def __init__(self, draw: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.draw = draw
        self.rng = random.Random(0)

    def forward(self, x):
        h = self.a(x)
        if self.draw == "random" and random.random() < 0.5:
            h = h * 0
        if self.draw == "numpy":
            h = h * float(np.random.beta(0.4, 0.4))
        if self.draw == "own":
            h = h * self.rng.uniform(0.5, 1.5)
        return self.b(h)


@pytest.mark.parametrize("draw, named", [("random", "random.random()"), ("numpy", "numpy.random.beta()"),
                                         ("own", "another graph at every trace")])
def test_a_python_random_draw_in_forward_is_refused(draw, named):
    """A trace ran the draw once and the graph kept its branch or its number: the placed model
    trained with one value for good (walkthrough: outputs 0.52 off); only eval mode was refused,
    and only where two traces happened to differ. torch.export would bake it too."""
    with pytest.raises(CaptureError, match=named.replace("(", r"\(").replace(")", r"\)")):
        capture(_LayerDrop(draw), (torch.randn(4, 8),))


def test_a_random_draw_with_a_generator_of_its_own_goes_to_torch_export():
    class OwnGenerator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 4)
            self.g = torch.Generator().manual_seed(3)

        def forward(self, x):
            return self.a(x + torch.randn(8, 16, generator=self.g))

    cap = capture(OwnGenerator(), (torch.randn(8, 16),))
    assert cap.method == "export" and "generator of its own" in (cap.fx_error or "")


def test_a_draw_sized_by_the_input_with_a_generator_of_its_own_is_exported_at_the_example_size():
    """The symbolic-batch export fails on such a draw, and it left dynamo's marks on the example
    input (``_dynamo_dynamic_indices``), so the static export after it traced the batch as
    symbolic too and failed the same way ("SymIntArrayRef expected to contain only concrete
    integers"): the model could not be captured at all."""
    class SizedDraw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 4)
            self.g = torch.Generator().manual_seed(3)

        def forward(self, x):
            return self.a(x + torch.randn(x.shape, generator=self.g))

    x = torch.randn(8, 16)
    cap = capture(SizedDraw(), (x,))
    assert cap.method == "export"
    assert not [name for name in vars(x) if "dynamo" in name]  # the user's input is left as it was


class _Annealed(nn.Module):
    """A temperature the training loop anneals (``model.block.tau *= 0.9``), a count and a flag
    forward() reads, and a number it never reads."""

    def __init__(self, to_export: bool = False) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.a = nn.Linear(8, 8)
        self.block.tau = 1.0
        self.k = 2
        self.sharpen = False
        self.offset = torch.zeros(8)  # a plain tensor, not a buffer
        self.unread = 0.5
        self.to_export = to_export  # iterating over a tensor sends the capture to torch.export
        self.scales = (1.0, 1.0)
        self.margin = None
        self.opts = {"act": "softmax"}

    def forward(self, x):
        if self.to_export:
            x = torch.stack([row for row in x])
        h = self.block.a(x + self.offset) * self.scales[0] * self.scales[1]
        h = torch.softmax(h / self.block.tau, -1) if self.opts["act"] == "softmax" else torch.sigmoid(h)
        if self.sharpen:
            h = h * h
        if self.margin is not None:
            h = h - self.margin
        return h.topk(self.k, dim=-1).values


@pytest.mark.parametrize("to_export", [False, True])
def test_setting_a_python_value_the_graph_baked_in_is_refused_on_the_placed_model_and_its_copies(to_export):
    """fx and torch.export compute with the value read while tracing: an annealed temperature,
    a top-k count or a flag set on the placed model changed nothing, with no error; so did a
    tuple of scales, a margin that was None and a dict of options (walkthrough: outputs 1.6 off)."""
    from envs.runtime.apply import apply_placement

    model, x = _Annealed(to_export), torch.randn(4, 8)
    cap = capture(model, (x,))
    assert cap.method == ("export" if to_export else "fx")
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    assert model.block.tau == 1.0 and "tau" in vars(model.block)  # the user's model is as it was
    placed.unread = 0.25  # forward never read it: nothing baked, nothing to refuse
    placed(x)
    placed.eval(), placed(x), placed.train()  # the training flag is eval mode's to follow
    for twin in (placed, copy.deepcopy(placed), pickle.loads(pickle.dumps(placed))):
        twin.block.tau = 0.5
        with pytest.raises(CaptureError, match=r"block\.tau was 1\.0 when placer captured the model.*now 0\.5"):
            twin(x)
        twin.block.tau = 1.0
        twin(x)
    for name, value, now in (("k", 1, "1"), ("sharpen", True, "True"), ("offset", torch.ones(8), r"another a tensor\[8\]"),
                             ("scales", (2.0, 1.0), r"\(2\.0, 1\.0\)"), ("margin", 0.1, "0.1"),
                             ("opts", {"act": "sigmoid"}, "{'act': 'sigmoid'}")):
        setattr(placed, name, value)
        with pytest.raises(CaptureError, match=rf"{name} was .* now {now}"):
            placed(x)
        delattr(placed, name)


class _ScatterIntoFresh(nn.Module):
    """Sums rows into a buffer forward() makes anew at each call (``torch.zeros(3, 8)``), and
    writes into two more by item assignment and ``+=``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x, idx):
        out = torch.zeros(3, 8)
        out.index_add_(0, idx, self.a(x))
        head = torch.zeros(3, 16)
        head[:, :8] = out
        total = torch.ones(3, 16)
        total += head
        return total, head


def test_a_tensor_forward_makes_from_constants_and_updates_in_place_is_fresh_at_every_call():
    """fx kept it as one constant: the sums piled up from call to call, with no error."""
    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    model, x, idx = _ScatterIntoFresh(), torch.randn(4, 8), torch.tensor([0, 1, 1, 2])
    cap = capture(model, (x, idx))
    assert cap.method == "fx"
    placed = apply_placement(cap, {n: ("cpu:0" if i % 2 else "cpu:1") for i, n in enumerate(cap.graph.nodes)},
                             real_devices={"cpu:0": "cpu", "cpu:1": "cpu"})
    for run in (cap.gm, placed):
        first, second = run(x, idx), run(x, idx)
        assert all(a is not b for a, b in zip(first, second))
        torch.testing.assert_close(first, model(x, idx), rtol=0, atol=0)
        torch.testing.assert_close(second, model(x, idx), rtol=0, atol=0)
    (first[0].sum() + first[1].sum()).backward()
    assert placed.a.weight.grad is not None


class _MeanTeacher(nn.Module):
    """A target network updated in place under no_grad in forward(), reached through .parameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.online, self.target, self.head = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 4)
        self.target.requires_grad_(False)

    def forward(self, x):
        p = self.head(self.online(x))
        with torch.no_grad():
            for t, o in zip(self.target.parameters(), self.online.parameters()):
                t.mul_(0.9).add_(o.detach(), alpha=0.1)
            z = self.target(x)
        return (p - z).square().mean()


def _assert_trains_like(reference: nn.Module, placed: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Three SGD steps of each on its own loss (the model's output) give the same losses, bit for bit."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, placed)]
    for _ in range(steps):
        losses = [m(x) for m in (reference, placed)]
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


def test_capture_leaves_a_parameter_forward_updates_in_place_untouched_and_the_graph_updates_it():
    """fx ran the update on the user's model at every trace and only buffers were put back: the
    teacher was left updates ahead. It is refused before it runs; torch.export records it."""
    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    model, x = _MeanTeacher(), torch.randn(5, 8)
    before = copy.deepcopy(model)
    cap = capture(model, (x,))
    assert cap.method == "export" and "would have run once while tracing" in (cap.fx_error or "")
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        assert torch.equal(p, q), name
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    _assert_trains_like(before, placed, x)
    torch.testing.assert_close(placed.target.weight, before.target.weight, rtol=0, atol=0)


def test_item_assignment_is_traced_by_fx_in_either_mode():
    """``self.seen[0] = h.sum()`` in eval mode only: fx refused item assignment on a Proxy, so
    eval mode went to an exported graph of the example's shapes; now fx records it, and a
    validation batch of another size runs, the buffer's update included."""
    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    model, x = _EvalOnlySetitem(), torch.randn(3, 4)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    placed = apply_placement(cap, alternating_placement(cap.graph),
                             real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    placed.eval(), model.eval()
    for batch in (x, torch.randn(5, 4)):
        with torch.no_grad():
            torch.testing.assert_close(placed(batch), model(batch), rtol=0, atol=0)
        torch.testing.assert_close(placed.seen, model.seen, rtol=0, atol=0)


class _ScaledConstant(nn.Module):
    """A ``torch.tensor`` of constants scaled in place by the data, then used in Python."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        scale = torch.tensor([1.0, 2.0, 3.0])
        scale.mul_(self.a(x).sum())
        return x * scale[None, :]


def test_a_constant_tensor_updated_by_the_data_is_captured_by_torch_export():
    """fx recorded the update on the constant while scale[None, :] ran at trace time on the old
    values: the model ignored its weights, with no error."""
    torch.manual_seed(0)
    model, x = _ScaledConstant(), torch.randn(4, 3)
    cap = capture(model, (x,))
    assert cap.method == "export" and "made from constants alone" in (cap.fx_error or "")
    for batch in (x, torch.randn(4, 3)):
        torch.testing.assert_close(cap.gm(batch), model(batch), rtol=0, atol=0)


class _InitialState(nn.Module):
    """An RNN's initial state and a mask sized by the batch (``torch.zeros(x.size(0), 16)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.out = nn.GRUCell(6, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.zeros(x.size(0), 16)
        for t in range(3):
            h = self.cell(x[:, t], h)
        return self.out(h * torch.ones(x.shape[0], 1))


def test_a_tensor_sized_by_the_batch_is_traced_by_fx_and_follows_the_batch_size():
    """torch refuses a Proxy inside a size before fx sees the call, so such a model went to
    torch.export, whose graph bakes the example's batch of 8: a batch of 1 was refused, and
    the mask broadcast it to 8 rows."""
    torch.manual_seed(0)
    model = _InitialState()
    cap = capture(model, (torch.randn(8, 3, 6),))
    assert cap.method == "fx"
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 6)
        torch.testing.assert_close(cap.gm(x), model(x), rtol=0, atol=0)
    assert torch.zeros.__name__ == "zeros" and type(torch.zeros).__name__ == "builtin_function_or_method"


class _ExportedSizedByBatch(nn.Module):
    """torch.export captures it (iterating over a tensor); its mask is sized by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.stack([row for row in x])
        return self.bn(self.a(x)) * torch.ones(x.shape[0], 1)


class _ExportedAnyBatch(nn.Module):
    """torch.export captures it (iterating over a tensor's columns); no size of the batch is used."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.a(torch.stack([column * 2 for column in x.unbind(1)], 1)))


def test_an_exported_graph_that_holds_the_batch_size_refuses_another_and_one_that_does_not_runs_it():
    """The exported graph bakes the example's sizes: a batch of 3 broadcast to the example's 8
    rows with no error. Checked at capture on a batch of 9 (the user's state put back)."""
    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    for model_type, generic in ((_ExportedSizedByBatch, False), (_ExportedAnyBatch, True)):
        model, x = model_type(), torch.randn(8, 6)
        before = copy.deepcopy(model.state_dict())
        cap = capture(model, (x,))
        assert cap.method == "export"
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
        small = torch.randn(3, 6)
        for run in (cap.gm, placed, copy.deepcopy(placed)):
            torch.testing.assert_close(run(x), model(x), rtol=0, atol=0)
            if generic:
                torch.testing.assert_close(run(small), model(small), rtol=0, atol=0)
            else:
                with pytest.raises(CaptureError, match=r"input 0 has shape \(3, 6\) where the example had \(8, 6\)"):
                    run(small)


def test_a_teacher_updated_inside_an_exported_no_grad_region_is_updated_where_it_lives():
    """torch.export wraps the no_grad region in one higher-order op; its in-place updates were
    unseen, so with the weights on one device and the region on another the update ran on a
    copy and was lost (found placing over two devices with copying transfers)."""
    from envs.runtime.apply import apply_placement

    torch.manual_seed(0)
    model, x = _MeanTeacher(), torch.randn(5, 8)
    before = copy.deepcopy(model)
    cap = capture(model, (x,))
    region = next(n.name for n in cap.gm.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator))
    placement = {n: ("b" if n == region or n.startswith("online") else "a") for n in cap.graph.nodes}
    placed = apply_placement(cap, placement, real_devices={"a": "cpu", "b": "cpu"}, copy_transfers=True)
    _assert_trains_like(before, placed, x)
    torch.testing.assert_close(placed.target.weight, before.target.weight, rtol=0, atol=0)


class _EvalTemperature(nn.Module):
    """A temperature only eval mode reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.eval_temp = 2.0

    def forward(self, x):
        h = self.a(x)
        if not self.training:
            h = h / self.eval_temp
        return h


def test_a_python_value_only_eval_mode_reads_is_pinned_too():
    """The eval graph bakes it in as the training graph bakes its own: set on the placed model,
    it changed nothing in evaluation."""
    from envs.runtime.apply import apply_placement

    model, x = _EvalTemperature(), torch.randn(3, 4)
    cap = capture(model, (x,))
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    placed(x)
    placed.eval_temp = 4.0  # refused at the next forward, whichever mode: the next validation pass would ignore it
    with pytest.raises(CaptureError, match="eval_temp was 2.0 when placer captured the model"):
        placed(x)


def test_a_model_member_named_like_a_graph_module_attribute_is_refused_naming_it() -> None:
    """A VQ model's ``self.code`` codebook clashes with ``GraphModule.code`` under both tracers;
    the refusal names the attribute and a way out instead of torch's "report a bug" message."""

    class VQ(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.code = nn.Parameter(torch.randn(8, 4))
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ self.code.t()

    with pytest.raises(CaptureError, match=r"\['code'\].*GraphModule.*'codebook'"):
        capture(VQ(), (torch.randn(2, 4),))


class KeyValueCache:
    """Stands for transformers' DynamicCache: an object no pytree knows, holding tensors."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys


class _ReturnsACache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.stack([self.a(row) for row in x])  # fx cannot iterate over a Proxy
        return h, KeyValueCache(h.detach())


def test_an_output_torch_export_cannot_return_is_named_and_a_cache_gets_the_hugging_face_remedy():
    with pytest.raises(CaptureError) as info:
        capture(_ReturnsACache(), (torch.randn(3, 4),))
    text = str(info.value)
    assert "forward() returns a " in text and "KeyValueCache, which torch.export cannot give as a graph output" in text
    assert "expected outputs made of tensors" in text and "set model.config.use_cache = False" in text
    assert "\n" not in text


class _PackedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 8, batch_first=True)

    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return h[-1]


class _PackedClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = _PackedEncoder(), nn.Linear(8, 3)

    def forward(self, x, lengths):
        return self.head(self.enc(x, lengths))


def test_packing_a_padded_batch_is_refused_naming_the_line_and_the_leaf_that_runs_it_whole():
    torch.manual_seed(0)
    model, inputs = _PackedClassifier(), (torch.randn(4, 6, 8), torch.tensor([6, 3, 5, 2]))
    with pytest.raises(CaptureError, match=r"packs or unpacks a padded batch \(torch.nn.utils.rnn, at "
                                           r"test_capture.py:\d+ in forward: packed = torch.nn.utils.rnn.pack_padded_sequence.*"
                                           r"inside one submodule named as a leaf module"):
        capture(model, inputs)
    cap = capture(model, inputs, leaf_modules=["enc"])
    torch.testing.assert_close(cap.gm(*inputs), model(*inputs))


class _ConfidentBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        if h.mean() > 0.5:  # data-dependent: neither tracer can follow it
            h = h * 2
        return x + h


class _EarlyExit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = self.b(h)
        return h


def test_untraceable_control_flow_in_a_block_names_the_class_to_keep_whole_and_where_it_runs():
    model = nn.Sequential(nn.Linear(8, 8), _ConfidentBlock(), _ConfidentBlock())
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(4, 8),))
    message = str(info.value)
    assert "if h.mean() > 0.5" in message
    assert "`--leaf _ConfidentBlock` (its class; 1, 2)" in message


def test_untraceable_control_flow_in_the_models_own_forward_says_it_cannot_be_kept_whole():
    with pytest.raises(CaptureError) as info:
        capture(_EarlyExit(), (torch.randn(4, 8),))
    assert "it is in the model's own forward(), which cannot be kept whole: move it into a submodule" in str(
        info.value)


@dataclasses.dataclass
class _Pooled:
    logits: torch.Tensor


class _PoolsByName(nn.Module):
    """A string input steers a branch (fx cannot follow it) and the output is a dataclass
    (torch.export takes one only once registered)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, pool):
        h = self.lin(x)
        return _Pooled(h.mean(1) if pool == "mean" else h[:, 0])


def test_an_unregistered_dataclass_output_names_the_registration_that_lets_torch_export_take_it():
    with pytest.raises(CaptureError) as info:
        capture(_PoolsByName(), (torch.randn(4, 3, 8), "mean"))
    assert "expected torch.export.register_dataclass(_Pooled) after the class in the model file" in str(info.value)


def test_a_registered_dataclass_output_is_captured_by_torch_export_and_comes_back_as_the_dataclass():
    @dataclasses.dataclass
    class Pooled:
        logits: torch.Tensor

    class PoolsByName(_PoolsByName):
        def forward(self, x, pool):
            return Pooled(super().forward(x, pool).logits)

    torch.export.register_dataclass(Pooled)
    model, x = PoolsByName(), torch.randn(4, 3, 8)
    captured = capture(model, (x, "mean"))
    assert captured.method == "export"
    out = captured.gm(x, "mean")
    assert isinstance(out, Pooled)
    torch.testing.assert_close(out.logits, model(x, "mean").logits)


class _PenalisedInForward(nn.Module):
    """An L2 penalty over self.parameters() in forward: fx sees none of those parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).sum() + 1e-2 * sum(p.pow(2).sum() for p in self.parameters())


def test_a_penalty_over_parameters_that_fx_would_bake_as_a_constant_is_captured_by_export_and_trains_the_same():
    torch.manual_seed(0)
    model = _PenalisedInForward()
    x = torch.randn(4, 8)
    captured = capture(model, (x,))
    assert captured.method == "export" and "torch.fx does not see" in captured.fx_error
    reference, placed = copy.deepcopy(model), copy.deepcopy(captured.gm)
    for module in (reference, placed):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        for _ in range(3):  # the second backward failed on the baked constant, and its value went stale
            optimizer.zero_grad()
            module(x).backward()
            optimizer.step()
    for (name, p), q in zip(reference.named_parameters(), placed.parameters()):
        torch.testing.assert_close(q, p, msg=name)


class _SamplingPolicy(nn.Module):
    """An actor that samples its action with torch.distributions in forward (REINFORCE, PPO)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, obs):
        dist = torch.distributions.Categorical(logits=self.body(obs))
        action = dist.sample()
        return dist.log_prob(action), action


def test_a_policy_that_samples_from_a_distribution_captures_and_samples_as_the_model_does():
    """Categorical's argument checks are Python control flow on tensor values: neither tracer
    could follow them ("Could not guard on data-dependent expression")."""
    torch.manual_seed(0)
    model = _SamplingPolicy()
    obs = torch.randn(32, 6)
    before = torch.distributions.Distribution._validate_args
    captured = capture(model, (obs,), name="policy")
    assert torch.distributions.Distribution._validate_args == before
    torch.manual_seed(3)
    logp, action = captured.gm(obs)
    torch.manual_seed(3)
    want_logp, want_action = model(obs)
    assert torch.equal(action, want_action) and torch.equal(logp, want_logp)


def test_layers_kept_in_a_plain_list_are_named_in_a_warning_and_captured_as_the_model_computes(caplog):
    """PyTorch registers no module held in a list: no optimizer trains it, and nothing said so."""

    class Listed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.hidden = [nn.Linear(8, 8) for _ in range(2)]
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            for layer in self.hidden:
                h = torch.relu(layer(h))
            return self.out(h)

    torch.manual_seed(0)
    model = Listed()
    x = torch.randn(5, 4)
    with caplog.at_level("WARNING", logger="graphs.capture"):
        captured = capture(model, (x,), name="listed")
    assert "listed keeps module(s) hidden[0], hidden[1] in a plain Python container" in caplog.text
    assert torch.equal(captured.gm(x), model(x))
    assert {n for n, _ in captured.gm.named_parameters()} == {n for n, _ in model.named_parameters()}


class _InitOnFirstCall(nn.Module):
    """Data-dependent initialisation (Glow's actnorm): a branch on a buffer's value."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.register_buffer("ready", torch.tensor(0))

    def forward(self, x):
        if self.ready.item() == 0:
            with torch.no_grad():
                self.scale.copy_(1 / (x.std(0) + 1e-6))
                self.ready.fill_(1)
        return x * self.scale


class _SpreadsAShape(nn.Module):
    """``view(*self.weight.shape, 1)``: fx cannot iterate the Proxy of a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return (x[:, None, :] * self.weight.view(*self.weight.shape, 1).squeeze(-1)).sum(-1)


def test_a_failure_of_torch_export_inside_a_named_leaf_gives_way_to_the_line_torch_fx_stopped_at():
    model = nn.Sequential(_InitOnFirstCall(), _SpreadsAShape(), nn.Linear(8, 2))
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(4, 8),), leaf_modules=[_InitOnFirstCall])
    message = str(info.value)
    assert "in forward: return (x[:, None, :] * self.weight.view(*self.weight.shape, 1)" in message
    assert "inside the leaf module(s) 0, which it traces into" in message
    assert "`--leaf _SpreadsAShape` (its class; 1)" in message and "--leaf _InitOnFirstCall" not in message


class _WeightDrop(nn.Module):
    """AWD-LSTM's weight drop: a dropped copy of the raw weight is assigned to the LSTM in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        raw = self.rnn.weight_hh_l0
        del self.rnn._parameters["weight_hh_l0"]
        self.weight_hh_raw = nn.Parameter(raw.data.clone())

    def forward(self, x):
        setattr(self.rnn, "weight_hh_l0", nn.functional.dropout(self.weight_hh_raw, 0.3, self.training))
        self.rnn._flat_weights = [getattr(self.rnn, n) for n in self.rnn._flat_weights_names]
        return self.rnn(x)[0]


def test_a_forward_that_assigns_a_weight_to_a_module_is_refused_naming_the_attribute_and_the_leaf_that_runs_it():
    model = nn.Sequential(nn.Linear(8, 8), _WeightDrop(), nn.Linear(8, 2))
    x = torch.randn(4, 5, 8)
    with pytest.raises(CaptureError) as info:
        capture(model, (x,))
    message = str(info.value)
    assert "it sets the Python attribute(s) '1.rnn._flat_weights', '1.rnn.weight_hh_l0' while it runs" in message
    assert "`--leaf _WeightDrop` (module '1')" in message and "random.random()" not in message
    captured = capture(model, (x,), leaf_modules=[_WeightDrop])  # what the message says to do
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(captured.gm(x), expected)
