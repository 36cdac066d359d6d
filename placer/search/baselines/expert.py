"""Human-expert placements of the literature, by model family (``expert``).

The family comes from the graph's name (``graph.graph["name"]``, the zoo model name) and,
failing that, from its module names. Placements, over the accelerators ``gpu_0..gpu_{G-1}``:

* **nmt** (GNMT-style encoder-decoder): "each layer, including all LSTM layers, the
  attention layer, and the softmax layer, is computed by a GPU" (Mirhoseini et al., ICML
  2017, after Sutskever et al. 2014 and Wu et al. 2016). With L layers: when there are at
  least L + 2 GPUs, encoder layer i and decoder layer i on GPU i, attention on GPU L and
  the softmax projection on GPU L + 1; with fewer GPUs (GNMT's layout) layer i on GPU
  ``i * G // L``, attention with the bottom decoder layer, softmax on the last GPU. The
  bidirectional bottom layer (``enc_fwd``/``enc_bwd``) is encoder layer 0 (so
  ``encoder.i`` is layer i + 1); embeddings go with their layer 0. Layers are counted
  over every op of the model, so grouping cannot hide one.
* **rnnlm**: one LSTM layer per GPU (layer i on GPU ``i * G // L``), the embedding with
  layer 0, the softmax on the next free GPU (the last one when all are used).
* **moe** (Shazeer et al. 2017): experts spread evenly (expert j on GPU ``j * G // E``);
  the two LSTM layers on separate GPUs (first with embedding and gate on GPU 0, second with
  the softmax on GPU 1).
* **transformer** (gpt2 and the like): contiguous layer-balanced split — the blocks, in
  order, cut into G runs of about equal compute (one block per GPU when there are at
  most G); embeddings with the first block, the
  final norm and head with the last.
* **cnn** (inception, resnet, vgg...): the whole model on the fastest GPU (data-parallel
  replicas are the experts' way to use more GPUs, which a placement cannot express); a
  contiguous split when it does not fit.
* anything else: the generic contiguous split of the topological order into G runs of
  about equal compute (of about equal memory when those overfill a device).

Ops outside the modules named above (glue, inputs) sit with their heaviest neighbour. The
expert layouts do not look at memory (as in the papers): when one overfills a device,
``expert`` reports no placement with the reason.
"""

from __future__ import annotations

import re

import networkx as nx
import numpy as np

from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import (
    BaselineInputs,
    NoFit,
    accelerators,
    fastest_first,
    fill_unassigned,
    fits,
    node_cost,
    node_memory,
    overflow_reason,
)
from placer.search.baselines.modules import node_paths, op_paths

FAMILY_NAMES: dict[str, tuple[str, ...]] = {
    "nmt": ("gnmt", "nmt", "seq2seq", "translation"),
    "rnnlm": ("rnnlm", "lstm_lm", "language_model"),
    "moe": ("moe", "mixture"),
    "transformer": ("gpt", "bert", "transformer", "llama", "t5", "opt"),
    "cnn": ("inception", "resnet", "vgg", "alexnet", "mobilenet", "efficientnet", "densenet", "cnn", "conv"),
}


def detect_family(graph: nx.DiGraph | None, paths: list[str] | None = None) -> str:
    """Model family: ``nmt``, ``rnnlm``, ``moe``, ``transformer``, ``cnn`` or ``generic``."""
    name = str((graph.graph.get("name") if graph is not None else "") or "").lower()
    tokens = [t for t in re.split(r"[^a-z0-9]+", name) if t]
    for family, keys in FAMILY_NAMES.items():
        # token prefixes, so "resnet50" is a resnet but not a "t5"
        if any(t.startswith(k) for t in tokens for k in keys):
            return family
    paths = paths or []
    tops = {p.split(".")[0] for p in paths if p}
    if any(".experts." in f".{p}." for p in paths):
        return "moe"
    if any(t.startswith("enc") for t in tops) and any(t.startswith("dec") for t in tops):
        return "nmt"
    if tops & {"blocks", "h", "layers", "layer"} and any("attn" in p or "attention" in p for p in paths):
        return "transformer"
    if graph is not None and any("conv" in str(graph.nodes[n].get("target", "")).lower() for n in graph.nodes):
        return "cnn"
    if any(t in ("cells", "lstm", "rnn") for t in tops):
        return "rnnlm"
    return "generic"


