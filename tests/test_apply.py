"""Applying a placement: the placed model computes and trains exactly like the original.

CPU-only machines exercise the transfer path with virtual devices mapped onto the CPU:
the cut edges get real transfer nodes (no-op copies at run time) and every number must
match the original model. A GPU class repeats the checks over cpu/cuda:0 when CUDA exists.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
import warnings

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from envs.runtime.apply import (
    ApplyError,
    apply_placement,
    placement_device_map,
    realize_placement,
    transfer_nodes,
)
from envs.runtime.transfers import to_device
from graphs.errors import PlacerError
from tests.helpers.eval_models import StochasticDepth
from tests.helpers.placements import alternating_placement


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two intra-op threads thrash on the shared 2-core machine; numerics do not depend on it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h)) + h
        return self.head(h)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class RNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.out = nn.Linear(12, 20)

    def forward(self, tokens):
        out, (h, c) = self.lstm(self.emb(tokens))
        return self.out(out + h[-1].unsqueeze(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h)
        return {"logits": self.head(self.norm(a + h)), "hidden": h}


MODELS = {
    "mlp": (MLP, lambda: (torch.randn(4, 8),)),
    "cnn": (CNN, lambda: (torch.randn(2, 3, 8, 8),)),
    "lstm": (RNN, lambda: (torch.randint(0, 20, (3, 5)),)),
    "attention": (Attention, lambda: (torch.randn(2, 5, 8),)),
}

VIRTUAL = {f"gpu{i}": "cpu" for i in range(4)}


def _loss(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = out["logits"]
    if isinstance(out, (tuple, list)):
        out = out[0]
    return (out.float() ** 2).mean()


def _capture(kind: str, model: nn.Module, inputs: tuple) -> fx.GraphModule:
    if kind == "fx":
        return fx.symbolic_trace(model)
    return torch.export.export(model, inputs, strict=False).module()


def _random_placement(gm: fx.GraphModule, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {n.name: rng.choice(sorted(VIRTUAL)) for n in gm.graph.nodes}


def _round_robin(gm: fx.GraphModule) -> dict[str, str]:
    devs = sorted(VIRTUAL)
    return {n.name: devs[i % len(devs)] for i, n in enumerate(gm.graph.nodes)}


def _assert_same_training(reference: nn.Module, placed: nn.Module, inputs: tuple, opt: str,
                          seed: int | None = None) -> None:
    """Outputs, loss, gradients and 3 optimizer steps must agree. ``seed``: set before each forward,
    so that a model drawing random numbers draws the same ones on both sides."""
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    }[opt]
    opt_ref, opt_placed = make(reference.parameters()), make(placed.parameters())
    for step in range(3):
        if seed is not None:
            torch.manual_seed(seed + step)
        out_ref = reference(*inputs)
        if seed is not None:
            torch.manual_seed(seed + step)
        out_placed = placed(*inputs)
        torch.testing.assert_close(out_placed, out_ref, rtol=1e-6, atol=1e-6)
        loss_ref, loss_placed = _loss(out_ref), _loss(out_placed)
        torch.testing.assert_close(loss_placed, loss_ref, rtol=1e-6, atol=1e-6)
        opt_ref.zero_grad()
        opt_placed.zero_grad()
        loss_ref.backward()
        loss_placed.backward()
        grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        grads_placed = {n: p.grad for n, p in placed.named_parameters() if p.grad is not None}
        assert grads_ref.keys() == grads_placed.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads_placed[name].cpu(), grads_ref[name], rtol=1e-5, atol=1e-6)
        opt_ref.step()
        opt_placed.step()
    for (name, p_ref), (_, p_placed) in zip(reference.named_parameters(), placed.named_parameters()):
        torch.testing.assert_close(p_placed.detach().cpu(), p_ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    for (name, b_ref), (_, b_placed) in zip(reference.named_buffers(), placed.named_buffers()):
        torch.testing.assert_close(b_placed.cpu(), b_ref, msg=name)


def _cut_edges(gm: fx.GraphModule, placement: dict[str, str]) -> set[tuple[str, str]]:
    """(producer, destination device) pairs whose tensor crosses devices in the original graph."""
    cuts = set()
    for n in gm.graph.nodes:
        for u in n.users:
            if u.op == "output" or n.op == "placeholder":
                continue
            if placement[n.name] != placement[u.name]:
                cuts.add((n.name, placement[u.name]))
    return cuts


# ----------------------------------------------------------------------------- numerics


@functools.cache
def _captured(model_name: str, capture_kind: str) -> tuple[fx.GraphModule, tuple]:
    """One capture per (model, path), shared by the placements (apply never mutates it)."""
    torch.manual_seed(0)
    cls, make_inputs = MODELS[model_name]
    model, inputs = cls(), make_inputs()
    return _capture(capture_kind, model, inputs), inputs


@pytest.mark.parametrize("capture_kind", ["fx", "export"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["random1", "round_robin"])
def test_placed_model_trains_like_the_original(model_name, capture_kind, strategy):
    gm, inputs = _captured(model_name, capture_kind)
    placement = _random_placement(gm, int(strategy[-1])) if strategy.startswith("random") else _round_robin(gm)
    reference = copy.deepcopy(gm)
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)

    # No value crosses devices except through a transfer node, and the original's cut
    # edges really got transfers.
    dev = placed.placer_placement
    for node in placed.graph.nodes:
        for user in node.users:
            if "placer_transfer" in node.meta or "placer_transfer" in user.meta:
                continue
            assert node.op != "placeholder", f"input {node.name} reaches {user.name} untransferred"
            assert dev[node.name] == dev[user.name] or user.op in ("call_method", "call_function") and (
                user.target in ("size", "dim") or "sym_size" in str(user.target)
            ), f"{node.name}@{dev[node.name]} -> {user.name}@{dev[user.name]} without a transfer"
    assert len(transfer_nodes(placed)) >= len(
        [c for c in _cut_edges(gm, placement) if dev.get(c[0]) == placement[c[0]]]
    ) > 0

    _assert_same_training(reference, placed, inputs, "sgd" if strategy != "random1" else "adam")


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_original_model_is_untouched(opt):
    torch.manual_seed(1)
    model, inputs = CNN(), (torch.randn(2, 3, 8, 8),)
    gm = fx.symbolic_trace(model)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code_before = gm.code
    placed = apply_placement(gm, _round_robin(gm), real_devices=VIRTUAL)
    _loss(placed(*inputs)).backward()
    assert gm.code == code_before
    for k, v in gm.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert all(p.grad is None for p in gm.parameters())


def test_transfer_is_shared_by_consumers_on_one_device():
    class Fan(nn.Module):
        def forward(self, x):
            y = torch.sin(x)
            return torch.cos(y) + torch.exp(y) + torch.abs(y)

    gm = fx.symbolic_trace(Fan())
    placement = {n.name: "gpu0" for n in gm.graph.nodes}
    for n in ("cos", "exp", "abs_1"):
        placement[n] = "gpu1"
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)
    ts = transfer_nodes(placed)
    from_sin = [t for t in ts if t.args[0].name == "sin"]
    assert len(from_sin) == 1 and len(from_sin[0].users) == 3
    x = torch.randn(5)
    torch.testing.assert_close(placed(x), gm(x))


def test_placeholder_moves_to_every_consuming_device_and_outputs_gather():
    gm = fx.symbolic_trace(MLP())
    placement = {n.name: "gpu0" for n in gm.graph.nodes}
    placement["head"] = "gpu2"
    placed = apply_placement(gm, placement, real_devices=VIRTUAL, output_device="gpu3")
    ts = {(t.args[0].name, t.meta["placer_transfer"][1]) for t in transfer_nodes(placed)}
    assert ("x", "gpu0") in ts
    assert ("head", "gpu3") in ts  # gathered on the output device
    assert placed.placer_output_device == "gpu3"


def test_metadata_reads_do_not_copy_tensors():
    class Shape(nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            return y.view(y.size(0), -1)

    gm = fx.symbolic_trace(Shape())
    placement = {n.name: "gpu0" for n in gm.graph.nodes}
    placement["size"] = "gpu1"
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)
    assert not any(t.args[0].name == "relu" and t.meta["placer_transfer"][1] == "gpu1" for t in transfer_nodes(placed))


def test_inplace_op_runs_where_its_tensor_lives():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return y

    gm = fx.symbolic_trace(InPlace())
    placement = {n.name: "gpu0" for n in gm.graph.nodes}
    placement["add_"] = "gpu1"
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)
    assert placed.placer_placement["add_"] == "gpu0"
    x = torch.randn(3)
    torch.testing.assert_close(placed(x), x * 2 + 1)


def test_setitem_stays_with_its_tensor_and_invert_is_not_in_place():
    import operator

    # fx's tracer cannot record y[0] = v, so build the graph by hand (export-style graphs have it).
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(operator.mul, (x, 2))
    g.call_function(operator.setitem, (y, 0, 5.0))
    inv = g.call_function(operator.invert, (g.call_function(operator.gt, (x, 0)),))
    g.output((y, inv))
    gm = fx.GraphModule(nn.Module(), g)
    names = [n.name for n in gm.graph.nodes]
    placement = {n: ("gpu1" if n in ("setitem", "invert") else "gpu0") for n in names}
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)
    assert placed.placer_placement["setitem"] == "gpu0"  # follows the tensor it writes
    assert placed.placer_placement["invert"] == "gpu1"  # ~x is no in-place op: stays placed
    x = torch.randn(3)
    out = placed(x)
    assert out[0][0] == 5.0
    torch.testing.assert_close(out, gm(x))


def test_to_device_moves_only_tensors_in_nested_values():
    value = {"a": (torch.ones(2), 3, "s"), "b": [torch.zeros(1), None]}
    moved = to_device(value, "cpu")
    assert moved["a"][1] == 3 and moved["a"][2] == "s" and moved["b"][1] is None
    assert isinstance(moved["a"][0], torch.Tensor)


# ----------------------------------------------------------------------------- errors


def test_shared_module_split_across_devices_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    gm = fx.symbolic_trace(Tied())
    placement = {n.name: "gpu0" for n in gm.graph.nodes}
    placement["lin_1"] = "gpu1"
    with pytest.raises(ApplyError, match="one device"):
        apply_placement(gm, placement, real_devices=VIRTUAL)
    placement["lin_1"] = "gpu0"
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)
    x = torch.randn(2, 4)
    torch.testing.assert_close(placed(x), gm(x))


def test_tied_parameters_stay_tied():
    class TiedEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t))

    gm = fx.symbolic_trace(TiedEmb())
    placement = {n.name: "gpu0" for n in gm.graph.nodes}
    placed = apply_placement(gm, placement, real_devices=VIRTUAL)
    assert placed.emb.weight is placed.out.weight
    placement["out"] = "gpu1"
    with pytest.raises(ApplyError, match="one device"):
        apply_placement(gm, placement, real_devices=VIRTUAL)


def test_bad_input_gets_clear_errors():
    gm = fx.symbolic_trace(MLP())
    with pytest.raises(ApplyError, match="not in the model's graph"):
        apply_placement(gm, {"nope": "cpu"})
    with pytest.raises(ApplyError, match="not a torch device"):
        apply_placement(gm, {"fc1": "gpu-zero"})
    with pytest.raises(ApplyError, match="does not map"):
        apply_placement(gm, {"fc1": "gpu9"}, real_devices=VIRTUAL)
    with pytest.raises(ApplyError, match="GraphModule"):
        apply_placement(MLP(), {})
    assert issubclass(ApplyError, PlacerError)


# ----------------------------------------------------------------------------- device_map


def _module_graph(modules: dict[str, str], owning=()) -> nx.DiGraph:
    g = nx.DiGraph()
    for n, m in modules.items():
        g.add_node(n, module=m, param_bytes=64 if n in owning else 0)
    return g


def test_device_map_collapses_to_coarsest_aligned_prefixes():
    g = _module_graph({
        "x": "", "emb": "emb", "l0a": "layers.0.attn", "l0m": "layers.0.mlp", "l0add": "layers.0",
        "l1a": "layers.1.attn", "l1m": "layers.1.mlp", "head": "head", "out": "",
    }, owning={"emb", "l0a", "l0m", "l1a", "l1m", "head"})
    placement = {"x": "cpu", "emb": "cuda:0", "l0a": "cuda:0", "l0m": "cuda:0", "l0add": "cuda:0",
                 "l1a": "cuda:1", "l1m": "cuda:1", "head": "cuda:1", "out": "cpu"}
    assert placement_device_map(g, placement) == {
        "emb": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "head": "cuda:1"}
    # A block split between its sublayers: its parameter-free glue (the residual add) is
    # not part of a device_map, the sublayers are listed one by one.
    placement["l0m"] = "cuda:1"
    assert placement_device_map(g, placement) == {
        "emb": "cuda:0", "layers.0.attn": "cuda:0", "layers.0.mlp": "cuda:1", "layers.1": "cuda:1",
        "head": "cuda:1"}
    # A module with parameters of its own split from its submodules is not aligned.
    g.add_node("l0bias", module="layers.0", param_bytes=16)
    placement["l0bias"] = "cuda:0"
    assert placement_device_map(g, placement) is None
    # Everything on one device.
    assert placement_device_map(g, {n: "cpu" for n in g}) == {"": "cpu"}


def test_applied_model_gets_hf_device_map_when_aligned():
    gm = fx.symbolic_trace(MLP())
    placement = {n.name: ("gpu0" if n.name in ("x", "fc1", "relu") else "gpu1") for n in gm.graph.nodes}
    placed = apply_placement(gm, placement, real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    assert placed.hf_device_map == {"": "cpu"}  # both virtual devices are the one CPU
    assert placement_device_map(gm, placement) == {"fc1": "gpu0", "fc2": "gpu1", "head": "gpu1"}


# ----------------------------------------------------------------------------- virtual devices


def test_realize_placement_says_when_there_is_no_parallelism():
    class Dev:
        def __init__(self, name, real):
            self.name, self.real_device = name, real

    r = realize_placement({"a": "gpu0", "b": "gpu1"}, [Dev("gpu0", "cpu"), Dev("gpu1", "cpu")])
    assert r.assignment == {"a": "cpu", "b": "cpu"}
    assert not r.parallel and "no parallelism" in r.note
    r2 = realize_placement({"a": "x"}, {"x": "cpu", "y": "cuda:0"})
    assert r2.parallel and r2.note == ""
    with pytest.raises(ApplyError, match="does not define"):
        realize_placement({"a": "z"}, {"x": "cpu"})


# ----------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    @pytest.mark.parametrize("model_name", sorted(MODELS))
    @pytest.mark.parametrize("capture_kind", ["fx", "export"])
    def test_cpu_cuda_placement_trains_like_the_original(self, model_name, capture_kind):
        torch.manual_seed(0)
        cls, make_inputs = MODELS[model_name]
        model, inputs = cls(), make_inputs()
        gm = _capture(capture_kind, model, inputs)
        rng = random.Random(3)
        placement = {n.name: rng.choice(["cpu", "cuda:0"]) for n in gm.graph.nodes}
        reference = copy.deepcopy(gm)
        placed = apply_placement(gm, placement, output_device="cpu")
        assert transfer_nodes(placed)
        assert {p.device.type for p in placed.parameters()} <= {"cpu", "cuda"}
        # cuda kernels differ from cpu in the last bits: looser tolerance than on CPU.
        for step in range(2):
            out_ref, out_placed = reference(*inputs), placed(*inputs)
            torch.testing.assert_close(to_device(out_placed, "cpu"), out_ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the zoo


def _colocated_groups(gm: fx.GraphModule) -> list[list[str]]:
    """Nodes that must share a device: those touching the same parameter/buffer tensor.

    (The grouping layer guarantees this for real placements; a random placement over
    raw nodes must respect it too or apply refuses it.)
    """
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    owner: dict[int, str] = {}
    for n in gm.graph.nodes:
        find(n.name)
        tensors: list[torch.Tensor] = []
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            tensors = list(mod.parameters()) + list(mod.buffers())
        elif n.op == "get_attr":
            path, _, attr = str(n.target).rpartition(".")
            value = getattr(gm.get_submodule(path) if path else gm, attr)
            tensors = [value] if isinstance(value, torch.Tensor) else list(value.parameters())
        for t in tensors:
            other = owner.setdefault(id(t), n.name)
            parent[find(n.name)] = find(other)
    groups: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        groups.setdefault(find(n.name), []).append(n.name)
    return list(groups.values())


def _zoo_capture(spec) -> fx.GraphModule:
    from graphs.capture import capture

    return capture(spec.model, spec.example_inputs, name=spec.name).gm


def _zoo_names() -> list[str]:
    from graphs.zoo import ZOO_MODELS, zoo_path

    # inception_v3 takes ~13 s on 2 cores even at small size: slow suite only.
    return [pytest.param(n, marks=pytest.mark.slow) if n == "inception_v3" else n
            for n in ZOO_MODELS if zoo_path(n).exists()]


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_models_train_identically_under_placements(name):
    from graphs.zoo import load_zoo_model

    torch.manual_seed(0)
    spec = load_zoo_model(name, size="small")
    gm = _zoo_capture(spec)
    groups = _colocated_groups(gm)
    devs = sorted(VIRTUAL)
    rng = random.Random(7)
    placements = {
        "random": {n: d for g in groups for d in [rng.choice(devs)] for n in g},
        "round_robin": {n: devs[i % len(devs)] for i, g in enumerate(groups) for n in g},
    }
    for (label, placement), opt in zip(placements.items(), ("sgd", "adam")):
        reference = copy.deepcopy(gm)
        placed = apply_placement(gm, placement, real_devices=VIRTUAL)
        assert len(transfer_nodes(placed)) > 0, label
        make = (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)) if opt == "sgd" else (
            lambda p: torch.optim.Adam(p, lr=1e-3))
        opt_ref, opt_placed = make(reference.parameters()), make(placed.parameters())
        for step in range(3):
            torch.manual_seed(100 + step)  # same dropout masks in both runs
            out_ref = reference(*spec.example_inputs)
            torch.manual_seed(100 + step)
            out_placed = placed(*spec.example_inputs)
            torch.testing.assert_close(out_placed, out_ref, rtol=1e-6, atol=1e-6)
            loss_ref = spec.loss_fn(out_ref, *spec.example_inputs)
            loss_placed = spec.loss_fn(out_placed, *spec.example_inputs)
            torch.testing.assert_close(loss_placed, loss_ref, rtol=1e-6, atol=1e-6)
            opt_ref.zero_grad()
            opt_placed.zero_grad()
            loss_ref.backward()
            loss_placed.backward()
            for (pn, p_ref), (_, p_pl) in zip(reference.named_parameters(), placed.named_parameters()):
                if p_ref.grad is not None:
                    torch.testing.assert_close(p_pl.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=f"{label} {pn}")
            opt_ref.step()
            opt_placed.step()
        for (pn, p_ref), (_, p_pl) in zip(reference.named_parameters(), placed.named_parameters()):
            torch.testing.assert_close(p_pl, p_ref, rtol=1e-5, atol=1e-6, msg=f"{label} {pn}")


def test_realize_placement_refuses_devices_without_a_real_device():
    with pytest.raises(ApplyError, match="name the cluster the placement was made for"):
        realize_placement({"a": "gpu0"}, {"gpu0": "gpu0"})


def test_model_captured_through_export_applies_and_gets_device_map():
    from graphs.capture import capture

    class Loop(nn.Module):  # range(x.shape[0]) defeats fx, export handles it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            for _ in range(x.shape[0]):
                y = y + self.b(y)
            return y

    torch.manual_seed(0)
    cap = capture(Loop(), (torch.randn(3, 4),))
    assert cap.method == "export"
    modules = {n: cap.graph.nodes[n].get("module", "") for n in cap.graph.nodes}
    placement = {n: ("gpu0" if modules[n] in ("a", "") else "gpu1") for n in cap.graph.nodes}
    reference = copy.deepcopy(cap.gm)
    placed = apply_placement(cap, placement, real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    assert transfer_nodes(placed)
    assert placement_device_map(cap.graph, placement) == {"a": "gpu0", "b": "gpu1"}
    _assert_same_training(reference, placed, (torch.randn(3, 4),), "adam")


@pytest.mark.slow  # the export capture of HF GPT-2 alone takes ~5 s on 2 cores
def test_hugging_face_gpt2_pipeline_split_applies_with_device_map():
    transformers = pytest.importorskip("transformers")
    from graphs.capture import capture

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout masks to line up
    ids = torch.randint(0, 100, (2, 8))
    cap = capture(model, (ids,), name="gpt2-tiny")
    modules = {n: cap.graph.nodes[n].get("module", "") for n in cap.graph.nodes}
    # Embeddings, block 0 and the (tied) head on d0; block 1 and the final norm on d1.
    late = ("transformer.h.1", "transformer.ln_f")
    placement = {n: ("d1" if m.startswith(late) else "d0") for n, m in modules.items()}
    assert placement_device_map(cap.graph, placement) == {
        "lm_head": "d0", "transformer.drop": "d0", "transformer.h.0": "d0", "transformer.h.1": "d1",
        "transformer.ln_f": "d1", "transformer.wpe": "d0", "transformer.wte": "d0"}
    reference = copy.deepcopy(cap.gm)
    placed = apply_placement(cap, placement, real_devices={"d0": "cpu", "d1": "cpu"})
    assert transfer_nodes(placed)
    out_ref, out_placed = reference(ids), placed(ids)
    torch.testing.assert_close(out_placed.logits, out_ref.logits, rtol=1e-6, atol=1e-6)
    out_ref.logits.mean().backward()
    out_placed.logits.mean().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), placed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Splitting the tied embedding/head weights is refused, naming both nodes.
    placement.update({n: "d1" for n, m in modules.items() if m.startswith("lm_head")})
    with pytest.raises(ApplyError, match="one device"):
        apply_placement(cap, placement, real_devices={"d0": "cpu", "d1": "cpu"})


# --------------------------------------------------------------------------- state updated in forward()


class _FunctionalRenorm(nn.Module):
    """State the functional API updates in place: ``F.embedding(..., max_norm=)`` renormalises the
    rows it looks up in the weight itself, ``F.instance_norm`` updates statistics it is given by
    keyword (through its torch-function dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 8) * 2)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))
        self.out = nn.Linear(8, 2)

    def forward(self, tokens):
        h = F.embedding(tokens, self.table, max_norm=1.0)  # (batch, length, 8)
        h = F.instance_norm(h.transpose(1, 2), self.mean, self.var, use_input_stats=True, momentum=0.2)
        return self.out(h.mean(2))


