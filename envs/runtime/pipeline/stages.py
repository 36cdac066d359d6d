"""A pipelined placement's stage modules, cut from the captured fx graph.

``torch.distributed.pipelining.PipelineStage`` sends a stage's outputs to the next stage
only (``stage.py``: ``stage_index + 1``), so every value produced before a boundary and read
after it crosses that boundary: stage ``s`` takes ``boundary(s)`` positionally and returns
``boundary(s + 1)``, passing through the values it only relays (a skip connection across
two boundaries goes 0 -> 1 -> 2). The model inputs reach every stage as keyword arguments
(the schedule's ``step(**kwargs)`` splits them per micro-batch and gives them to every
stage), so no stage relays an input. The last stage returns the model's scalar loss
(the captured graph computes it, or ``loss_fn(output, *inputs)`` does), divided by the
number of micro-batches: the schedule's gradient accumulation then gives the gradient of
the mean over micro-batches, the full batch's for a mean loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from envs.sim.pipeline import Pipeline, PipelineError

__all__ = ["StageSpec", "split_stages", "StageModule", "boundary_metas"]


@dataclass
class StageSpec:
    """One stage: its graph module, what it receives and sends, and the model inputs it reads."""

    index: int
    nodes: list[str]
    recv: list[str]
    send: list[str]
    inputs_used: list[str]
    gm: fx.GraphModule


def _stage_of_nodes(gm: fx.GraphModule, pipeline: Pipeline) -> dict[str, int]:
    given = pipeline.stage_of()
    last = pipeline.num_stages - 1
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out[n.name] = last
        elif n.name in given:
            out[n.name] = given[n.name]
        elif n.op == "get_attr":  # a parameter read: it lives with its first reader
            out[n.name] = min((given.get(u.name, last) for u in n.users), default=last)
        else:
            raise PipelineError(f"node {n.name!r} of the model is in no stage of the pipeline")
    return out


def split_stages(gm: fx.GraphModule, pipeline: Pipeline) -> list[StageSpec]:
    """Cut ``gm`` into the pipeline's stages (module doc).

    Raises:
        PipelineError: a node in no stage, or a node reading a value of a later stage.
    """
    nodes = list(gm.graph.nodes)
    st = _stage_of_nodes(gm, pipeline)
    pos = {n.name: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op == "placeholder":
            continue
        for a in n.all_input_nodes:
            if a.op != "placeholder" and st[a.name] > st[n.name]:
                raise PipelineError(f"node {n.name!r} (stage {st[n.name]}) reads {a.name!r} of stage {st[a.name]}; "
                                    "expected stages contiguous in a topological order")
    last_use = {n.name: max((st[u.name] for u in n.users), default=st[n.name])
                for n in nodes if n.op not in ("placeholder", "output")}

    def boundary(s: int) -> list[str]:
        return sorted((v for v, last in last_use.items() if st[v] < s <= last), key=pos.__getitem__)

    specs = []
    for s in range(pipeline.num_stages):
        recv = boundary(s)
        send = boundary(s + 1) if s < pipeline.num_stages - 1 else []
        g = fx.Graph()
        env: dict[str, fx.Node] = {v: g.placeholder(v) for v in recv}
        used = [n.name for n in nodes if n.op == "placeholder" and any(st[u.name] == s for u in n.users)]
        for v in used:
            env[v] = g.placeholder(v)
        members = [n for n in nodes if n.op != "placeholder" and st[n.name] == s]
        for n in members:
            if n.op == "output":
                g.output(fx.node.map_arg(n.args[0], lambda a: env[a.name]))
            else:
                env[n.name] = g.node_copy(n, lambda a: env[a.name])
        if s < pipeline.num_stages - 1:
            g.output(tuple(env[v] for v in send))
        specs.append(StageSpec(s, [n.name for n in members], recv, send, used,
                               fx.GraphModule(gm, g, class_name=f"Stage{s}")))
    return specs


class StageModule(nn.Module):
    """``forward(*received, **model_inputs)``: the stage's graph; the last stage returns the
    micro-batch's loss over ``microbatches`` (module doc)."""

    def __init__(self, spec: StageSpec, last: bool, microbatches: int,
                 input_names: Sequence[str], loss_fn: Callable[..., torch.Tensor] | None = None) -> None:
        super().__init__()
        self.gm = spec.gm
        self.spec = spec
        self.last = last
        self.microbatches = microbatches
        self.input_names = list(input_names)
        self.loss_fn = loss_fn

    def forward(self, *received: torch.Tensor, **inputs: torch.Tensor) -> Any:
        out = self.gm(*received, *[inputs[n] for n in self.spec.inputs_used])
        if not self.last:
            # gloo sends need contiguous tensors (a boundary after a transpose is a view)
            return tuple(t.contiguous() for t in out)
        loss = self.loss_fn(out, *[inputs[n] for n in self.input_names]) if self.loss_fn is not None else out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise PipelineError("the last stage must produce a scalar loss (the model's output, or loss_fn's)")
        return loss / self.microbatches


def boundary_metas(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """Meta tensors (shape, dtype, requires_grad) of the named values on one micro-batch, from one
    forward of ``gm`` (its buffers restored after, so BatchNorm's running stats are untouched)."""
    saved = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in names:
                if not isinstance(value, torch.Tensor):
                    raise PipelineError(f"value {n.name!r} crosses a stage boundary but is a "
                                        f"{type(value).__name__}, not a tensor; cut elsewhere")
                out[n.name] = torch.empty_like(value, device="meta").requires_grad_(value.requires_grad)
            return value

    order = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.enable_grad():
        Recorder(gm).run(*[inputs[k] for k in order])
    gm.load_state_dict(saved)
    return out