def _index_after(path: str, container: str) -> int | None:
    """The index ``i`` in ``...container.i...`` of a module path, or None."""
    m = re.search(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def _top(path: str) -> str:
    return path.split(".")[0] if path else ""


def _spread(i: int, count: int, gpus: list[int]) -> int:
    """GPU of item i of ``count``: one GPU each while they last, else contiguous blocks."""
    if count <= len(gpus):
        return gpus[i]
    return gpus[min(i * len(gpus) // max(count, 1), len(gpus) - 1)]


def _nmt(paths: list[str], gpus: list[int], all_paths: list[str]) -> np.ndarray:
    # Count layers over every op's module: grouping may hide whole layers inside other groups.
    dec = {_index_after(p, "decoder") for p in all_paths} - {None}
    enc = {_index_after(p, "encoder") for p in all_paths} - {None}
    # GNMT keeps its bidirectional bottom layer apart (enc_fwd/enc_bwd): encoder.i is layer i + 1.
    offset = 1 if any(_top(p) in ("enc_fwd", "enc_bwd") for p in all_paths) else 0
    layers = max((max(dec) + 1) if dec else 1, (max(enc) + 1 + offset) if enc else 1, 1)
    g = len(gpus)
    roomy = g >= layers + 2

    def layer_gpu(i: int) -> int:
        return gpus[i] if roomy else _spread(i, layers, gpus)

    row = np.full(len(paths), -1, dtype=np.int64)
    for n, p in enumerate(paths):
        top = _top(p)
        if top in ("enc_fwd", "enc_bwd", "src_embedding"):
            row[n] = layer_gpu(0)
        elif top == "encoder" and _index_after(p, "encoder") is not None:
            row[n] = layer_gpu(_index_after(p, "encoder") + offset)
        elif top == "decoder" and _index_after(p, "decoder") is not None:
            row[n] = layer_gpu(_index_after(p, "decoder"))
        elif top == "tgt_embedding":
            row[n] = layer_gpu(0)
        elif top == "attention":
            row[n] = gpus[layers] if roomy else layer_gpu(0)
        elif top in ("projection", "softmax", "generator", "output"):
            row[n] = gpus[layers + 1] if roomy else gpus[-1]
    return row


def _rnnlm(paths: list[str], gpus: list[int], all_paths: list[str]) -> np.ndarray:
    containers = [c for c in ("cells", "layers", "lstm", "rnn") if any(_index_after(p, c) is not None for p in all_paths)]
    container = containers[0] if containers else "cells"
    idx = {_index_after(p, container) for p in all_paths} - {None}
    layers = max(idx) + 1 if idx else 1
    row = np.full(len(paths), -1, dtype=np.int64)
    for n, p in enumerate(paths):
        i = _index_after(p, container)
        if i is not None:
            row[n] = _spread(i, layers, gpus)
        elif _top(p) in ("embedding", "embed", "encoder"):
            row[n] = gpus[0]
        elif _top(p) in ("softmax", "decoder", "projection", "output"):
            row[n] = gpus[layers] if layers < len(gpus) else gpus[-1]
    return row


def _moe(paths: list[str], gpus: list[int], all_paths: list[str]) -> np.ndarray:
    experts = {_index_after(p, "experts") for p in all_paths} - {None}
    count = max(experts) + 1 if experts else 1
    second = gpus[1] if len(gpus) > 1 else gpus[0]
    row = np.full(len(paths), -1, dtype=np.int64)
    for n, p in enumerate(paths):
        j = _index_after(p, "experts")
        top = _top(p)
        if j is not None:
            row[n] = _spread(j, count, gpus)
        elif top in ("embedding", "lstm1") or p.endswith("gate"):
            row[n] = gpus[0]
        elif top in ("lstm2", "softmax"):
            row[n] = second
    return row


def contiguous_split(cost: np.ndarray, gpus: list[int]) -> np.ndarray:
    """Cut a sequence of costs into ``len(gpus)`` contiguous runs of about equal total."""
    total = cost.sum()
    if total <= 0:
        return np.full(len(cost), gpus[0], dtype=np.int64)
    mid = np.cumsum(cost) - cost / 2  # cost midpoint of each item decides its run
    run = np.minimum((mid / total * len(gpus)).astype(np.int64), len(gpus) - 1)
    return np.asarray(gpus, dtype=np.int64)[run]


def _transformer(paths: list[str], cost: np.ndarray, gpus: list[int]) -> np.ndarray:
    containers = [c for c in ("blocks", "h", "layers", "layer") if any(_index_after(p, c) is not None for p in paths)]
    row = np.full(len(paths), -1, dtype=np.int64)
    if not containers:
        return row
    c = containers[0]
    idx = np.array([_index_after(p, c) if _index_after(p, c) is not None else -1 for p in paths])
    blocks = sorted(set(idx[idx >= 0].tolist()))
    block_cost = np.array([cost[idx == b].sum() for b in blocks])
    if len(blocks) <= len(gpus):  # one block per GPU while they last
        block_gpu = dict(zip(blocks, gpus))
    else:
        block_gpu = dict(zip(blocks, contiguous_split(block_cost, gpus).tolist()))
    first_block = int(np.flatnonzero(idx >= 0)[0])
    for n, p in enumerate(paths):
        if idx[n] >= 0:
            row[n] = block_gpu[int(idx[n])]
        elif p:
            row[n] = block_gpu[blocks[0]] if n < first_block else block_gpu[blocks[-1]]
    return row


def expert_row(problem: PlacementProblem, family: str, paths: list[str], all_paths: list[str] | None = None) -> np.ndarray:
    """The family's expert layout (may overfill memory; -1-free).

    ``all_paths`` are the module paths of every op of the model (to count layers); the
    problem's own ``paths`` when None.
    """
    all_paths = paths if all_paths is None else all_paths
    gpus = accelerators(problem)
    cost = node_cost(problem)[:, gpus].mean(axis=1)
    if family == "cnn":
        best = fastest_first(problem, gpus)[0]
        row = np.full(problem.num_nodes, best, dtype=np.int64)
        if fits(problem, row) or len(gpus) == 1:
            return row
        family = "generic"
    if family == "nmt":
        row = _nmt(paths, gpus, all_paths)
    elif family == "rnnlm":
        row = _rnnlm(paths, gpus, all_paths)
    elif family == "moe":
        row = _moe(paths, gpus, all_paths)
    elif family == "transformer":
        row = _transformer(paths, cost, gpus)
    else:
        row = np.full(problem.num_nodes, -1, dtype=np.int64)
    if np.all(row < 0):
        row = contiguous_split(cost, gpus)
        if not fits(problem, row):
            # what an expert does when compute-balanced stages overflow: balance memory instead
            row = contiguous_split(node_memory(problem), gpus)
    return fill_unassigned(problem, row, default=gpus[0])


def expert(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """Human-expert placement for the detected family (see the module docstring)."""
    paths = node_paths(problem, inputs, "expert")
    family = detect_family(inputs.graph, paths)
    row = expert_row(problem, family, paths, op_paths(inputs))
    if not fits(problem, row):
        need = node_memory(problem).sum()
        raise NoFit(f"the {family} expert layout overfills memory ({overflow_reason(problem, row)}; model needs {format_bytes(need)})")
    return row
