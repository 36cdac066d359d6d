"""Split a placed fx graph into per-rank stages and the values that cross between them.

A placement over ranks (``{node name: rank}``) may go back and forth between ranks
(rank 0 → rank 1 → rank 0), so one sub-module per rank would not be runnable in one
call: rank 0's second half needs rank 1's result. Each rank's nodes, in graph order, are
therefore cut into **stages** — runs of consecutive nodes — at two kinds of points:

* **after a send**: right after a run of nodes whose values another rank reads, so the
  value leaves as soon as it exists (the other rank need not wait for the rest of the
  stage);
* **before a receive**: right before a node that reads a value from another rank's stage
  that the current stage does not already read from, so a stage only waits, at its
  start, for values that are already on their way.

Every cross-rank edge then goes from a stage to a stage that starts later in graph
order, so the stages form a DAG, and running each rank's stages in graph order (the
global schedule sorts stages by their first node) cannot deadlock. This is what lets two
ranks overlap: with layer 0 of an unrolled LSTM on rank 0 and layer 1 on rank 1, rank 0
sends ``h[t]`` after step ``t`` and rank 1 runs step ``t`` of its layer while rank 0 runs
step ``t + 1`` (a wavefront); the backward pass runs the same stages in reverse. A
contiguous split (ranks 0 then 1, one value crossing) gives one stage per rank.

Each stage is a ``torch.fx.GraphModule`` whose inputs are the values it reads from
other stages or from the model's inputs, and whose outputs are the values other
stages (or the model output) read. The returned :class:`SplitPlan` lists every such
cross-stage value as a :class:`Transfer` (producer stage → consumer rank), which the
distributed runtime sends forward and whose gradient it sends back.

Why not ``torch.fx.passes.split_module``: it needs partitions that are already
acyclic (ours are made so by the cut rule above), names values by its own scheme, and
does not report which values cross, which is exactly what the runtime needs; the pass
here is short and keeps the original node names.

Model inputs (placeholders) are not transfers: every rank holds the example inputs.
Shared parameters (tied weights): every node that reads one tensor runs on one rank
(see :func:`split_by_rank`), so no tensor is held — or updated — by two ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from envs.sim.stages import cut_stages, refused_handover
from graphs.errors import PlacerError
from graphs.ops import differentiated_regions, in_place_writes, later_writes, transform_regions

__all__ = ["SplitError", "Stage", "Transfer", "SplitPlan", "split_by_rank", "stage_assignment"]


class SplitError(PlacerError, ValueError):
    """A placement over ranks that cannot be split (unknown nodes, bad ranks, shared parameters)."""


@dataclass
class Stage:
    """One runnable piece of the model: a run of consecutive nodes of one rank.

    Attributes:
        index: position in the global schedule (stages are sorted by their first node's
            position in the graph).
        rank: the rank that runs it.
        nodes: original fx node names it computes, in graph order.
        inputs: the values it reads, in call order: original node names of placeholders
            or of nodes computed by other stages.
        outputs: original node names of the values it returns, in return order.
        module: the GraphModule; ``module(*inputs)`` returns a tuple of ``outputs``.
    """

    index: int
    rank: int
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    module: fx.GraphModule


@dataclass(frozen=True)
class Transfer:
    """A value computed by stage ``src_stage`` (on ``src_rank``) and read on ``dst_rank``.

    ``dst_stage`` is the first stage on ``dst_rank`` that reads it (``num_stages`` for the
    model output). When ``src_rank == dst_rank`` the value crosses a stage boundary on one
    rank: it is handed over locally, without communication.
    """

    value: str
    src_stage: int
    src_rank: int
    dst_rank: int
    dst_stage: int


@dataclass
class SplitPlan:
    """The stages of a placed graph and every value that crosses between them.

    Attributes:
        stages: all stages in schedule order (``stages[i].index == i``).
        transfers: every (value, consumer rank) crossing a stage boundary.
        placeholders: the model input names, in call order.
        output_rank: the rank that gathers the model output (and computes the loss).
        output_values: node names the output node reads (its structure is ``output_spec``).
        output_args: the model's output as its forward returns it, fx nodes replaced by their names.
        world_size: number of ranks.
    """

    stages: list[Stage]
    transfers: list[Transfer]
    placeholders: list[str]
    output_rank: int
    output_values: list[str]
    output_args: Any
    world_size: int
    producer: dict[str, int] = field(default_factory=dict)  # value -> stage index
    #: The model's inputs as the placeholders take them (graph.process_inputs: their leaves for a
    #: graph torch.export captured, :mod:`graphs.graph_inputs`); None: as they are.
    process_inputs: Callable[..., Any] | None = None

    def stages_of(self, rank: int) -> list[Stage]:
        """The stages ``rank`` runs, in schedule order."""
        return [s for s in self.stages if s.rank == rank]

    def sends_of(self, rank: int) -> list[Transfer]:
        """Transfers ``rank`` sends to other ranks."""
        return [t for t in self.transfers if t.src_rank == rank and t.dst_rank != rank]

    def recvs_of(self, rank: int) -> list[Transfer]:
        """Transfers ``rank`` receives from other ranks."""
        return [t for t in self.transfers if t.dst_rank == rank and t.src_rank != rank]

    def describe(self) -> str:
        """One line: stages per rank and cross-rank values."""
        per_rank = [len(self.stages_of(r)) for r in range(self.world_size)]
        remote = sum(1 for t in self.transfers if t.src_rank != t.dst_rank)
        return f"{len(self.stages)} stages ({'/'.join(map(str, per_rank))} per rank), {remote} cross-rank values"


def _as_gm(model: Any) -> fx.GraphModule:
    gm = getattr(model, "gm", model)
    if not isinstance(gm, fx.GraphModule):
        raise SplitError(f"split_by_rank expects a torch.fx.GraphModule or a CapturedModel, got {type(model).__name__}")
    return gm


def _ranks_of(gm: fx.GraphModule, ranks: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Rank of every non-placeholder node; unplaced nodes follow their first input (else user)."""
    names = {n.name for n in gm.graph.nodes}
    unknown = sorted(set(ranks) - names)
    if unknown:
        raise SplitError(
            f"placement names {len(unknown)} node(s) that are not in the model's graph, e.g. {unknown[:3]}; "
            "expected the fx node names of the captured model"
        )
    for n, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world_size:
            raise SplitError(f"node {n!r} is placed on rank {r!r}; expected an integer in [0, {world_size})")
    out: dict[str, int] = {}
    first = next((ranks[n.name] for n in gm.graph.nodes if n.name in ranks), 0)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.name in ranks:
            out[n.name] = ranks[n.name]
        elif n.op == "get_attr":
            continue  # decided below, with its first placed user
        else:
            ins = [out[a.name] for a in n.all_input_nodes if a.name in out]
            out[n.name] = ins[0] if ins else first
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.name not in out:
            users = [out[u.name] for u in n.users if u.name in out]
            out[n.name] = users[0] if users else first
    return out


