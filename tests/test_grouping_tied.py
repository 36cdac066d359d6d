"""Tied weights: the tensor's holders share a group, without fusing the model between them."""

import torch
from torch import nn

from envs.runtime.apply import apply_placement
from graphs.capture import capture
from graphs.grouping import group_graph


class TiedLM(nn.Module):
    def __init__(self, vocab=50, width=16, layers=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = torch.relu(block(h))
        return h @ self.embed.weight.t()  # the head reuses the embedding matrix


def _captured():
    torch.manual_seed(0)
    model = TiedLM()
    return capture(model, (torch.randint(0, 50, (2, 7)),), name="tied")


def test_a_tied_weight_stays_with_its_owning_module_and_the_blocks_stay_separate():
    cap = _captured()
    grouping = group_graph(cap.graph, gm=cap.gm, tiny_op_seconds=0.0)
    g = grouping.op_to_group
    attr = next(n for n, a in cap.graph.nodes(data=True) if a["op"] == "get_attr" and a["target"] == "embed.weight")
    embed = next(n for n, a in cap.graph.nodes(data=True) if a["op"] == "call_module" and a["target"] == "embed")
    blocks = [n for n, a in cap.graph.nodes(data=True) if a["op"] == "call_module" and a["target"].startswith("blocks.")]
    assert g[attr] == g[embed]
    assert len({g[b] for b in blocks}) == len(blocks)  # not one fused blob from embedding to head


def test_the_same_without_the_graph_module_by_module_paths():
    cap = _captured()
    grouping = group_graph(cap.graph, tiny_op_seconds=0.0)
    attr = next(n for n, a in cap.graph.nodes(data=True) if a["op"] == "get_attr")
    embed = next(n for n, a in cap.graph.nodes(data=True) if a["op"] == "call_module" and a["target"] == "embed")
    assert grouping.op_to_group[attr] == grouping.op_to_group[embed]


def test_a_group_placement_of_a_tied_model_applies_and_matches():
    cap = _captured()
    grouping = group_graph(cap.graph, gm=cap.gm, tiny_op_seconds=0.0)
    groups = sorted(set(grouping.op_to_group.values()))
    group_devices = {grp: ("a", "b")[i % 2] for i, grp in enumerate(groups)}
    assignment = grouping.expand(group_devices)
    placed = apply_placement(cap, assignment, real_devices={"a": "cpu", "b": "cpu"})
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(placed(tokens), cap.model(tokens))


class HeadTiedLM(nn.Module):
    """The nanoGPT way: the head is an ``nn.Linear`` whose weight is the embedding's."""

    def __init__(self, vocab=50, width=16, layers=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(h)


def test_a_layer_holding_another_layers_weight_does_not_fuse_the_blocks_between_them():
    torch.manual_seed(0)
    cap = capture(HeadTiedLM(), (torch.randint(0, 50, (2, 7)),), name="head_tied")
    grouping = group_graph(cap.graph, gm=cap.gm, tiny_op_seconds=0.0)
    g = grouping.op_to_group
    nodes = dict(cap.graph.nodes(data=True))
    blocks = [n for n, a in nodes.items() if a["op"] == "call_module" and a["target"].startswith("blocks.")]
    embed = next(n for n, a in nodes.items() if a["op"] == "call_module" and a["target"] == "embed")
    weight = next(n for n, a in nodes.items() if a["op"] == "get_attr" and a["target"] == "embed.weight")
    assert not any(a["op"] == "call_module" and a["target"] == "head" for a in nodes.values())  # traced through
    assert g[weight] == g[embed]
    assert len({g[b] for b in blocks} | {g[embed]}) == len(blocks) + 1


def test_a_placement_splitting_a_head_tied_to_its_embedding_trains_the_same():
    torch.manual_seed(0)
    model = HeadTiedLM()
    cap = capture(model, (torch.randint(0, 50, (2, 7)),), name="head_tied")
    grouping = group_graph(cap.graph, gm=cap.gm, tiny_op_seconds=0.0)
    groups = sorted(set(grouping.op_to_group.values()), key=lambda name: int(name[1:]))
    placed = apply_placement(cap, grouping.expand({grp: ("a", "b")[i % 2] for i, grp in enumerate(groups)}),
                             real_devices={"a": "cpu", "b": "cpu"})
    tokens = torch.randint(0, 50, (2, 7))
    placed(tokens).square().mean().backward()
    cap.model(tokens).square().mean().backward()
    torch.testing.assert_close(dict(placed.named_parameters())["embed.weight"].grad, model.embed.weight.grad)
    assert placed.get_parameter("embed.weight") is placed.get_submodule("head").weight
