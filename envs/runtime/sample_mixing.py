"""Where a model mixes the samples of its batch: the op a batch split cannot reproduce.

When the parts of a batch (DDP replicas, pipeline micro-batches) do not give the full batch's
loss and gradients, the check (:mod:`envs.runtime.batch_split`) says why; for the cause it
cannot name by kind (BatchNorm, a summed loss, random draws, a buffer read back), this module
finds the op. The captured graph runs once on the full batch and once on its first part, and
each op's value on the part is compared with its share of the value on the whole:

- the same shape on both: the same value (a weight, a constant; an op that reduces over the
  batch, ``x.mean(0)``, differs here);
- one dimension ``parts`` times larger on the whole: the part's value is the first slice of
  the whole's along it (where the batch went: a transpose moves it, and a feature dimension as
  large as the batch is not mistaken for it);
- more than one dimension larger on the whole: the op pairs samples with each other
  (``a @ b.T`` over two batches of embeddings: the part sees only the pairs within it).

The first op whose inputs all agree and whose value does not is where the samples meet. When
every op agrees, the graph's outputs are the part's share and the loss (``get_loss``) mixes
them. Both runs are forward only, dropout off, the part replaying the whole's random draws
(:class:`envs.runtime.random_replay.RandomReplay`), buffers and random state restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from envs.runtime.no_dropout import _NoDropout
from envs.runtime.random_replay import RandomReplay
from envs.runtime.tensor_diff import _scaled_diff
from graphs.buffers import preserved_buffers
from graphs.input_batch import batch_slice
from graphs.placement_graph import node_target_text, owning_module
from graphs.random_state import kept_random_state


@dataclass(frozen=True)
class SampleMixing:
    """Where the samples of a batch meet: ``node`` (None: in the loss, after every op of the
    graph agreed), what it calls (``target``: a function, or a module's class) in which
    ``module``, and ``how`` (``"reduces"``: its value on a part differs; ``"pairs"``: it
    pairs samples with each other)."""

    node: str | None
    target: str = ""
    module: str = ""
    how: str = ""

    def describe(self, batch_dim: int) -> str:
        """One clause for the check's cause.

        >>> SampleMixing("matmul", "operator.matmul", "", "pairs").describe(0)
        "op 'matmul' (operator.matmul) pairs the samples of the batch (dim 0) with each other: on a part it sees the pairs within the part only"
        """
        if self.node is None:
            return (f"every op of the model gives each part its share of the full batch's values (dim {batch_dim}), "
                    "so the loss (get_loss) mixes the samples: its value on a part is not that part's share of the "
                    "full batch's (a loss over pairs of samples, a contrastive loss, say)")
        where = f"{self.target}" + (f" in {self.module}" if self.module else "")
        if self.how == "pairs":
            return (f"op {self.node!r} ({where}) pairs the samples of the batch (dim {batch_dim}) with each other: "
                    "on a part it sees the pairs within the part only")
        return (f"op {self.node!r} ({where}) mixes the samples of the batch (dim {batch_dim}): its value on a part "
                "is not that part's share of its value on the full batch (a sum, mean or normalisation over them)")


def _agree(whole: Any, part: Any, parts: int, tolerance: float) -> str:
    """``""`` when ``part`` is the first of ``parts`` shares of ``whole`` (module doc), else
    ``"reduces"`` or ``"pairs"``. Values other than tensors (sizes, None) agree: a batch size
    is expected to differ."""
    if isinstance(whole, (tuple, list)) and isinstance(part, (tuple, list)) and len(whole) == len(part):
        for w, p in zip(whole, part):
            verdict = _agree(w, p, parts, tolerance)
            if verdict:
                return verdict
        return ""
    if not isinstance(whole, torch.Tensor) or not isinstance(part, torch.Tensor):
        return ""
    if whole.dim() != part.dim():
        return "reduces"
    grown = [d for d, (w, p) in enumerate(zip(whole.shape, part.shape)) if w != p]
    if len(grown) > 1:
        return "pairs"
    if grown:
        d = grown[0]
        if whole.shape[d] != part.shape[d] * parts:
            return "reduces"
        whole = whole.narrow(d, 0, part.shape[d])
    if whole.is_floating_point() or whole.is_complex():
        return "" if _scaled_diff(part, whole) <= tolerance else "reduces"
    return "" if torch.equal(part, whole) else "reduces"


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op != "output":
            self.values[n.name] = value
        return value


def find_sample_mixing(gm: fx.GraphModule, inputs: tuple, batch: int, parts: int, batch_dim: int = 0,
                       tolerance: float = 1e-5, seed: int = 0) -> SampleMixing | None:
    """Where ``gm`` (in the dtype and modes the check ran it) mixes the samples of ``inputs``, a
    batch of ``batch`` along ``batch_dim`` cut into ``parts`` equal parts (module doc); None when
    the part cannot be compared (a random draw it could not replay, an op that fails on it).

    >>> class Centre(torch.nn.Module):
    ...     def forward(self, x):
    ...         return (x - x.mean(0)).relu()
    >>> find_sample_mixing(fx.symbolic_trace(Centre()), (torch.randn(8, 3),), 8, 2).node
    'mean'
    """
    part_inputs = batch_slice(inputs, batch, 0, batch // parts, batch_dim)
    replay = RandomReplay()
    whole, part = _Recorder(gm), _Recorder(gm)
    try:
        with torch.no_grad(), preserved_buffers(gm), kept_random_state(), _NoDropout(), replay:
            replay.record()
            torch.manual_seed(seed)
            whole.run(*inputs)
            replay.replay(0, parts)
            torch.manual_seed(seed)
            part.run(*part_inputs)
    except Exception:  # noqa: BLE001 - the part cannot run what the whole runs: the check says so elsewhere
        return None
    if replay.missed:
        return None
    # In program order the first op that disagrees has inputs that all agreed.
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        how = _agree(whole.values[node.name], part.values[node.name], parts, tolerance)
        if how:
            if node.op == "call_module":
                return SampleMixing(node.name, type(gm.get_submodule(str(node.target))).__name__, "", how)
            module = owning_module(node)
            return SampleMixing(node.name, node_target_text(node), module, how)
    return SampleMixing(None)