@pytest.mark.parametrize("seed", range(4))
def test_state_a_functional_call_updates_in_place_is_updated_where_it_lives(seed):
    """The weight read on another device than the embedding was renormalised there, on a copy:
    the model's own rows kept their norm (walkthrough: parameters 0.84 off after 3 steps); and a
    model calling F.instance_norm with its statistics failed to capture (IndexError)."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, tokens = _FunctionalRenorm(), torch.randint(0, 20, (4, 6))
    cap = capture(copy.deepcopy(model), (tokens,))
    placed = apply_placement(cap, _random_placement(cap.gm, seed), real_devices=VIRTUAL, copy_transfers=True)
    _assert_same_training(model, placed, (tokens,), "sgd")


class _EMA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.lin(x)
        self.ema.mul_(0.9).add_(0.1 * y.detach().mean(0))
        self.calls.add_(1)
        return self.out(y + self.ema)


def _ema_placed():
    from graphs.capture import capture

    torch.manual_seed(0)
    model = _EMA()
    cap = capture(model, (torch.randn(3, 4),))
    original = copy.deepcopy(model)
    # the EMA's updates on one device, its reader and the output layer on another
    placement = {n: ("b" if n in ("add", "out") else "a") for n in cap.graph.nodes}
    placed = apply_placement(cap, placement, real_devices={"a": "cpu", "b": "cpu"})
    return original, placed


def test_a_buffer_updated_in_place_is_copied_to_its_readers_after_the_update():
    _, placed = _ema_placed()
    order = [n.name for n in placed.graph.nodes]
    copies = [t for t in transfer_nodes(placed) if t.args[0].name == "ema"]
    assert copies, "the EMA is read on another device: a transfer is expected"
    updates = [n.name for n in placed.graph.nodes if n.op == "call_method" and n.target in ("mul_", "add_")]
    assert all(order.index(t.name) > max(order.index(u) for u in updates) for t in copies)


def test_a_placed_model_with_in_place_buffer_updates_matches_the_original_over_steps_and_round_trips():
    original, placed = _ema_placed()
    x = torch.randn(3, 4)
    for _ in range(3):
        assert torch.equal(placed(x), original(x))
    assert placed.calls.item() == 3
    fresh = _EMA()
    fresh.load_state_dict(placed.state_dict(), strict=True)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in fresh.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_ema_updated_on_the_gpu_and_read_on_the_cpu_matches_the_original_over_steps():
    from graphs.capture import capture

    torch.manual_seed(0)
    model = _EMA()
    x = torch.randn(3, 4)
    cap = capture(model, (x,))
    original = copy.deepcopy(model)
    placement = {n: ("cpu" if n in ("add", "out") else "cuda:0") for n in cap.graph.nodes}
    placed = apply_placement(cap, placement)
    for _ in range(3):
        assert torch.allclose(placed(x).cpu(), original(x), atol=1e-6)
    assert placed.calls.item() == 3


class _Reassigning(nn.Module):
    """Captured by torch.export (fx cannot record the reassignment), with a non-persistent and an unused buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.register_buffer("unused", torch.ones(3))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.norm(self.lin(x)) * self.calls


