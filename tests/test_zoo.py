"""Tests of the model zoo (graphs/zoo): every model file at small size, plus per-model checks."""

from __future__ import annotations

import importlib
import math
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphs.errors import ModelFileError, PlacerError
from graphs.zoo import ZOO_MODELS, load_zoo_model, zoo_path
from graphs.zoo.presets import ZooArgumentError
from graphs.zoo.recurrent import LSTMGateCell

# fx node counts of the small presets: the full architectures at tiny widths
SMALL_NODES = {
    "inception_v3": (250, 400),
    "resnet50": (150, 250),
    "nmt": (100, 300),
    "rnnlm": (20, 100),
    "gpt2": (50, 150),
    "moe": (50, 150),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the zoo's tiny models on one thread: on a shared, loaded machine intra-op threads
    contend with other processes and a 0.2 s step took 10 s with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zoo(name: str):
    return importlib.import_module(f"graphs.zoo.{name}")


def call_counts(gm: fx.GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def test_zoo_lists_every_model_file() -> None:
    assert set(ZOO_MODELS) == set(SMALL_NODES)
    for name in ZOO_MODELS:
        assert zoo_path(name).is_file()
        module = zoo(name)
        for fn in ("get_model", "get_example_inputs", "get_loss"):
            assert callable(getattr(module, fn))


def test_unknown_zoo_name_lists_valid_names() -> None:
    with pytest.raises(ModelFileError, match="resnet50") as info:
        zoo_path("resnet51")
    assert "resnet51" in str(info.value)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_small_model_trains_and_traces(name: str) -> None:
    module = zoo(name)
    model = module.get_model("small")
    inputs = module.get_example_inputs("small")
    output = model(*inputs)
    loss = module.get_loss(output, *inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    gm = fx.symbolic_trace(model)
    lo, hi = SMALL_NODES[name]
    assert lo <= len(gm.graph.nodes) <= hi
    model.eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_small_model_is_deterministic_and_leaves_rng_alone(name: str) -> None:
    module = zoo(name)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first, second = module.get_model("small"), module.get_model("small")
    inputs_a, inputs_b = module.get_example_inputs("small"), module.get_example_inputs("small")
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(first.state_dict().items(), second.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    for a, b in zip(inputs_a, inputs_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_unknown_size_names_the_valid_sizes(name: str) -> None:
    module = zoo(name)
    for fn in (module.get_model, module.get_example_inputs):
        with pytest.raises(ValueError, match="'small', 'paper'") as info:
            fn("huge")
        assert isinstance(info.value, PlacerError)
        assert "huge" in str(info.value)


def test_bad_overrides_are_refused_clearly() -> None:
    nmt = zoo("nmt")
    with pytest.raises(ZooArgumentError, match="at least 2"):
        nmt.get_model("small", layers=1)
    with pytest.raises(ZooArgumentError, match="positive integer"):
        nmt.get_model("small", layers="eight")
    with pytest.raises(ZooArgumentError, match="lstmcell"):
        zoo("rnnlm").get_model("small", cell="gru")
    with pytest.raises(ZooArgumentError, match="exceeds"):
        zoo("moe").get_model("small", k=9)
    with pytest.raises(ZooArgumentError, match="299"):
        zoo("inception_v3").get_model("small", aux_logits=True)
    with pytest.raises(ZooArgumentError, match="depth"):
        zoo("gpt2").config("small", depth=3)
    with pytest.raises(ZooArgumentError, match="divisible"):
        zoo("gpt2").config("small", heads=5)


def test_gate_cell_computes_what_lstmcell_computes() -> None:
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(5, 7)
    cell = LSTMGateCell(5, 7)
    with torch.no_grad():
        cell.ih.weight.copy_(ref.weight_ih)
        cell.ih.bias.copy_(ref.bias_ih + ref.bias_hh)
        cell.hh.weight.copy_(ref.weight_hh)
    x1, x2 = torch.randn(3, 5), torch.randn(3, 5)
    state_ref = ref(x2, ref(x1))
    state = cell(x2, cell(x1, None))
    torch.testing.assert_close(state[0], state_ref[0])
    torch.testing.assert_close(state[1], state_ref[1])


@pytest.mark.parametrize("cell", ["lstmcell", "gates"])
@pytest.mark.parametrize("layers", [2, 4, 8])
def test_nmt_unrolls_every_layer_and_step(layers: int, cell: str) -> None:
    nmt = zoo("nmt")
    model = nmt.get_model("small", layers=layers, cell=cell)
    source, target_in, target_out = nmt.get_example_inputs("small")
    calls = call_counts(fx.symbolic_trace(model))
    suffix = "" if cell == "lstmcell" else ".ih"
    # the same decoder cell is called at every target step: the shared-weights pattern
    for i in range(layers):
        assert calls[f"decoder.{i}{suffix}"] == target_in.shape[1]
    for i in range(layers - 1):
        assert calls[f"encoder.{i}{suffix}"] == source.shape[1]
    assert calls[f"enc_fwd{suffix}"] == calls[f"enc_bwd{suffix}"] == source.shape[1]
    assert calls["attention.query"] == target_in.shape[1]
    loss = nmt.get_loss(model(source, target_in, target_out), source, target_in, target_out)
    assert torch.isfinite(loss)


def test_nmt_decoder_is_causal_in_the_target() -> None:
    nmt = zoo("nmt")
    model = nmt.get_model("small").eval()
    source, target_in, target_out = nmt.get_example_inputs("small")
    changed = target_in.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 300
    with torch.no_grad():
        a, b = model(source, target_in), model(source, changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gpt2_attention_is_causal() -> None:
    gpt2 = zoo("gpt2")
    model = gpt2.get_model("small").eval()
    tokens, _ = gpt2.get_example_inputs("small")
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def moe_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token top-k routing with first-come capacity: the oracle for the dense dispatch."""
    logits = layer.gate(x)
    out = torch.zeros_like(x)
    load = [0] * len(layer.experts)
    for t in range(x.shape[0]):
        values, experts = logits[t].topk(layer.k)
        weights = F.softmax(values, dim=0)
        for w, e in zip(weights, experts.tolist()):
            if load[e] < layer.capacity:
                out[t] += w * layer.experts[e](x[t : t + 1])[0]
            load[e] += 1
    return out


@pytest.mark.parametrize("capacity", [1, 3, 50])
def test_moe_dispatch_matches_token_by_token_routing(capacity: int) -> None:
    moe = zoo("moe")
    torch.manual_seed(0)
    layer = moe.MoELayer(hidden=6, experts=5, expert_hidden=8, k=2, capacity=capacity)
    x = torch.randn(12, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), moe_reference(layer, x))
        dispatch, _ = layer.routing(x)
    assert dispatch.sum(dim=(0, 2)).max() <= capacity
    assert dispatch.sum(dim=(1, 2)).max() <= 2


def test_moe_experts_are_separate_nodes() -> None:
    moe = zoo("moe")
    model = moe.get_model("small", experts=6)
    calls = call_counts(fx.symbolic_trace(model))
    for e in range(6):
        assert calls[f"moe.experts.{e}.fc1"] == 1 and calls[f"moe.experts.{e}.fc2"] == 1
    assert not any(n.op == "call_function" and "nonzero" in str(n.target)
                   for n in fx.symbolic_trace(model).graph.nodes)


def test_inception_aux_head() -> None:
    inception = zoo("inception_v3")
    model = inception.get_model("small", aux_logits=True, image_size=299)
    images, labels = inception.get_example_inputs("small", image_size=299, batch_size=2)
    logits, aux = model(images, labels)
    assert logits.shape == aux.shape == (2, 10)
    loss = inception.get_loss((logits, aux), images, labels)
    expected = F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(aux, labels)
    torch.testing.assert_close(loss, expected)


def test_load_zoo_model_goes_through_the_model_file_loader() -> None:
    pytest.importorskip("graphs.model_file")
    spec = load_zoo_model("nmt", "small", layers=4)
    assert isinstance(spec.model, torch.nn.Module)
    assert len(spec.model.decoder) == 4
    assert len(spec.example_inputs) == 3


# parameter counts of the published configurations (Inception-V3 without its auxiliary head)
PAPER_PARAMS = {"inception_v3": 23.8e6, "resnet50": 25.6e6, "gpt2": 124.4e6}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_paper_size_traces_on_meta(name: str) -> None:
    module = zoo(name)
    with torch.device("meta"):
        model = module.get_model("paper")
        inputs = module.get_example_inputs("paper")
        gm = fx.symbolic_trace(model)
        output = gm(*inputs)
    assert output.shape[0] == inputs[0].shape[0]
    params = sum(p.numel() for p in model.parameters())
    if name in PAPER_PARAMS:
        assert math.isclose(params, PAPER_PARAMS[name], rel_tol=0.01)
    if name == "nmt":
        assert len(gm.graph.nodes) > 15_000


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_optimizer_takes_a_step(name: str) -> None:
    module = zoo(name)
    model = module.get_model("small")
    inputs = module.get_example_inputs("small")
    optimizer = module.get_optimizer(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    module.get_loss(model(*inputs), *inputs).backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.slow
def test_nmt_paper_grows_with_layers() -> None:
    nmt = zoo("nmt")
    counts = []
    with torch.device("meta"):
        for layers in (2, 4, 8):
            counts.append(len(fx.symbolic_trace(nmt.get_model("paper", layers=layers)).graph.nodes))
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] > 15_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_small_model_trains_on_cuda(name: str) -> None:
    module = zoo(name)
    model = module.get_model("small").to("cuda")
    inputs = tuple(x.to("cuda") for x in module.get_example_inputs("small"))
    loss = module.get_loss(model(*inputs), *inputs)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters())


@pytest.mark.slow
def test_nmt_paper_training_graph_has_tens_of_thousands_of_ops() -> None:
    """8 layers at GNMT's 50-token sentences: forward ops + backward ops + updates, counted on meta."""
    nmt = zoo("nmt")
    with torch.device("meta"):
        model = nmt.get_model("paper")
        gm = fx.symbolic_trace(model)
        out = gm(*nmt.get_example_inputs("paper"))
    compute = sum(1 for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(nxt for nxt, _ in fn.next_functions)
    updates = sum(1 for p in model.parameters() if p.requires_grad)
    assert compute > 15_000 and len(seen) > 14_000
    assert compute + len(seen) + updates > 30_000
