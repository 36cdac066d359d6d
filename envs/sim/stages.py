"""The stage cut of a placement over ranks: pure graph logic, shared by the runtime and the simulator.

The multi-process runtime (:mod:`envs.runtime.split`) runs each rank's nodes as *stages*:
runs of consecutive nodes of one rank, in graph order, cut

* **after a send**: right after a run of nodes whose values another rank reads, so the
  value leaves as soon as it exists;
* **before a receive**: right before a node that reads a value from another rank's stage
  that the open stage does not already read from, so a stage only waits, at its start,
  for values that are already on their way.

:func:`cut_stages` is that rule over node names alone, and :func:`refused_handover` says
which cuts the runtime refuses, so the simulator of a placement over ranks
(:mod:`envs.sim.ranks`) cuts exactly the stages the runtime will run, and refuses what it
refuses, without
importing the runtime or torch.fx: the runtime builds its inputs from the fx graph, the
simulator from the placement graph (same node names, same order, same inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

__all__ = ["cut_stages", "refused_handover"]


def cut_stages(
    order: Sequence[str],
    inputs: Mapping[str, Iterable[str]],
    rank: Mapping[str, int],
    output_inputs: Iterable[str],
    output_rank: int,
    joined: Iterable[Sequence[str]] = (),
) -> dict[str, int]:
    """Stage of every node in ``order``, numbered by the graph position of the stage's first node.

    Args:
        order: the compute nodes (no placeholders, no output node) in graph order.
        inputs: for each node of ``order``, the nodes it reads that are themselves in
            ``order`` (model inputs are held by every rank and never cross).
        rank: the rank of every node of ``order``.
        output_inputs: the nodes the model output reads (they are read on ``output_rank``).
        output_rank: the rank that gathers the model output.
        joined: runs of nodes no send may cut (the regions a ``torch.autograd.grad`` in forward
            differentiates, :func:`graphs.ops.differentiated_regions`): a stage's inputs are
            fresh autograd leaves, and a grad taken across one finds its tensor unused ("The
            differentiated Tensor ... appears to not have been used in the graph").

    Returns:
        ``{node: stage index}``; stage indices are 0, 1, ... in schedule order.
    """
    sent: set[str] = set()  # values some other rank reads
    for n in order:
        for a in inputs[n]:
            if rank[a] != rank[n]:
                sent.add(a)
    for a in output_inputs:
        if rank[a] != output_rank:
            sent.add(a)
    # Nodes that may not start a stage after a send: on each rank, those after a joined run's
    # first node there up to its last (other nodes between them too: a cut before one of them
    # would leave the rest of the run in the next stage).
    position = {n: i for i, n in enumerate(order)}
    held: set[str] = set()
    for run in joined:
        spans: dict[int, list[int]] = {}
        for n in run:
            if n in position:
                spans.setdefault(rank[n], []).append(position[n])
        for r, at in spans.items():
            held.update(n for n in order[min(at) + 1:max(at) + 1] if rank[n] == r)
    stage_of: dict[str, int] = {}
    count = 0
    current: dict[int, int] = {}  # rank -> its open stage
    sources: dict[int, set[int]] = {}  # stage -> other ranks' stages it receives from
    last_sent: dict[int, bool] = {}  # rank -> its previous node was a send
    for n in order:
        r = rank[n]
        remote = {stage_of[a] for a in inputs[n] if rank[a] != r}
        open_stage = current.get(r)
        cut = (open_stage is None
               or (last_sent.get(r, False) and n not in sent and n not in held)  # after a run of sends
               or bool(remote - sources[open_stage]))  # before a new receive
        if cut:
            open_stage = count
            count += 1
            current[r] = open_stage
            sources[open_stage] = set()
        sources[open_stage] |= remote
        stage_of[n] = open_stage
        last_sent[r] = n in sent
    return stage_of


class _Handover(Protocol):
    """A value sent from one stage to a later one (the runtime's ``Transfer``, the simulator's
    ``RankTransfer``)."""

    value: str
    src_rank: int
    dst_rank: int


def refused_handover(transfers: Iterable[_Handover], updated_later: Mapping[str, str],
                     requires_grad: Mapping[str, bool]) -> str | None:
    """Why the runtime refuses these stage transfers, or None when it runs them.

    A value that leaves its stage before an in-place update of its storage (``h.relu_()``
    after another rank read ``h``, ``m.mul_(0.5)`` on a mask already sent) is refused: another
    rank receives a copy, which the update misses, so it computes with the old values and no
    error (walkthrough: losses 0.083 against 0.023); a later stage on the same rank gets a
    fresh autograd leaf, and PyTorch refuses an in-place update of a leaf that requires grad.

    Args:
        transfers: the plan's transfers.
        updated_later: ``{value: the first node after it that updates its storage in place}``
            (:func:`graphs.ops.later_writes`; the placement graph's ``updated_later``).
        requires_grad: whether each value may require grad (missing: it may).

    >>> from types import SimpleNamespace as T
    >>> print(refused_handover([T(value="m", src_rank=0, dst_rank=1)], {"m": "mul_"}, {"m": False})[:48])
    node 'mul_' updates 'm' in place after the value
    >>> refused_handover([T(value="m", src_rank=0, dst_rank=0)], {"m": "mul_"}, {"m": False}) is None
    True
    """
    # The first refused transfer in an order of their own, whatever order the caller keeps
    # them in: a hand-over to another rank (the silent wrong values) before one to a later
    # stage of the same rank.
    for t in sorted(transfers, key=lambda t: (t.src_rank == t.dst_rank, t.value, t.dst_rank)):
        writer = updated_later.get(t.value)
        if writer is None or (t.src_rank == t.dst_rank and not requires_grad.get(t.value, True)):
            continue
        where = f"to rank {t.dst_rank}" if t.src_rank != t.dst_rank else "to a later stage of its rank"
        return (f"node {writer!r} updates {t.value!r} in place after the value left its stage (rank {t.src_rank}) "
                f"{where}, which gets a copy the update misses (or an autograd leaf that refuses it); expected "
                f"{t.value!r}, its in-place updates and the nodes that read it on one rank, the updates before the reads")
    return None
