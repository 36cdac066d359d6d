"""Forward FLOPs and bytes moved of one fx node, from shapes alone.

Exact (a multiply-add counts 2) for the ops that dominate training time: linear, matmul,
mm, bmm, addmm, baddbmm, convolutions (incl. transposed), einsum, scaled-dot-product
attention, ``nn.MultiheadAttention`` and the recurrent modules (LSTM/GRU/RNN and their
cells, counted from their actual weight matrices). Everything else that produces a tensor
is costed ~ the number of elements it touches (``max(in, out)``, a small factor for
normalisations and softmax); views, shape queries and graph plumbing cost nothing.

The same table serves both capture paths: an op is recognised by its canonical name,
whether it arrives as ``torch.nn.functional.linear`` (fx), ``aten.linear.default``
(torch.export), the method ``"matmul"`` or a ``call_module`` of ``nn.Linear``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from graphs.ops import COPY_OPS, VIEW_OPS, canonical_op_name, op_name

Shape = Sequence[int]
ShapeOf = Callable[[Any], "tuple[int, ...] | None"]

# Approximate arithmetic per element for ops that are more than one pass.
ELEMENT_FACTOR = {
    "layer_norm": 5, "batch_norm": 5, "group_norm": 5, "instance_norm": 5, "rms_norm": 4,
    "native_layer_norm": 5, "native_batch_norm": 5, "_native_batch_norm_legit": 5,
    "_native_batch_norm_legit_no_training": 5, "_native_batch_norm_legit_functional": 5,
    "softmax": 3, "log_softmax": 3, "_softmax": 3, "_log_softmax": 3, "cross_entropy": 4,
    "gelu": 4, "silu": 3, "mish": 5, "softplus": 3, "sigmoid": 2, "tanh": 2,
}
_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_MODULES = _NORM_MODULES + (nn.RMSNorm,)
_SDPA_NAMES = frozenset({
    "scaled_dot_product_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
})


def numel(shape: Shape | None) -> int:
    """Number of elements of a shape (0 for an unknown shape)."""
    return 0 if shape is None else int(math.prod(shape))


def linear_flops(out_shape: Shape, in_features: int, bias: bool) -> int:
    """``y = x W^T (+ b)``: one multiply-add per output element per input feature."""
    n = numel(out_shape)
    return 2 * n * in_features + (n if bias else 0)


def matmul_flops(out_shape: Shape, inner: int) -> int:
    """A (batched) matrix product: 2 FLOPs per output element per contracted index."""
    return 2 * numel(out_shape) * inner


def conv_flops(in_shape: Shape, out_shape: Shape, weight_shape: Shape, bias: bool,
               transposed: bool = False) -> int:
    """Convolution from the weight shape ``[C_out, C_in/groups, *k]`` (transposed: ``[C_in, C_out/groups, *k]``).

    A regular conv does ``prod(weight[1:])`` multiply-adds per output element; a transposed
    conv does that many per *input* element.
    """
    per = int(math.prod(weight_shape[1:]))
    base = numel(in_shape) if transposed else numel(out_shape)
    return 2 * base * per + (numel(out_shape) if bias else 0)


def einsum_flops(equation: str, operand_shapes: Sequence[Shape], out_shape: Shape) -> int:
    """2 × (output elements) × (product of the sizes of the summed-over indices)."""
    lhs = equation.replace(" ", "").split("->")[0]
    out_letters = set(equation.split("->")[1]) if "->" in equation else None
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), operand_shapes):
        letters = term.replace("...", "")
        # Named letters align with the trailing dims when an ellipsis leads the term.
        dims = list(shape)[-len(letters):] if "..." in term and letters else list(shape)[:len(letters)]
        for letter, size in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    if out_letters is None:  # implicit mode: indices seen once are kept
        counts = {c: lhs.count(c) for c in set(lhs) if c.isalpha()}
        out_letters = {c for c, k in counts.items() if k == 1}
    summed = math.prod(size for letter, size in sizes.items() if letter not in out_letters)
    factor = 2 if len(operand_shapes) > 1 else 1
    return factor * numel(out_shape) * int(summed)


def attention_flops(q: Shape, k: Shape, v: Shape) -> int:
    """``softmax(q k^T) v``: two batched matmuls, plus ~3 FLOPs per score for scale+softmax."""
    batch = numel(q[:-2])
    length, dim = q[-2], q[-1]
    source = k[-2]
    scores = batch * length * source
    return 2 * scores * dim + 2 * scores * v[-1] + 3 * scores


def recurrent_flops(module: nn.Module, in_shape: Shape) -> int:
    """LSTM/GRU/RNN (and cells) from the module's weights: every step multiplies by every matrix.

    For each time step and batch row: 2 × (all weight-matrix elements) for the gate
    matmuls (``weight_ih``, ``weight_hh``, LSTM projections ``weight_hr``), 2 per gate unit
    for the two biases, and ~3 per gate unit for the gate nonlinearities and state update.
    """
    is_cell = isinstance(module, nn.RNNCellBase)
    batch_first = bool(getattr(module, "batch_first", False))
    if is_cell:
        steps, batch = 1, (in_shape[0] if len(in_shape) == 2 else 1)
    elif len(in_shape) == 3:
        steps, batch = (in_shape[1], in_shape[0]) if batch_first else (in_shape[0], in_shape[1])
    else:  # unbatched sequence (T, I)
        steps, batch = in_shape[0], 1
    matrix = sum(p.numel() for name, p in module.named_parameters() if name.startswith("weight_"))
    gate_units = sum(p.shape[0] for name, p in module.named_parameters() if name.startswith("weight_ih"))
    has_bias = bool(getattr(module, "bias", True))
    per_row = 2 * matrix + gate_units * (3 + (2 if has_bias else 0))
    return int(steps * batch * per_row)


def mha_flops(module: nn.MultiheadAttention, q: Shape, k: Shape, v: Shape) -> int:
    """nn.MultiheadAttention: the three input projections, attention, the output projection."""
    if len(q) == 2:  # unbatched (L, E)
        q, k, v = (1, *q), (1, *k), (1, *v)
    elif not module.batch_first:  # (L, N, E) -> (N, L, E)
        q, k, v = (q[1], q[0], q[2]), (k[1], k[0], k[2]), (v[1], v[0], v[2])
    n, length, embed = q
    source = k[1]
    heads = module.num_heads
    head_dim = embed // heads
    proj = (linear_flops((n, length, embed), q[2], True) + linear_flops((n, source, embed), k[2], True)
            + linear_flops((n, source, embed), v[2], True))
    attn = attention_flops((n, heads, length, head_dim), (n, heads, source, head_dim),
                           (n, heads, source, head_dim))
    return proj + attn + linear_flops((n, length, embed), embed, True)


def _arg(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


#: Function and aten names of a convolution (transposed ones included).
CONVOLUTION_NAMES = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                               "conv_transpose2d", "conv_transpose3d", "cudnn_convolution"})


def is_convolution(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` is a convolution: a ``torch.nn`` convolution module (a subclass too) or a
    convolution function (``module``: the called module of a ``call_module`` node, else None).
    On an Ampere or later GPU PyTorch runs fp32 convolutions on TF32 tensor cores by default
    (``torch.backends.cudnn.conv.fp32_precision == "tf32"``), fp32 matmuls not.

    >>> import torch
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    >>> [is_convolution(n, gm.get_submodule(n.target) if n.op == "call_module" else None) for n in gm.graph.nodes]
    [False, True, False, False]
    """
    if node.op == "call_module":
        return isinstance(module, nn.modules.conv._ConvNd)
    return node.op == "call_function" and canonical_op_name(op_name(node)) in CONVOLUTION_NAMES