def test_an_exported_placed_models_state_dict_round_trips_strictly_into_the_original():
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _Reassigning(), torch.randn(5, 4)
    cap = capture(model, (x,))
    assert cap.method == "export"
    original = copy.deepcopy(model)
    placed = apply_placement(cap, {n: ("a" if i % 2 else "b") for i, n in enumerate(cap.graph.nodes)},
                             real_devices={"a": "cpu", "b": "cpu"})
    for _ in range(2):
        assert torch.allclose(placed(x), original(x))
    assert set(placed.state_dict()) == set(original.state_dict())  # scratch stays out, unused is in
    fresh = _Reassigning()
    fresh.load_state_dict(placed.state_dict(), strict=True)
    assert fresh.calls.item() == 2 and torch.equal(fresh.norm.running_mean, original.norm.running_mean)


def test_a_model_in_eval_mode_is_placed_in_the_training_mode_it_was_captured_in_throughout():
    """The placed copy's root was in training mode over BatchNorm and dropout modules in eval mode,
    which it shared with the user's model (walkthrough); the user's model stays in eval mode."""
    from graphs.capture import capture

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).eval()
    cap = capture(model, (torch.randn(3, 4),), name="eval_model")
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    assert all(m.training for m in placed.modules())
    assert not any(m.training for m in model.modules())


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    extras: tuple
    name: str = "out"


