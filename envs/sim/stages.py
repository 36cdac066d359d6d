"""The stage cut of a placement over ranks: pure graph logic, shared by the runtime and the simulator.

The multi-process runtime (:mod:`envs.runtime.split`) runs each rank's nodes as *stages*:
runs of consecutive nodes of one rank, in graph order, cut

* **after a send**: right after a run of nodes whose values another rank reads, so the
  value leaves as soon as it exists;
* **before a receive**: right before a node that reads a value from another rank's stage
  that the open stage does not already read from, so a stage only waits, at its start,
  for values that are already on their way.

:func:`cut_stages` is that rule over node names alone, so the simulator of a placement
over ranks (:mod:`envs.sim.ranks`) cuts exactly the stages the runtime will run, without
importing the runtime or torch.fx: the runtime builds its inputs from the fx graph, the
simulator from the placement graph (same node names, same order, same inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["cut_stages"]


def cut_stages(
    order: Sequence[str],
    inputs: Mapping[str, Iterable[str]],
    rank: Mapping[str, int],
    output_inputs: Iterable[str],
    output_rank: int,
) -> dict[str, int]:
    """Stage of every node in ``order``, numbered by the graph position of the stage's first node.

    Args:
        order: the compute nodes (no placeholders, no output node) in graph order.
        inputs: for each node of ``order``, the nodes it reads that are themselves in
            ``order`` (model inputs are held by every rank and never cross).
        rank: the rank of every node of ``order``.
        output_inputs: the nodes the model output reads (they are read on ``output_rank``).
        output_rank: the rank that gathers the model output.

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
               or (last_sent.get(r, False) and n not in sent)  # after a run of sends
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
