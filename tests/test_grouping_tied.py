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
