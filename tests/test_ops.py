"""The op vocabulary: view ops really alias their input in PyTorch, contiguous is costed as a copy but
grouped with its producer, and FLOP counting and grouping read one set."""

from __future__ import annotations

import operator

import networkx as nx
import pytest
import torch
import torch.fx as fx

from graphs.flops import node_bytes_moved, node_flops
from graphs.grouping import group_graph, is_inplace, is_view
from graphs.ops import (
    AUGMENTED_ASSIGNMENTS,
    COPY_OPS,
    INPLACE_OPERATOR_NAMES,
    INPLACE_OPERATORS,
    LAYOUT_OPS,
    STAYS_WITH_INPUT_OPS,
    VIEW_OPS,
    canonical_op_name,
    op_name,
)

# Tensor-method calls of ops in VIEW_OPS that return a tensor, on a 2x3x4 float tensor.
_VIEW_CALLS = {
    "view": lambda x: x.view(6, 4), "reshape": lambda x: x.reshape(6, 4), "permute": lambda x: x.permute(2, 0, 1),
    "transpose": lambda x: x.transpose(0, 1), "mT": lambda x: x.mT, "expand": lambda x: x[:1].expand(5, 3, 4),
    "squeeze": lambda x: x[:1].squeeze(0), "unsqueeze": lambda x: x.unsqueeze(0), "flatten": lambda x: x.flatten(1),
    "unflatten": lambda x: x.unflatten(2, (2, 2)), "narrow": lambda x: x.narrow(2, 1, 2),
    "select": lambda x: x.select(0, 1), "getitem": lambda x: x[1, :, 1:3], "split": lambda x: x.split(2, dim=2)[1],
    "tensor_split": lambda x: x.tensor_split(2, dim=2)[1], "chunk": lambda x: x.chunk(2, dim=2)[1],
    "unbind": lambda x: x.unbind(0)[1], "as_strided": lambda x: x.as_strided((2, 2), (1, 1)),
    "detach": lambda x: x.detach(), "diagonal": lambda x: x.diagonal(dim1=1, dim2=2),
    "unfold": lambda x: x.unfold(2, 2, 1), "movedim": lambda x: x.movedim(0, 2), "swapaxes": lambda x: x.swapaxes(0, 2),
    "real": lambda x: x.real, "view_as_real": lambda x: torch.view_as_real(x.to(torch.complex64)),
}


def _shares_storage(out: torch.Tensor, x: torch.Tensor) -> bool:
    return out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", sorted(_VIEW_CALLS))
def test_each_view_op_returns_a_tensor_sharing_its_input_storage(name):
    assert name in VIEW_OPS
    x = torch.randn(2, 3, 4)
    if name == "view_as_real":
        x = x.to(torch.complex64)
        assert _shares_storage(torch.view_as_real(x), x)
    else:
        assert _shares_storage(_VIEW_CALLS[name](x), x)


def test_contiguous_copies_only_a_non_contiguous_input_so_it_is_a_layout_op_not_a_view():
    x = torch.randn(3, 4)
    assert _shares_storage(x.contiguous(), x)
    assert not _shares_storage(x.t().contiguous(), x)
    assert "contiguous" in LAYOUT_OPS and "contiguous" in COPY_OPS and "contiguous" not in VIEW_OPS
    assert LAYOUT_OPS <= STAYS_WITH_INPUT_OPS and VIEW_OPS <= STAYS_WITH_INPUT_OPS
    assert not (VIEW_OPS & COPY_OPS)


class _TransposeThenPack(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x).t().contiguous() + 1


def test_contiguous_moves_bytes_without_flops_and_is_grouped_with_its_producer():
    gm = fx.symbolic_trace(_TransposeThenPack())
    shape = {"x": (3, 4), "relu": (3, 4), "t": (4, 3), "contiguous": (4, 3), "add": (4, 3)}
    node = {n.name: n for n in gm.graph.nodes}

    def shape_of(arg):
        return shape.get(getattr(arg, "name", None))

    contiguous, t = node["contiguous"], node["t"]
    assert node_flops(contiguous, None, shape_of, (4, 3)) == 0
    assert node_bytes_moved(contiguous, [48], 48, 0) == 96
    assert node_flops(t, None, shape_of, (4, 3)) == 0 and node_bytes_moved(t, [48], 48, 0) == 0

    g = nx.DiGraph(name="m", fingerprint="f")
    for name in ("x", "relu", "t", "contiguous", "add"):
        n = node[name]
        g.add_node(name, op=n.op, target=str(n.target) if n.op == "call_method" else f"torch.{name}",
                   flops=1, bytes_moved=1, out_bytes=48, param_bytes=0, requires_grad=True,
                   fwd_time={}, bwd_time={}, opt_time={}, time={})
    for a, b in (("x", "relu"), ("relu", "t"), ("t", "contiguous"), ("contiguous", "add")):
        g.add_edge(a, b, bytes=48)
    assert is_view(g.nodes["contiguous"]) and is_view(g.nodes["t"])
    grp = group_graph(g)
    assert grp.op_to_group["contiguous"] == grp.op_to_group["t"] == grp.op_to_group["relu"]
    assert grp.op_to_group["add"] != grp.op_to_group["relu"]


def test_an_op_has_one_name_from_a_node_and_from_its_target_text():
    gm = fx.symbolic_trace(_TransposeThenPack())
    names = {n.name: op_name(n) for n in gm.graph.nodes}
    assert names == {"x": "placeholder", "relu": "relu", "t": "t", "contiguous": "contiguous", "add": "add",
                     "output": "output"}
    assert op_name("aten.view.default") == "view" and op_name("torch.relu_") == "relu_"
    graph = fx.Graph()
    x = graph.placeholder("x")
    aten_add_ = graph.call_function(torch.ops.aten.add_.Tensor, (x, x))
    assert op_name(aten_add_) == op_name(str(aten_add_.target)) == "add_"
    assert canonical_op_name("add_") == "add" and canonical_op_name("__iadd__") == "iadd"
    assert canonical_op_name("copy_") == "copy_"


def test_grouping_and_apply_share_one_list_of_python_operators_that_update_their_left_operand():
    assert INPLACE_OPERATORS == ({getattr(operator, name) for name in INPLACE_OPERATOR_NAMES}
                                 | set(AUGMENTED_ASSIGNMENTS.values()))
    assert set(AUGMENTED_ASSIGNMENTS) == INPLACE_OPERATOR_NAMES - {"setitem"}
    assert is_inplace({"op": "call_function", "target": "graphs.ops.iadd"})  # placer's tracer records x += y so
    # x[i] = y mutates x (the fx node is operator.setitem): grouping keeps it with x's producer.
    assert is_inplace({"op": "call_function", "target": "operator.setitem"})
    assert is_inplace({"op": "call_method", "target": "__setitem__"})
    assert is_inplace({"op": "call_function", "target": "operator.iadd"})
    assert not is_inplace({"op": "call_function", "target": "operator.add"})
    assert not is_inplace({"op": "call_function", "target": "operator.getitem"})