def test_to_device_moves_the_tensors_of_a_dataclass_output_and_the_check_sees_them():
    from graphs.tensor_tree import tensors_in

    out = _Output(torch.ones(2), (torch.zeros(3), 4))
    moved = to_device(out, "meta")
    assert isinstance(moved, _Output) and moved.name == "out" and moved.extras[1] == 4
    assert moved.logits.device.type == "meta" and moved.extras[0].device.type == "meta"
    assert out.logits.device.type == "cpu"  # the original is left as it was
    assert [t.shape for t in tensors_in(out)] == [(2,), (3,)]  # what the numerical check compares


class _UnrolledBatchNorm(nn.Module):
    """BatchNorm and dropout, then a loop over the batch that fx cannot trace: captured by torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(self.bn(self.a(x)))
        return torch.stack([h[i] for i in range(h.shape[0])])


def test_an_exported_graph_follows_eval_mode_as_the_original_model_does():
    """torch.export bakes training=True into BatchNorm and dropout: placed.eval() normalised by
    the batch, updated the running statistics and kept dropout on (walkthrough: 0.55 off)."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _UnrolledBatchNorm(), torch.randn(6, 4)
    cap = capture(model, (x,))
    assert cap.method == "export"
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    placed.load_state_dict(model.state_dict())
    for _ in range(2):  # training mode: batch statistics, running ones updated, batches counted
        placed.train(), model.train()
        torch.manual_seed(1)
        got = placed(x)
        torch.manual_seed(1)
        assert torch.equal(got, model(x))
        placed.eval(), model.eval()
        before = {k: v.clone() for k, v in placed.state_dict().items()}
        assert torch.equal(placed(x), model(x))  # running statistics, no dropout
        assert all(torch.equal(before[k], v) for k, v in placed.state_dict().items())  # nothing updated
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in placed.state_dict().items())
    assert int(placed.state_dict()["bn.num_batches_tracked"]) == 2


def test_an_exported_graph_recompiled_or_deep_copied_still_follows_eval_mode():
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _UnrolledBatchNorm(), torch.randn(6, 4)
    placed = apply_placement(capture(model, (x,)), {})
    placed.load_state_dict(model.state_dict())
    model.eval()
    placed.recompile()  # rebuilds forward from the graph
    ema = copy.deepcopy(placed)  # an EMA copy, as training loops make
    for m in (placed, ema):
        m.eval()
        assert torch.equal(m(x), model(x))


class _TrainingBranch(nn.Module):
    """``if self.training:`` in the user's own forward, which fx runs while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h * 0.5
        return h


class _FunctionalDropout(nn.Module):
    """``F.dropout(h, p, self.training)``: fx bakes the flag, a constant, into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(torch.relu(self.a(x)), 0.5, self.training))


def test_an_fx_graph_with_the_training_flag_as_a_constant_follows_eval_mode():
    """It ran dropout after .eval() (walkthrough); then it refused eval mode."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _FunctionalDropout(), torch.randn(6, 4)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    placed = apply_placement(cap, _round_robin(cap.gm), real_devices=VIRTUAL)  # transfers between the ops
    model.eval(), placed.eval()
    assert torch.equal(placed(x), model(x))  # no dropout
    model.train(), placed.train()
    torch.manual_seed(3)
    got = placed(x)
    torch.manual_seed(3)
    assert torch.equal(got, model(x))  # the same dropout mask


def test_an_fx_graph_that_baked_self_training_runs_the_eval_branch_in_eval_mode():
    """fx runs ``if self.training:`` while tracing; the eval mode's branch is traced too and
    runs after .eval() (before: refused, and before that the training branch ran silently)."""
    from graphs.capture import capture

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    model = _TrainingBranch()
    cap = capture(model, (x,))
    assert cap.method == "fx" and model.training
    placed = apply_placement(cap, {n: "cpu" for n in cap.graph.nodes})
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    placed.train(), model.train()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    placed_plain = apply_placement(capture(plain, (x,)), {})
    placed_plain.eval()
    plain.eval()
    torch.testing.assert_close(placed_plain(x), plain(x), rtol=0, atol=0)  # call_module layers follow eval


def test_a_stochastic_depth_model_placed_over_devices_evaluates_as_the_original():
    """Training takes the random branch, eval mode the identity: the placed model follows both,
    over a placement of four devices, and a training step between keeps one state."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = StochasticDepth(), torch.randn(16, 8)
    cap = capture(model, (x,))
    assert cap.method == "fx"
    names = [n for n in cap.graph.nodes]
    placed = apply_placement(cap, {n: f"gpu{i % 4}" for i, n in enumerate(names)},
                             real_devices={f"gpu{k}": "cpu" for k in range(4)})
    opt = torch.optim.SGD(placed.parameters(), lr=0.1)
    placed(x).sum().backward()
    opt.step()
    model.load_state_dict(placed.state_dict())
    placed.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    placed.train()
    assert not torch.equal(placed(x), model(x))  # the training branch drops paths again


class _InstanceNormLstm(nn.Module):
    """InstanceNorm with running statistics and an LSTM with dropout between its layers: torch.export
    bakes both training flags too (final review: they ran training ops after .eval())."""

    def __init__(self) -> None:
        super().__init__()
        self.n = nn.InstanceNorm1d(3, track_running_stats=True)
        self.r = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)

    def forward(self, x):
        return self.r(self.n(x).transpose(1, 2))[0]