def stage_assignment(gm: fx.GraphModule, rank: Mapping[str, int], output_rank: int) -> dict[str, int]:
    """Stage of every non-placeholder node (see the cut rule in the module doc), numbered
    in schedule order: by the position of the stage's first node in the graph.

    The rule itself is :func:`envs.sim.stages.cut_stages` (pure, so the simulator of rank
    placements cuts the same stages); this reads its inputs off the fx graph.
    """

    def real_inputs(n: fx.Node) -> list[str]:
        return [a.name for a in n.all_input_nodes if a.op != "placeholder"]

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return cut_stages([n.name for n in nodes], {n.name: real_inputs(n) for n in nodes}, rank,
                      real_inputs(out), output_rank,
                      [*differentiated_regions(gm).values(), *transform_regions(gm).values()])


def _settle_shared_state(gm: fx.GraphModule, rank: dict[str, int]) -> None:
    """Give every parameter one owning rank; refuse a module split between ranks.

    A ``call_module`` node owns its module's tensors. A ``get_attr`` node reading a tensor
    that a module on another rank owns (tied weights: GPT-2's embedding read again by the
    output projection) is moved to the owner's rank: the weight then crosses as a value
    each step and its gradient comes back to the owner, which alone updates it. A ``get_attr``
    node whose tensor an op updates in place goes to that op's rank.
    """
    owner: dict[int, tuple[int, str]] = {}

    def claim(t: torch.Tensor, r: int, who: str) -> None:
        prev = owner.setdefault(id(t), (r, who))
        if prev[0] != r:
            raise SplitError(
                f"{who} uses a parameter or buffer on rank {r} that {prev[1]} uses on rank {prev[0]}; "
                "nodes calling one module must be placed on one rank (group the graph first)"
            )

    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            for t in list(mod.parameters()) + list(mod.buffers()):
                claim(t, rank[n.name], f"node {n.name!r}")
    # State follows the op that updates it (as in apply): torch.export writes a reassigned buffer
    # back with copy_ at the graph's end, wherever its get_attr was placed; an update made on
    # another rank than the one holding the buffer landed on a received copy and was lost.
    updated_on = {held.name: rank[writer.name] for writer, held in reversed(in_place_writes(gm))
                  if held.op == "get_attr"}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        if n.name in updated_on:
            rank[n.name] = updated_on[n.name]
        path, _, attr = str(n.target).rpartition(".")
        value = getattr(gm.get_submodule(path) if path else gm, attr)
        tensors = [value] if isinstance(value, torch.Tensor) else (
            list(value.parameters()) + list(value.buffers()) if isinstance(value, torch.nn.Module) else []
        )
        owners = {owner[id(t)][0] for t in tensors if id(t) in owner}
        if len(owners) == 1:
            rank[n.name] = owners.pop()
        for t in tensors:
            claim(t, rank[n.name], f"node {n.name!r}")


