"""Generated training graphs: four families of placement graphs with the contract's attributes.

The learned placement policy (``placer.search.agents.pretrain``) is trained across many graphs;
the zoo has six models, so these families add the shapes the zoo stands for at any size:

* :func:`layered` — a feed-forward stack: layers of parallel ops, each reading one to three
  ops of the layer before (an MLP/transformer-block-like DAG with some width);
* :func:`branching` — Inception-like blocks: a split into branches of different depth and
  cost, joined by a concatenation (parallel work of unequal length, then a barrier);
* :func:`recurrent` — an unrolled multi-layer recurrent net: cell (layer l, step t) reads
  (l-1, t) (through a per-step op between layers) and (l, t-1); every step of a layer calls the same module, so grouping
  (:func:`graphs.grouping.group_graph`) makes each layer one group, and layers can run as a
  wavefront (the case where op-level execution beats group-level: NMT, RNNLM);
* :func:`moe` — mixture-of-experts layers: a gate, ``experts`` heavy parallel expert FFNs
  holding most parameters, and a combine.

Every node carries ``op``, ``target``, ``flops``, ``bytes_moved``, ``out_bytes``,
``param_bytes`` and ``requires_grad``, every edge ``bytes`` (what
:func:`envs.sim.problem_compile.compile_problem` reads), so the costs come from the roofline of the
cluster's devices. Sizes are drawn from one ``numpy`` generator seeded by ``seed``: the same
arguments give the same graph. ``scale`` multiplies every op's work, bytes and parameters, so
one family spans compute-bound and transfer-bound regimes.

>>> g = recurrent(layers=2, steps=3, seed=0)
>>> g.number_of_nodes(), nx.is_directed_acyclic_graph(g)
(17, True)
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np

from graphs.errors import GraphError

#: Bytes per element of the generated tensors (fp32).
_ELEM = 4


def _check(name: str, **values: float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise GraphError(f"{name}: {key} must be a positive number, got {value!r}")


class _Builder:
    """Adds ops with consistent attributes: an op's output bytes are its out-edges' bytes."""

    def __init__(self, name: str, seed: int, scale: float) -> None:
        self.g = nx.DiGraph(name=name)
        self.rng = np.random.default_rng(seed)
        self.scale = float(scale)

    def op(self, name: str, inputs: list[str], flops: float, out_elems: float, params: float = 0.0,
           target: str | None = None, kind: str = "call_module") -> str:
        s = self.scale
        out_bytes = int(out_elems * _ELEM * s)
        in_bytes = sum(int(self.g.nodes[i]["out_bytes"]) for i in inputs)
        self.g.add_node(name, op=kind, target=target or name, flops=int(flops * s),
                        bytes_moved=int(in_bytes + out_bytes + params * _ELEM * s), out_bytes=out_bytes,
                        param_bytes=int(params * _ELEM * s), requires_grad=True)
        for i in inputs:
            self.g.add_edge(i, name, bytes=int(self.g.nodes[i]["out_bytes"]))
        return name

    def source(self, elems: float) -> str:
        out_bytes = int(elems * _ELEM * self.scale)
        self.g.add_node("input", op="placeholder", target="input", flops=0, bytes_moved=0, out_bytes=out_bytes,
                        param_bytes=0, requires_grad=False)
        return "input"

    def sink(self, inputs: list[str]) -> nx.DiGraph:
        self.op("loss", inputs, flops=1e6, out_elems=1, kind="call_function")
        return self.g

    def log_uniform(self, lo: float, hi: float) -> float:
        return float(10 ** self.rng.uniform(np.log10(lo), np.log10(hi)))


def layered(layers: int = 12, width: int = 4, seed: int = 0, scale: float = 1.0) -> nx.DiGraph:
    """A feed-forward stack of ``layers`` layers of ``width`` ops, each reading 1-3 ops of the layer before."""
    _check("layered", layers=layers, width=width, scale=scale)
    b = _Builder(f"layered-{layers}x{width}", seed, scale)
    prev = [b.source(1e6)]
    for layer in range(int(layers)):
        cur = []
        for j in range(int(width)):
            k = int(b.rng.integers(1, min(3, len(prev)) + 1))
            inputs = [str(x) for x in b.rng.choice(prev, size=k, replace=False)]
            hidden = b.log_uniform(2e5, 4e6)
            cur.append(b.op(f"l{layer}_{j}", inputs, flops=b.log_uniform(5e8, 4e10), out_elems=hidden,
                            params=b.log_uniform(1e5, 3e7)))
        prev = cur
    return b.sink(prev)


def branching(blocks: int = 6, branches: int = 4, seed: int = 0, scale: float = 1.0) -> nx.DiGraph:
    """``blocks`` Inception-like blocks: ``branches`` chains of 1-4 ops of unequal cost, joined by a concat."""
    _check("branching", blocks=blocks, branches=branches, scale=scale)
    b = _Builder(f"branching-{blocks}x{branches}", seed, scale)
    head = b.source(2e6)
    for blk in range(int(blocks)):
        ends = []
        for br in range(int(branches)):
            last = head
            for depth in range(int(b.rng.integers(1, 5))):
                last = b.op(f"b{blk}_{br}_{depth}", [last], flops=b.log_uniform(3e8, 3e10),
                            out_elems=b.log_uniform(3e5, 3e6), params=b.log_uniform(1e4, 5e6))
            ends.append(last)
        total = sum(b.g.nodes[e]["out_bytes"] for e in ends) / (_ELEM * b.scale)
        head = b.op(f"b{blk}_concat", ends, flops=total, out_elems=total, kind="call_function")
    return b.sink([head])


def recurrent(layers: int = 4, steps: int = 16, seed: int = 0, scale: float = 1.0) -> nx.DiGraph:
    """An unrolled ``layers``-layer recurrent net over ``steps`` time steps (cell (l, t) reads (l-1, t), (l, t-1)).

    The cells of one layer share a module target (``layer{l}``) and its weights, which sit on
    the first step's node (shared weights live once; grouping joins the steps).
    """
    _check("recurrent", layers=layers, steps=steps, scale=scale)
    b = _Builder(f"recurrent-{layers}x{steps}", seed, scale)
    src = b.source(1e5)
    hidden = b.log_uniform(2e5, 2e6)
    below = [b.op(f"embed_{t}", [src], flops=hidden * 2, out_elems=hidden, target="embed",
                  params=b.log_uniform(1e6, 5e7) if t == 0 else 0.0) for t in range(int(steps))]
    for layer in range(int(layers)):
        flops = b.log_uniform(1e9, 2e10)  # 4 gates x (input + recurrent) matmuls of one step
        params = b.log_uniform(2e6, 3e7)
        row: list[str] = []
        for t in range(int(steps)):
            inputs = [below[t]] + ([row[-1]] if row else [])
            if layer:  # dropout/residual between layers: per-step ops of their own, no weights
                inputs[0] = b.op(f"mix{layer}_{t}", [below[t]], flops=hidden * 4, out_elems=hidden,
                                 kind="call_function")
            row.append(b.op(f"cell{layer}_{t}", inputs, flops=flops, out_elems=hidden, target=f"layer{layer}",
                            params=params if t == 0 else 0.0))
        below = row
    heads = [b.op(f"proj_{t}", [below[t]], flops=b.log_uniform(5e8, 5e9), out_elems=hidden, target="proj",
                  params=b.log_uniform(1e6, 3e7) if t == 0 else 0.0) for t in range(int(steps))]
    return b.sink(heads)


def moe(layers: int = 4, experts: int = 8, seed: int = 0, scale: float = 1.0) -> nx.DiGraph:
    """``layers`` mixture-of-experts layers: a dense op, a gate, ``experts`` expert FFNs in parallel, a combine."""
    _check("moe", layers=layers, experts=experts, scale=scale)
    b = _Builder(f"moe-{layers}x{experts}", seed, scale)
    head = b.source(1e6)
    tokens = b.log_uniform(5e5, 4e6)
    for layer in range(int(layers)):
        dense = b.op(f"dense{layer}", [head], flops=b.log_uniform(2e9, 2e10), out_elems=tokens,
                     params=b.log_uniform(1e6, 1e7))
        gate = b.op(f"gate{layer}", [dense], flops=tokens * 16, out_elems=tokens, params=1e4)
        outs = [b.op(f"expert{layer}_{e}", [gate], flops=b.log_uniform(1e9, 1e10), out_elems=tokens / experts,
                     params=b.log_uniform(1e7, 6e7)) for e in range(int(experts))]
        head = b.op(f"combine{layer}", outs, flops=tokens * 2, out_elems=tokens, kind="call_function")
    return b.sink([head])


#: The families by name (what the training script and the benchmark enumerate).
FAMILIES: dict[str, Callable[..., nx.DiGraph]] = {
    "layered": layered,
    "branching": branching,
    "recurrent": recurrent,
    "moe": moe,
}