class _ExportedTrainingBranch(nn.Module):
    """fx cannot iterate over a tensor, so torch.export captures it, running ``if self.training:``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.stack([row for row in self.a(x)])
        if self.training:
            h = h * 0.5
        return self.b(h)


def test_an_exported_graph_that_baked_self_training_runs_the_eval_branch_in_eval_mode():
    """Before, the exported graph ran the training branch after .eval(), with no error."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _ExportedTrainingBranch(), torch.randn(3, 4)
    cap = capture(model, (x,))
    assert cap.method == "export"
    placed = apply_placement(cap, alternating_placement(cap.graph),
                             real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    for twin in (copy.copy(placed), copy.deepcopy(placed)):
        torch.testing.assert_close(twin.eval()(x), model(x), rtol=0, atol=0)
    placed.train(), model.train()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)


class _EvalOnlyNumpy(nn.Module):
    """In eval mode forward leaves torch (numpy), which torch.export cannot trace; the values
    are the same in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.stack([row for row in self.a(x)])
        if not self.training:
            h = torch.from_numpy(h.detach().numpy().copy())
        return h


def test_a_model_that_cannot_be_exported_in_eval_mode_keeps_the_known_flags_with_a_warning(caplog):
    """Refusing eval mode would stop every validation pass of such a model: it switches the
    training flags placer knows, and says it could not check the model's own branches."""
    import logging

    from graphs.capture import capture

    model, x = _EvalOnlyNumpy(), torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="graphs.eval_capture"):
        cap = capture(model, (x,))
    assert cap.method == "export"
    assert "cannot capture _EvalOnlyNumpy in eval mode" in caplog.text
    placed = apply_placement(cap, {})
    placed.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)


def test_an_exported_instance_norm_and_lstm_follow_eval_mode():
    from graphs.export_tracer import export_trace

    torch.manual_seed(0)
    model, x = _InstanceNormLstm(), torch.randn(2, 3, 5)
    gm = export_trace(model, (x,))
    model.eval(), gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class _ModeConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * torch.tensor(0.5 if self.training else 2.0)  # fx keeps it as an attribute


class _RandomConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        import random

        return self.a(x) * random.random()  # fx bakes the number drawn while tracing


def test_an_fx_graph_whose_constant_is_made_by_the_mode_evaluates_with_the_eval_modes_tensor():
    """A tensor made under 'if self.training' has one name in both traces but another value: the
    eval graph reads its own (final review: the training mode's was read)."""
    from graphs.capture import capture

    model, x = _ModeConstant(), torch.randn(6, 4)
    placed = apply_placement(capture(model, (x,)), {})
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    assert set(placed.state_dict()) == set(model.state_dict())  # the eval tensor is no state


def test_an_fx_graph_with_a_random_constant_is_refused_in_training_mode_too():
    """A random number differs between any two traces: no eval graph can be trusted, and the
    training graph holds one trace's number, which the placed model trained with at every step
    (only eval mode was refused): the capture is refused."""
    from graphs.capture import capture
    from graphs.errors import CaptureError

    with pytest.raises(CaptureError, match=r"random\.random\(\)"):
        capture(_RandomConstant(), (torch.randn(6, 4),))


def test_a_pickled_or_copied_placed_model_still_follows_eval_mode():
    import pickle

    from graphs.capture import capture

    torch.manual_seed(0)
    for model, x in ((_FunctionalDropout(), torch.randn(6, 4)), (StochasticDepth(), torch.randn(6, 8)),
                     (_ModeConstant(), torch.randn(6, 4))):
        placed = apply_placement(capture(model, (x,)), {})
        model.eval()
        twins = [pickle.loads(pickle.dumps(placed)), copy.copy(placed), copy.deepcopy(placed)]
        twins[-1].recompile()
        for twin in twins:
            twin.eval()
            assert torch.equal(twin(x), model(x)), type(model).__name__
            assert set(twin.state_dict()) == set(model.state_dict())
        # The deep copy evaluates over its own parameters (an EMA copy), not the original's.
        with torch.no_grad():
            next(twins[-1].parameters()).add_(1.0)
        assert not torch.equal(twins[-1](x), model(x))


def test_the_eval_graph_runs_each_op_where_its_data_is():
    """Parameters on another device than the input (the meta device stands in for a GPU): each
    eval op runs where its module's parameters are, its activations copied there."""
    from graphs.capture import capture
    from graphs.eval_interpreter import DataFollowingInterpreter

    model, x = StochasticDepth(), torch.randn(6, 8)
    gm = capture(model, (x,)).gm
    for path in ("blocks.2", "blocks.3", "norm", "head"):
        gm.get_submodule(path).to("meta")
    gm.eval()
    out = DataFollowingInterpreter(gm, graph=gm.placer_eval_graph).run(x)
    assert out.device.type == "meta" and out.shape == (6, 3)