def _may_require_grad(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    return bool(getattr(meta, "requires_grad", True))


def _refuse_updates_after_handover(gm: fx.GraphModule, transfers: list[Transfer]) -> None:
    """Refuse a value that leaves its stage before an in-place update of it
    (:func:`envs.sim.stages.refused_handover`, the rule the rank simulator applies too)."""
    later = {value: writer.name for value, writer in later_writes(gm).items()}
    reason = refused_handover(transfers, later, {n.name: _may_require_grad(n) for n in gm.graph.nodes})
    if reason is not None:
        raise SplitError(reason)


def _names_in(arg: Any) -> Any:
    return fx.node.map_arg(arg, lambda n: n.name)


def split_by_rank(
    model: Any, ranks: Mapping[str, int], world_size: int, output_rank: int | None = None
) -> SplitPlan:
    """Cut ``model``'s graph into stages per rank (see module doc).

    Args:
        model: a ``torch.fx.GraphModule`` or a ``CapturedModel`` (its ``.gm``).
        ranks: ``{fx node name: rank}``. Nodes left out run with their first input
            (get_attr nodes with their first user); placeholders are on every rank.
        world_size: number of ranks.
        output_rank: where the model output is gathered; default the output node's rank,
            else rank 0.

    Returns:
        The :class:`SplitPlan`. Stage modules share parameters with ``model`` (no copy).

    Raises:
        SplitError: unknown node names, ranks outside ``[0, world_size)``, or a parameter
            used by nodes on different ranks.
    """
    gm = _as_gm(model)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SplitError(f"world_size must be a positive integer, got {world_size!r}")
    rank = _ranks_of(gm, ranks, world_size)
    _settle_shared_state(gm, rank)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if output_rank is None:
        output_rank = int(ranks[out_node.name]) if out_node.name in ranks else 0
    if not 0 <= output_rank < world_size:
        raise SplitError(f"output_rank {output_rank} is outside [0, {world_size})")

    stage_of = stage_assignment(gm, rank, output_rank)
    keys = sorted(set(stage_of.values()))
    stage_rank = {stage_of[n]: rank[n] for n in stage_of}
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    out_stage = len(keys)
    assert keys == list(range(out_stage))

    # Consumers of each value by (rank, stage); the output node is a pseudo-stage.
    members: dict[int, list[fx.Node]] = {i: [] for i in range(len(keys))}
    for n in gm.graph.nodes:
        if n.name in stage_of:
            members[stage_of[n.name]].append(n)
    first_use: dict[tuple[str, int], int] = {}  # (value, consumer rank) -> first consumer stage
    needed_out: dict[int, list[str]] = {i: [] for i in range(len(keys))}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        consumer = (out_stage, output_rank) if n.op == "output" else (stage_of[n.name], rank[n.name])
        for a in n.all_input_nodes:
            if a.op == "placeholder" or stage_of[a.name] == consumer[0]:
                continue
            key = (a.name, consumer[1])
            first_use[key] = min(first_use.get(key, consumer[0]), consumer[0])
            if a.name not in needed_out[stage_of[a.name]]:
                needed_out[stage_of[a.name]].append(a.name)

    stages: list[Stage] = []
    for i in keys:
        r = stage_rank[i]
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        inputs: list[str] = []
        for n in members[i]:
            for a in n.all_input_nodes:
                if a.name not in env and (a.op == "placeholder" or stage_of[a.name] != i):
                    env[a.name] = graph.placeholder(a.name)
                    inputs.append(a.name)
            env[n.name] = graph.node_copy(n, lambda a: env[a.name])
        # Keep the producer's order: the runtime relies on it to match sends with receives.
        outs = [name for name in (m.name for m in members[i]) if name in needed_out[i]]
        graph.output(tuple(env[name] for name in outs))
        graph.lint()
        module = fx.GraphModule(gm, graph, class_name=f"Stage{i}Rank{r}")
        stages.append(Stage(i, r, [m.name for m in members[i]], inputs, outs, module))

    transfers = [
        Transfer(value, stage_of[value], rank[value], dst_rank, dst_stage)
        for (value, dst_rank), dst_stage in first_use.items()
    ]
    _refuse_updates_after_handover(gm, transfers)
    # Deterministic order: by producer stage, then the producer's output order, then consumer rank.
    pos = {name: (stage_of[name], stages[stage_of[name]].outputs.index(name)) for name in stage_of
           if name in needed_out[stage_of[name]]}
    transfers.sort(key=lambda t: (pos[t.value], t.dst_rank))
    output_values = [a.name for a in out_node.all_input_nodes if a.op != "placeholder"]
    return SplitPlan(
        stages=stages,
        transfers=transfers,
        placeholders=placeholders,
        output_rank=output_rank,
        output_values=output_values,
        # As the graph's own code returns it: torch.export's codegen unflattens a flat tuple
        # into the model's output structure (out_spec); fx's returns it as it is.
        output_args=gm.graph._codegen.process_outputs(_names_in(out_node.args[0])),
        world_size=world_size,
        producer=dict(stage_of),
        process_inputs=gm.graph.process_inputs,
    )