def node_flops(node: fx.Node, module: nn.Module | None, shape_of: ShapeOf,
               out_shape: Shape | None) -> int:
    """Forward FLOPs of ``node``.

    ``module`` is the called module for ``call_module`` nodes (else None); ``shape_of(arg)``
    gives the shape of the first tensor an argument (usually an fx.Node) stands for, or
    None; ``out_shape`` is the node's own (first) output shape.
    """
    if node.op in ("placeholder", "get_attr", "output") or out_shape is None:
        return 0
    inputs = [shape_of(a) for a in node.all_input_nodes]
    first_in = shape_of(node.args[0]) if node.args else None
    if node.op == "call_module":
        return _module_flops(module, first_in, inputs, out_shape, node, shape_of)
    name = canonical_op_name(op_name(node))
    if name in VIEW_OPS or name in COPY_OPS:
        return 0
    if name == "linear":
        w = shape_of(_arg(node, 1, "weight"))
        if w is not None:
            return linear_flops(out_shape, w[-1], _arg(node, 2, "bias") is not None)
    if name in ("matmul", "mm", "bmm", "mv", "dot", "vdot", "inner"):
        a = shape_of(node.args[0]) if node.args else None
        if a is not None and len(a) > 0:
            return matmul_flops(out_shape, a[-1]) if out_shape else 2 * a[-1]
    if name in ("addmm", "baddbmm", "addbmm", "addmv"):
        m1 = shape_of(_arg(node, 1, "mat1" if name == "addmm" else "batch1"))
        if m1 is not None:
            inner = m1[-1]
            if name == "addbmm":
                inner *= m1[0]
            return matmul_flops(out_shape, inner) + numel(out_shape)
    if name in CONVOLUTION_NAMES:
        w = shape_of(node.args[1]) if len(node.args) > 1 else shape_of(node.kwargs.get("weight"))
        if w is not None and first_in is not None:
            transposed = name.startswith("conv_transpose") or (
                name in ("convolution", "_convolution") and bool(_arg(node, 6, "transposed")))
            return conv_flops(first_in, out_shape, w, _arg(node, 2, "bias") is not None, transposed)
    if name == "einsum":
        equation = node.args[0] if node.args else node.kwargs.get("equation")
        operands: Sequence[Any] = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        shapes = [shape_of(o) for o in operands]
        known = [s for s in shapes if s is not None]
        if isinstance(equation, str) and len(known) == len(shapes):
            return einsum_flops(equation, known, out_shape)
    if name in _SDPA_NAMES:
        q, k, v = (shape_of(a) for a in node.args[:3])
        if q is not None and k is not None and v is not None:
            return attention_flops(q, k, v)
    if name in ("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                "rnn_relu_cell"):
        return _aten_recurrent_flops(node, name, shape_of, out_shape)
    return _elementwise(name, inputs, out_shape)


def _elementwise(name: str, inputs: list, out_shape: Shape | None) -> int:
    touched = max([numel(out_shape)] + [numel(s) for s in inputs if s is not None])
    return ELEMENT_FACTOR.get(name, 1) * touched


def _module_flops(module: nn.Module | None, first_in: Shape | None, inputs: list,
                  out_shape: Shape, node: fx.Node, shape_of: ShapeOf) -> int:
    if module is None:
        return numel(out_shape)
    if isinstance(module, nn.Linear):
        return linear_flops(out_shape, module.in_features, module.bias is not None)
    if isinstance(module, nn.Bilinear):
        return 2 * numel(out_shape) * module.in1_features * module.in2_features
    if isinstance(module, nn.modules.conv._ConvNd) and first_in is not None:
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        return conv_flops(first_in, out_shape, module.weight.shape, module.bias is not None, transposed)
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and first_in is not None:
        return recurrent_flops(module, first_in)
    if isinstance(module, nn.MultiheadAttention):
        # query, key and value by position or name: the node's distinct inputs would fold a
        # self-attention's (h, h, h) into one and count the masks as key and value
        q, k, v = (shape_of(_arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
        if q is not None and k is not None and v is not None:
            return mha_flops(module, q, k, v)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.Identity, nn.Flatten, nn.Unflatten)):
        return 0
    if isinstance(module, _NORM_MODULES):
        return 5 * numel(out_shape)
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return 3 * numel(out_shape)
    # Other leaf modules (activations, pooling, dropout, user leaves without a formula):
    # one FLOP per element touched, plus the matmul-shaped work of any parameters they own.
    params = sum(p.numel() for p in module.parameters())
    rows = numel(out_shape[:-1]) if len(out_shape) > 1 else 1
    return _elementwise(type(module).__name__.lower(), inputs, out_shape) + (
        2 * rows * params if params and not isinstance(module, (nn.PReLU,)) else 0)


def _aten_recurrent_flops(node: fx.Node, name: str, shape_of: ShapeOf, out_shape: Shape) -> int:
    """aten.lstm / aten.gru / aten.rnn_* and their ``_cell`` ops (export path), as :func:`recurrent_flops`.

    Sequence ops take ``(input, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)`` with all weights and biases in the ``params`` list; cell
    ops take ``(input, hx, w_ih, w_hh, b_ih, b_hh)``.
    """
    x = shape_of(node.args[0]) if node.args else None
    if x is None:
        return numel(out_shape)
    if name.endswith("_cell"):
        tensors = [shape_of(a) for a in node.args[2:6] if a is not None]
        steps, batch = 1, (x[0] if len(x) == 2 else 1)
    else:
        params = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], (list, tuple)) else []
        tensors = [shape_of(a) for a in params]
        batch_first = bool(node.args[8]) if len(node.args) > 8 else False
        if len(x) == 3:
            steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
        else:
            steps, batch = x[0], 1
    weights = [s for s in tensors if s is not None and len(s) == 2]
    biases = [s for s in tensors if s is not None and len(s) == 1]
    matrix = sum(numel(w) for w in weights)
    # b_ih and b_hh (or w_ih and w_hh) each have one row per gate unit.
    gate_units = sum(b[0] for b in biases) // 2 if biases else sum(w[0] for w in weights) // 2
    per_row = 2 * matrix + gate_units * (3 + (2 if biases else 0))
    return int(steps * batch * per_row)


def node_bytes_moved(node: fx.Node, input_bytes: Sequence[int], out_bytes: int,
                     param_bytes_read: int) -> int:
    """Bytes the forward pass of ``node`` reads and writes: its inputs, outputs and parameters.

    Views, metadata queries and graph plumbing (placeholder, get_attr, output) move nothing.
    An embedding lookup reads only the rows it returns, not its whole table.
    """
    if node.op in ("placeholder", "get_attr", "output"):
        return 0
    name = canonical_op_name(op_name(node))
    if node.op in ("call_function", "call_method") and name in VIEW_OPS:
        return 0
    if node.op == "call_function" and name == "embedding":
        # The indices are the smaller input (F.embedding and aten.embedding order them differently).
        return 2 * out_bytes + (min(input_bytes) if input_bytes else 0)
    return int(sum(input_bytes)) + out_bytes + param_bytes_read
