"""How many kernels a composite leaf module launches: the ``num_ops`` of its node.

On a GPU the host pays a launch per kernel (:mod:`envs.sim.cost_model`: ``ops x
launch_overhead``), and a node counted one. That holds for a ``torch.nn`` layer (a linear is one
``addmm``, a LayerNorm one ``native_layer_norm``), not for a module called whole that runs a
whole block: an ``nn.TransformerEncoderLayer`` (its attention's projections, softmax, dropout,
the feed-forward, two norms), an ``nn.MultiheadAttention``, a user's leaf module. Charged one
launch, a stack of them looked compute-bound where the host issuing their kernels bounds it.

:func:`annotate_leaf_kernels` runs the captured GraphModule once on fake tensors (no memory, no
compute) and counts, for each call of a *composite* leaf (a module with submodules of its own),
the ATen ops its forward dispatches that launch a kernel (views, aliases and empty allocations
launch none); the same for each call of a custom autograd Function, one node whose ``forward``
may run several ops. Recurrent modules keep one: on a GPU an ``nn.LSTM`` is one cuDNN call and an
``nn.LSTMCell`` a fused kernel, while this CPU build decomposes them into a dozen ops per step,
and a CPU build cannot trace CUDA's decomposition (no fake CUDA tensors without CUDA). Layers
without submodules keep one too, so the zoo's graphs (linear, conv, norm, embedding nodes) are
costed as before (checked: no zoo model has a composite leaf).

The count is this CPU build's decomposition, which is CUDA's for most ops, not all: dropout in
training dispatches three ops here (``bernoulli_``, ``div_``, ``mul``) where CUDA runs one
fused ``native_dropout``. Measured: an ``nn.TransformerEncoderLayer`` of width 128 counts 13
kernels with ``dropout=0`` and 36 with ``dropout=0.1`` (of which 8 are that difference).
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from graphs.autograd_functions import is_function_call

log = logging.getLogger(__name__)

#: ATen ops that allocate or alias without launching a kernel.
NO_KERNEL = frozenset({"detach", "alias", "empty", "empty_like", "empty_strided", "lift_fresh", "_unsafe_view",
                       "view", "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze",
                       "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk"})


class _KernelCount(TorchDispatchMode):
    """Counts the dispatched ATen ops that launch a kernel while :attr:`active`."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.active and func.namespace == "aten":  # prim: metadata queries (prim.device)
            name = func.overloadpacket.__name__
            if not getattr(func, "is_view", False) and name not in NO_KERNEL:
                self.count += 1
        return func(*args, **(kwargs or {}))


def composite_leaves(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The ``call_module`` nodes of ``gm`` whose module has submodules and is not recurrent, by name."""
    from graphs.fx_tracer import RECURRENT_TYPES

    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if next(module.children(), None) is not None and not isinstance(module, RECURRENT_TYPES):
            found[node.name] = module
    return found


class _Counter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str], mode: _KernelCount) -> None:
        super().__init__(gm)
        self.names, self.mode = names, mode
        self.counts: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name not in self.names:
            return super().run_node(n)
        self.mode.active, self.mode.count = True, 0
        try:
            return super().run_node(n)
        finally:
            self.mode.active = False
            self.counts[n.name] = self.mode.count


def leaf_kernel_counts(gm: fx.GraphModule, inputs: tuple) -> dict[str, int]:
    """Kernels each composite leaf's call, and each custom autograd Function's
    (:mod:`graphs.autograd_functions`), launches in a training forward (module doc), by node name."""
    names = set(composite_leaves(gm)) | {n.name for n in gm.graph.nodes if is_function_call(n)}
    if not names:
        return {}
    from torch._dynamo.utils import deepcopy_to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    module = deepcopy_to_fake_tensor(gm, fake)
    run_inputs = tuple(fake.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
    counting = _KernelCount()
    counter = _Counter(module, names, counting)
    with fake, counting, torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
        counter.run(*run_inputs)
    return counter.counts


def annotate_leaf_kernels(graph: nx.DiGraph, gm: fx.GraphModule, inputs: tuple) -> None:
    """Set ``num_ops`` on the placement-graph node of each composite leaf call (module doc). A
    model whose forward does not run on fake tensors keeps one launch per node, with a log line."""
    try:
        counts = leaf_kernel_counts(gm, inputs)
    except Exception as exc:  # noqa: BLE001 - an op without a fake kernel: the old count stands
        log.info("kernel counts of leaf modules not taken (%s); each counts one launch", type(exc).__name__)
        return
    for name, count in counts.items():
        if name in graph and count > 1:
            graph.nodes[name]["num_ops"] = count