class _ExportedEvalCounter(nn.Module):
    """torch.export (fx cannot iterate over a tensor) with an update only eval mode makes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x):
        h = torch.stack([row for row in self.a(x)])
        if not self.training:
            self.seen.add_(h.sum(0))
        return h * 2


def test_an_eval_graphs_in_place_update_runs_where_its_buffer_is():
    """aten.add_.Tensor on a buffer on another device than its input (meta stands in for a GPU):
    run where the activation is, it updated a copy of the buffer and the update was lost
    (review: the in-place test knew only names ending in '_', not aten's overloads)."""
    from graphs.capture import capture
    from graphs.eval_interpreter import DataFollowingInterpreter

    model, x = _ExportedEvalCounter(), torch.randn(3, 4)
    cap = capture(model, (x,))
    assert cap.method == "export"
    placed = apply_placement(cap, {})
    placed.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(placed.seen, model.seen, rtol=0, atol=0)
        placed._buffers["seen"] = placed._buffers["seen"].to("meta")
        DataFollowingInterpreter(placed, graph=placed.placer_eval_graph).run(x)  # before: meta -> cpu failed


class _EvalOnlyHead(nn.Module):
    """A head only eval mode calls: the training graph never reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.eval_head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            return self.b(h)
        return self.eval_head(h)


def test_a_module_only_eval_mode_calls_evaluates_as_the_original():
    """complete_state put the head's parameters on a bare nn.Module at its path, which the eval
    graph then called: 'Module [Module] is missing the required forward function' (review)."""
    import pickle

    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _EvalOnlyHead(), torch.randn(3, 4)
    cap = capture(model, (x,))
    placed = apply_placement(cap, alternating_placement(cap.graph),
                             real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    assert list(placed.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        placed.eval_head.weight.add_(1.0)  # the placed model's own head, loaded back into the original
    model.load_state_dict(placed.state_dict())
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    for twin in (copy.copy(placed), copy.deepcopy(placed), pickle.loads(pickle.dumps(placed))):
        torch.testing.assert_close(twin.eval()(x), model(x), rtol=0, atol=0)
        assert any(p is twin.eval_head.weight for p in twin.parameters())


def test_an_exported_transformer_encoder_says_its_eval_mode_is_not_the_no_grad_fast_path(caplog):
    """Under torch.no_grad() nn.TransformerEncoder in eval mode runs PyTorch's fast path, nested
    tensors included, which torch.export never records: at positions a padding mask pads the
    original gives 0 and the placed model the standard path's values (review: 1.97 apart, with
    no word). With gradients on both run the standard path, exactly alike."""
    import logging

    from graphs.capture import capture

    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    x, pad = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False, False, False, True, True]])
    with caplog.at_level(logging.WARNING, logger="graphs.eval_capture"):
        cap = capture(model, (x, None, pad))
    assert cap.method == "export"
    assert "fast path" in caplog.text and "layers.0" in caplog.text
    placed = apply_placement(cap, {})
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x, None, pad), model(x, None, pad), rtol=0, atol=0)


class _KeywordsAndTrainingBranch(nn.Module):
    """fx traces it (defaults become its placeholders' defaults); eval mode takes another branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, scale: float = 2.0, shift=None):
        h = self.a(x) * scale
        if self.training:
            h = h * 0.5
        return h


def test_the_eval_forward_takes_its_arguments_as_the_training_forward_does():
    """By name, by position, with defaults, and too many refused, in both modes (review: a
    torch.export model refused placed(x=x) in eval mode only, and fx's eval forward dropped
    extra positional arguments without a word)."""
    from graphs.capture import capture
    from graphs.errors import CaptureError

    torch.manual_seed(0)
    exported, x = _ExportedTrainingBranch(), torch.randn(3, 4)
    placed = apply_placement(capture(exported, (x,)), {})
    for mode in (False, True):
        placed.train(mode), exported.train(mode)
        torch.testing.assert_close(placed(x=x), exported(x), rtol=0, atol=0)
        with pytest.raises((TypeError, CaptureError)):  # CaptureError: another structure than the example's
            placed(x, x)
    model = _KeywordsAndTrainingBranch()
    cap = capture(model, (x,))
    assert cap.method == "fx"
    placed = apply_placement(cap, {})
    for mode in (False, True):
        placed.train(mode), model.train(mode)
        for args, kwargs in (((x,), {}), ((), {"x": x}), ((x, 3.0), {}), ((x,), {"scale": 3.0})):
            torch.testing.assert_close(placed(*args, **kwargs), model(*args, **kwargs), rtol=0, atol=0)
        with pytest.raises(TypeError):
            placed(x, 3.0, None, 7)


class _EvalOnlyStash(nn.Module):
    """Sets a Python attribute in eval mode only, which no graph records: eval mode is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if not self.training:
            self.last = h.detach()
        return h


def test_a_copied_deep_copied_or_pickled_model_that_refuses_eval_mode_still_refuses_it():
    """The refusal was a forward pre-hook, which fx's rebuilds drop: an EMA copy of such a
    placed model ran the training branch after .eval() with no error (review)."""
    import pickle

    from graphs.capture import capture
    from graphs.errors import CaptureError

    x = torch.randn(6, 4)
    placed = apply_placement(capture(_EvalOnlyStash(), (x,)), {})
    for twin in (placed, copy.copy(placed), copy.deepcopy(placed), pickle.loads(pickle.dumps(placed))):
        twin(x)
        twin.eval()
        with pytest.raises(CaptureError, match="load_state_dict"):
            twin(x)


def test_a_deep_copy_of_a_placed_model_evaluates_where_the_placed_model_does():
    """The eval graph follows the placement and moves its output to the placed output device;
    fx's copies dropped both (review: an EMA copy's eval output stayed on its last op's device)."""
    from graphs.capture import capture

    model, x = StochasticDepth(), torch.randn(6, 8)
    cap = capture(model, (x,))
    placed = apply_placement(cap, alternating_placement(cap.graph),
                             real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    for twin in (copy.copy(placed), copy.deepcopy(placed)):
        for key in ("placer_placement", "placer_real_devices", "placer_output_device"):
            assert getattr(twin, key) == getattr(placed, key), key


class _ExportedBatchNorm(nn.Module):
    """torch.export captures it (fx cannot iterate over a tensor): one BatchNorm, its flag baked."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(torch.stack([row for row in self.a(x)]))


def test_an_exported_module_set_to_another_mode_than_the_placed_model_is_refused():
    """placed.train(); placed.bn.eval() (a BatchNorm frozen for fine-tuning): the exported graph
    still normalised by the batch and updated the statistics, with no error (review). Frozen
    before capture, it stays frozen and trains as the original."""
    from graphs.capture import capture
    from graphs.errors import CaptureError

    torch.manual_seed(0)
    model, x = _ExportedBatchNorm(), torch.randn(6, 4)
    cap = capture(model, (x,))
    assert cap.method == "export"
    placed = apply_placement(cap, {})
    placed.bn.eval()
    with pytest.raises(CaptureError, match="module 'bn' is in eval mode"):
        placed(x)
    placed.eval()
    placed.bn.train()
    with pytest.raises(CaptureError, match="module 'bn' is in training mode"):
        placed(x)
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)

    model.train(), model.bn.eval()  # frozen before the capture
    placed = apply_placement(capture(model, (x,)), {})
    assert placed.training and not placed.bn.training
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(placed.bn.running_mean, model.bn.running_mean, rtol=0, atol=0)
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)


class _Factories(nn.Module):
    """Tensors made in forward with no device: deterministic factories and a random draw."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        pos = torch.arange(x.shape[1])
        h = self.fc(x + pos + torch.full((x.shape[1],), 2.0, dtype=torch.float64).float())
        return h * torch.ones(x.shape[1]) + torch.randn(x.shape[1])


class _NoParameters(_Factories):
    """The same forward without parameters, so that it can run on the meta device standing in for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Identity()


def _meta_is_a_device(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A placement onto ``meta``, which stands in for a GPU on a CPU-only machine (apply refuses it
    otherwise: it cannot run a model with parameters, and this one has none)."""
    import envs.runtime.device_names as device_names

    monkeypatch.setattr(device_names, "real_device_problem", lambda name: None)
    return {"host": "cpu", "gpu": "meta"}


def test_a_factory_without_a_device_makes_its_tensor_where_it_was_placed(monkeypatch):
    """torch.arange(n) in an fx graph made its tensor on the default device whatever the placement:
    placed on a GPU, its consumer there got a CPU tensor and no transfer (walkthrough leftover)."""
    real = _meta_is_a_device(monkeypatch)
    gm = fx.symbolic_trace(_NoParameters())
    placed = apply_placement(gm, {n.name: "gpu" for n in gm.graph.nodes}, real_devices=real)
    nodes = {n.name: n for n in placed.graph.nodes}
    assert nodes["arange"].kwargs == {"device": torch.device("meta")}
    assert nodes["full"].kwargs == {"dtype": torch.float64, "device": torch.device("meta")}  # dtype kept
    assert nodes["ones"].kwargs == {"device": torch.device("meta")}
    out = placed(torch.randn(3, 5))
    assert out.device.type == "meta" and out.shape == (3, 5)


def test_a_random_draw_stays_where_the_original_draws_and_is_copied_to_its_device(monkeypatch):
    """torch.randn drawn on a GPU draws other numbers than on the CPU: it keeps drawing where the
    original does, and a transfer brings its value to its placed device."""
    real = _meta_is_a_device(monkeypatch)
    gm = fx.symbolic_trace(_NoParameters())
    placement = {n.name: "gpu" for n in gm.graph.nodes}
    placed = apply_placement(gm, placement, real_devices=real)
    randn = next(n for n in placed.graph.nodes if n.name == "randn")
    assert "device" not in randn.kwargs
    (copy,) = randn.users
    assert copy in transfer_nodes(placed) and copy.args[1] == "meta" and copy.meta["placer_transfer"] == ("cpu", "gpu")
    assert placed.placer_placement["randn"] == "gpu" == placed.placer_placement[copy.name]
    # Placed where the original draws, nothing is added.
    placement["randn"] = "host"
    on_host = apply_placement(gm, placement, real_devices=real)
    randn = next(n for n in on_host.graph.nodes if n.name == "randn")
    assert "device" not in randn.kwargs and [t.args[0].name for t in transfer_nodes(on_host)].count("randn") == 1


def test_an_exported_random_draw_keeps_the_device_the_capture_baked(monkeypatch):
    """torch.export bakes device=cpu into randn too: it was rewritten with the deterministic
    factories, drawing on the placed device other numbers than the original."""
    real = _meta_is_a_device(monkeypatch)
    gm = torch.export.export(_NoParameters(), (torch.randn(3, 5),), strict=False).module()
    placed = apply_placement(gm, {n.name: "gpu" for n in gm.graph.nodes}, real_devices=real)
    nodes = {n.name: n for n in placed.graph.nodes}
    assert nodes["arange"].kwargs["device"] == torch.device("meta")
    assert nodes["randn"].kwargs["device"] == torch.device("cpu")
    assert [u for u in nodes["randn"].users if u in transfer_nodes(placed)]
    assert placed(torch.randn(3, 5)).device.type == "meta"


@pytest.mark.parametrize("capture_kind", ["fx", "export"])
def test_factories_in_forward_train_like_the_original_on_cpu_devices(capture_kind):
    """The rewrite changes no value: outputs, gradients and optimizer steps as the original's,
    random draw included (seeded alike on both sides)."""
    torch.manual_seed(0)
    inputs = (torch.randn(3, 5),)
    gm = _capture(capture_kind, _Factories(), inputs)
    reference = copy.deepcopy(gm)
    placed = apply_placement(gm, _round_robin(gm), real_devices=VIRTUAL)
    _assert_same_training(reference, placed, inputs, "sgd", seed=1)


class _TwoOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cos(torch.sin(self.a(x)))


def test_a_placed_model_keeps_its_transfers_through_pickle(monkeypatch):
    """Unpickling a GraphModule re-traces its code, and to_device handed fx's Proxy back untouched:
    torch.save(placed) came back without a single transfer, its ops reading tensors of another
    device (meta stands in for a GPU: the output stayed on the CPU)."""
    import pickle

    real = _meta_is_a_device(monkeypatch)
    gm = fx.symbolic_trace(_NoParameters())
    placement = {n.name: "gpu" for n in gm.graph.nodes}
    placement.update(x="host", getattr_1="host", getitem="host", arange="host")
    placed = apply_placement(gm, placement, real_devices=real)
    again = pickle.loads(pickle.dumps(placed))
    moves = [(n.args[0].name, n.args[1], n.kwargs) for n in again.graph.nodes if n.target is to_device]
    assert sorted(moves) == sorted((t.args[0].name, t.args[1], t.kwargs) for t in transfer_nodes(placed))
    assert again(torch.randn(3, 5)).device.type == "meta"
    # Values too, on devices that run: the same outputs after the round trip.
    torch.manual_seed(0)
    model, x = _TwoOps(), torch.randn(3, 4)
    gm = fx.symbolic_trace(model)
    placed = apply_placement(gm, dict(zip(("a", "sin", "cos"), ("gpu0", "gpu1", "gpu0"))), real_devices=VIRTUAL)
    again = pickle.loads(pickle.dumps(placed))
    assert sum(n.target is to_device for n in again.graph.nodes) == len(transfer_nodes(placed)) > 0
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


class _ExportedLstm(nn.Module):
    """torch.export captures it (fx cannot iterate over a tensor): an LSTM, its flag baked."""

    def __init__(self, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=num_layers, dropout=dropout, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.lstm(torch.stack([row for row in x]))[0])


@pytest.mark.parametrize("num_layers, dropout, refused", [(2, 0.0, False), (1, 0.5, False), (2, 0.5, True)])
def test_an_exported_lstm_set_to_eval_mode_alone_is_refused_only_where_its_dropout_drops(num_layers, dropout, refused):
    """placed.lstm.eval() during training (a validation pass of the LSTM alone) was refused for
    every exported LSTM, though without dropout between layers both modes compute the same
    (walkthrough). Where the dropout drops, the exported graph would still drop: refused."""
    import warnings

    from graphs.capture import capture
    from graphs.errors import CaptureError

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM warns of dropout on one layer
        model = _ExportedLstm(num_layers, dropout)
    x = torch.randn(3, 5, 4)
    cap = capture(model, (x,))
    assert cap.method == "export"
    placed = apply_placement(cap, alternating_placement(cap.graph),
                             real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    placed.lstm.eval(), model.lstm.eval()
    if refused:
        with pytest.raises(CaptureError, match="module 'lstm' is in eval mode"):
            placed(x)
    else:
        torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)


def _emulate_meta_as_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let apply place onto the meta device, standing in for a GPU on a CPU-only machine."""
    import envs.runtime.device_names as device_names
    import envs.runtime.state_mover as state_mover

    def swapped(t: torch.Tensor, device: str) -> None:  # .data cannot change a CPU tensor into a meta one
        if str(t.device) != device:
            moved = t.detach().to(device)
            torch.utils.swap_tensors(t, nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved)

    monkeypatch.setattr(device_names, "real_device_problem", lambda device: None)
    monkeypatch.setattr(state_mover._Mover, "_move_tensor", staticmethod(swapped))


def test_a_module_only_eval_mode_calls_is_placed_where_its_data_is(monkeypatch):
    """fx's training graph never reads an eval-only head, so no placement placed it: it stayed
    where the user's model was, and every eval forward copied its input there and back
    (walkthrough: a GPU placement evaluated its head on the CPU). The meta device stands in for
    a GPU: the head now goes where ``a``, which feeds it, is placed, and the eval forward copies
    nothing to the CPU. (torch.export's graph reads every parameter: its placement places the head.)"""
    import graphs.eval_interpreter as eval_interpreter
    from graphs.capture import capture

    _emulate_meta_as_a_gpu(monkeypatch)
    x = torch.randn(3, 4)
    cap = capture(_EvalOnlyHead(), (x,))
    assert cap.method == "fx"
    placed = apply_placement(cap, {n: "gpu1" if n == "a" else "gpu0" for n in cap.graph.nodes}, output_device="gpu1",
                             real_devices={"gpu0": "cpu", "gpu1": "meta"})
    assert placed.a.weight.device.type == "meta" and placed.b.weight.device.type == "cpu"
    assert {p.device.type for p in placed.eval_head.parameters()} == {"meta"}
    copies: list[torch.device] = []
    monkeypatch.setattr(eval_interpreter, "_moved", lambda value, device: copies.append(device) or value.to(device))
    placed.eval()
    assert placed(x.to("meta")).device.type == "meta"
    assert torch.device("cpu") not in copies


class _EvalOnlyBranches(nn.Module):
    """Eval mode calls a block with a BatchNorm, fed by ``a``, and a layer fed by the input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.eval_block = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
        self.eval_skip = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            return self.b(h)
        return self.eval_block(h) + self.eval_skip(x)


def test_eval_only_modules_go_where_placed_data_feeds_them_and_stay_where_only_inputs_do(monkeypatch):
    """The block (its buffers too) follows ``a`` onto the meta device standing in for a GPU; the
    layer that reads only the caller's input, whose device apply cannot know, stays where it was.
    Over virtual devices on the CPU the placed model evaluates exactly as the original."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _EvalOnlyBranches(), torch.randn(3, 4)
    with torch.no_grad():
        model.eval_block[0].running_mean.uniform_()  # eval mode reads them: not the defaults
    cap = capture(model, (x,))
    assert cap.method == "fx"
    placed = apply_placement(cap, alternating_placement(cap.graph),
                             real_devices={"gpu0": "cpu", "gpu1": "cpu"})
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)

    _emulate_meta_as_a_gpu(monkeypatch)
    placed = apply_placement(cap, {n: "gpu1" if n == "a" else "gpu0" for n in cap.graph.nodes},
                             real_devices={"gpu0": "cpu", "gpu1": "meta"})
    assert {t.device.type for t in [*placed.eval_block.parameters(), *placed.eval_block.buffers()]} == {"meta"}
    assert {p.device.type for p in placed.eval_skip.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_module_only_eval_mode_calls_goes_to_the_gpu_that_feeds_it():
    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _EvalOnlyHead(), torch.randn(3, 4)
    cap = capture(model, (x,))
    placed = apply_placement(cap, {n: "cuda:0" if n == "a" else "cpu" for n in cap.graph.nodes})
    assert placed.eval_head.weight.device.type == "cuda"
    placed.eval(), model.eval()
    out = placed(x)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("model_type", [_ExportedTrainingBranch, _ExportedBatchNorm])
def test_a_placed_exported_model_saved_and_loaded_trains_and_evaluates_as_before(model_type):
    """torch.save of such a model failed on load (fx rebuilds export's tracer, which needs a
    scope_root): it is saved node by node, with its eval mode and its input checks."""
    import io

    from graphs.capture import capture
    from graphs.errors import CaptureError

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    cap = capture(model_type(), (x,))
    assert cap.method == "export"
    placed = apply_placement(cap, {n: ("cpu:0" if i % 2 else "cpu:1") for i, n in enumerate(cap.graph.nodes)},
                             real_devices={"cpu:0": "cpu", "cpu:1": "cpu"})
    buffer = io.BytesIO()
    torch.save(placed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in placed.graph.nodes]
    for mode in ("train", "eval"):
        getattr(placed, mode)(), getattr(loaded, mode)()
        torch.testing.assert_close(loaded(x), placed(x), rtol=0, atol=0)
    with pytest.raises(CaptureError, match="differ"):
        loaded(x, None)  # the example had no second input: the input check came along


class _ScaledByConstant(nn.Module):
    """``torch.tensor([...])`` in forward: fx keeps it as a constant of the graph, not as state."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x * torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_copies_and_pickles_of_a_placed_model_keep_the_models_state_dict():
    """fx's deep copy and unpickling register a constant as a buffer: copy.deepcopy(placed) (an EMA
    copy) had _tensor_constant0 in its state_dict(), which the original refused to load (strict)."""
    import pickle

    from graphs.capture import capture

    model, x = _ScaledByConstant(), torch.randn(3, 4)
    cap = capture(model, (x,))
    placed = apply_placement(cap, _random_placement(cap.gm, 0), real_devices=VIRTUAL, copy_transfers=True)
    for twin in (copy.deepcopy(placed), copy.copy(placed), pickle.loads(pickle.dumps(placed))):
        assert list(twin.state_dict()) == list(model.state_dict())
        copy.deepcopy(model).load_state_dict(twin.state_dict(), strict=True)
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


class _NoisyBackbone(nn.Module):
    """A block fx and torch.export trace through, branching on its own mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
        return h


class _FrozenBackbone(nn.Module):
    def __init__(self, export: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.backbone = _NoisyBackbone()
        self.head = nn.Linear(8, 2)
        self.export = export

    def forward(self, x):
        if self.export:
            with torch.no_grad():  # reads a parameter: torch.export captures the model
                x = x * self.head.weight.abs().mean()
        return self.head(self.backbone(self.norm(x)))


@pytest.mark.parametrize("export", [False, True])
def test_a_block_set_to_eval_mode_alone_whose_mode_the_graph_baked_is_refused(export):
    """placed.backbone.eval() (a frozen backbone) changed nothing: the tracers ran its
    `if self.training:` once, so the placed model kept adding noise, with no error (walkthrough:
    outputs 0.13 off under fx, 0.015 under torch.export; fx's F.dropout(h, p, self.training) the
    same, 0.52). A torch.nn layer called whole by fx still follows its own flag."""
    from graphs.capture import capture
    from graphs.errors import CaptureError

    torch.manual_seed(0)
    model, x = _FrozenBackbone(export), torch.randn(6, 8)
    cap = capture(model, (x,))
    assert cap.method == ("export" if export else "fx")
    placed = apply_placement(cap, _random_placement(cap.gm, 1), real_devices=VIRTUAL, copy_transfers=True)
    placed.backbone.eval()
    with pytest.raises(CaptureError, match="module 'backbone' is in eval mode"):
        placed(x)
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    placed.train(), model.train()
    if not export:
        placed.norm.eval(), model.norm.eval()
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(placed(x), want, rtol=0, atol=0)


class _UpdatesItsInput(nn.Module):
    """forward() updates the caller's tensor in place, through its name and through a view."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        x.mul_(2.0)
        x[:, 0] = 0.0
        x.add_(1.0)
        return self.a(x)


@pytest.mark.parametrize("seed", range(4))
def test_an_input_updated_in_place_is_updated_once_and_written_back_to_the_caller(seed):
    """Copied to each op that read it, each update of an input landed on a copy of its own: the
    output missed them and the caller's tensor was left as it was (walkthrough: outputs 2.19
    off, the input 4.93 off, over two devices with copying transfers)."""
    import pickle

    from graphs.capture import capture

    torch.manual_seed(0)
    model, x = _UpdatesItsInput(), torch.randn(6, 8)
    cap = capture(copy.deepcopy(model), (x.clone(),))
    placed = apply_placement(cap, _random_placement(cap.gm, seed), real_devices=VIRTUAL, copy_transfers=True)
    for twin in (placed, pickle.loads(pickle.dumps(placed))):
        mine, theirs = x.clone(), x.clone()
        torch.testing.assert_close(twin(theirs), model(mine), rtol=0, atol=0)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


class _BlockInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _NoisyBackbone()  # fx traces through it
        self.head = nn.Linear(8, 2)  # fx calls it whole

    def forward(self, x):
        return self.head(self.block(x))


def test_a_hook_registered_on_a_module_the_placed_graph_never_calls_is_refused():
    """fx traced through `block`: the placed model runs its ops and never calls it, so a hook
    registered on it after capture never ran (walkthrough: a forward hook doubling the block's
    output, loss 0.29 off, no error). Copies keep the refusal; a layer the graph calls runs its own."""
    import pickle

    from graphs.capture import capture
    from graphs.errors import CaptureError

    torch.manual_seed(0)
    model, x = _BlockInside(), torch.randn(6, 8)
    cap = capture(model, (x,))
    placed = apply_placement(cap, _random_placement(cap.gm, 0), real_devices=VIRTUAL, copy_transfers=True)
    placed.head.register_forward_hook(_double_output)
    model.head.register_forward_hook(_double_output)
    placed.eval(), model.eval()
    torch.testing.assert_close(placed(x), model(x), rtol=0, atol=0)
    placed.block.register_forward_hook(_double_output)
    for twin in (placed, copy.deepcopy(placed), pickle.loads(pickle.dumps(placed))):
        with pytest.raises(CaptureError, match="module 'block' of the placed model has a hook"):
            twin(x)


def _double_output(module, args, output):
    return output * 2


def _rows_kept(grad: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(grad)
    mask[:5] = 0
    return grad * mask


def _halve_grad(p: torch.Tensor) -> None:
    p.grad.mul_(0.5)


class _HookedWeights(nn.Module):
    """Gradient hooks the model puts on its own weights: embedding rows kept frozen, a halved
    gradient once accumulated."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 2)
        self.emb.weight.register_hook(_rows_kept)
        self.out.weight.register_post_accumulate_grad_hook(_halve_grad)
        self.out.bias._optim = {"lr": 0.0}  # an attribute the training loop sorts parameters by

    def forward(self, tokens):
        return self.out(self.emb(tokens).mean(1))


@pytest.mark.parametrize("seed", range(2))
def test_gradient_hooks_and_attributes_of_the_models_parameters_are_the_placed_models(seed):
    """apply's deep copy copied each parameter's data and not its hooks or attributes: the placed
    model's gradients were the unhooked ones (walkthrough: 0.106 off), with no error, and a
    parameter's `_optim` (per-parameter optimizer settings, as S4/Mamba set them) was gone."""
    from graphs.capture import capture

    torch.manual_seed(0)
    model, tokens = _HookedWeights(), torch.randint(0, 20, (4, 6))
    cap = capture(model, (tokens,))
    placed = apply_placement(cap, _random_placement(cap.gm, seed), real_devices=VIRTUAL, copy_transfers=True)
    reference = _HookedWeights()
    reference.load_state_dict(model.state_dict())
    assert [getattr(p, "_optim", None) for p in placed.parameters()] == [None, None, {"lr": 0.0}]
    _assert_same_training(reference, placed, (tokens,), "sgd")


class _PrunedAndNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _pruned_and_normed() -> nn.Module:
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = _PrunedAndNormed()
    prune.l1_unstructured(model.a, "weight", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, and still used
        nn.utils.weight_norm(model.b)
    return model


@pytest.mark.parametrize("seed", range(2))
def test_a_model_pruned_or_weight_normed_before_capture_is_placed_and_trains_like_the_original(seed):
    """prune and the old weight_norm keep a computed weight as an attribute, which torch refuses to
    deep-copy: apply_placement failed on every such model (RuntimeError)."""
    from graphs.capture import capture

    x = torch.randn(6, 8)
    cap = capture(_pruned_and_normed(), (x,))
    placed = apply_placement(cap, _random_placement(cap.gm, seed), real_devices=VIRTUAL, copy_transfers=True)
    _assert_same_training(_pruned_and_normed(), placed, (x,), "sgd")
