"""A pipelined placement as data: its stages, the device of each, ``M`` and the schedule.

The rules that simulate one (P1-P5) are in :mod:`envs.sim.pipeline`; the runtime that runs
one is :mod:`envs.runtime.pipeline`. This module is what both share: :class:`Pipeline` (what a
placement file's ``pipeline`` field holds) and the functions that build one from a cut or map
one from ops to the problem's groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError

__all__ = ["SCHEDULES", "PipelineError", "Pipeline", "contiguous_pipeline", "stage_nodes_of", "group_pipeline"]

#: The schedule names a pipeline may carry (``torch.distributed.pipelining`` classes
#: ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``).
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class PipelineError(PlacerError, ValueError):
    """A pipeline that is malformed or does not fit the model, the batch or the devices."""



@dataclass(frozen=True)
class Pipeline:
    """Stages (node names, in stage order), the device of each, micro-batches and schedule.

    Attributes:
        stages: the placement nodes of each stage, stage 0 first.
        devices: the device name of each stage.
        microbatches: ``M``, the number of micro-batches the batch is split into.
        schedule: one of :data:`SCHEDULES`.
        replicas: the stage devices of each further data-parallel replica (empty: one
            replica). ``R = 1 + len(replicas)`` copies of the pipeline each take ``1/R`` of
            the batch, gradients all-reduced per stage
            (:func:`envs.sim.hybrid.simulate_hybrid`); :meth:`assignment` and
            ``devices`` are replica 0's.
    """

    stages: tuple[tuple[str, ...], ...]
    devices: tuple[str, ...]
    microbatches: int
    schedule: str = "1f1b"
    replicas: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(str(n) for n in s) for s in self.stages))
        object.__setattr__(self, "devices", tuple(str(d) for d in self.devices))
        object.__setattr__(self, "replicas", tuple(tuple(str(d) for d in r) for r in self.replicas))
        if self.replicas:
            if self.schedule == "interleaved_1f1b":
                raise PipelineError("replicated pipelines run gpipe or 1f1b; expected one stage per device")
            wrong = [i + 1 for i, r in enumerate(self.replicas) if len(r) != len(self.stages)]
            if wrong:
                raise PipelineError(f"replica(s) {wrong} name a number of devices other than the {len(self.stages)} "
                                    "stages; expected one device per stage in every replica")
            used = [*self.devices, *(d for r in self.replicas for d in r)]
            if len(set(used)) != len(used):
                raise PipelineError(f"the replicas share devices ({used}); expected each device in one replica")
        if self.schedule not in SCHEDULES:
            raise PipelineError(f"unknown pipeline schedule {self.schedule!r}; expected one of {list(SCHEDULES)}")
        m = self.microbatches
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise PipelineError(f"micro-batches must be an integer >= 1, got {m!r}")
        object.__setattr__(self, "microbatches", int(m))
        if not self.stages:
            raise PipelineError("a pipeline needs at least one stage")
        if len(self.devices) != len(self.stages):
            raise PipelineError(f"a pipeline of {len(self.stages)} stage(s) names {len(self.devices)} device(s); "
                                "expected one device per stage")
        empty = [i for i, s in enumerate(self.stages) if not s]
        if empty:
            raise PipelineError(f"stage(s) {empty} hold no node; expected every stage to hold at least one")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.stages):
            for n in s:
                if n in seen:
                    raise PipelineError(f"node {n!r} is in stage {seen[n]} and stage {i}; expected one stage per node")
                seen[n] = i
        ranks = self.ranks
        if self.schedule == "interleaved_1f1b":
            p = len(ranks)
            if len(self.stages) % p or len(self.stages) == p:
                raise PipelineError(f"interleaved_1f1b needs the same number (> 1) of stages on each of its {p} "
                                    f"device(s); got {len(self.stages)} stages")
            for s, d in enumerate(self.devices):
                if d != ranks[s % p]:
                    raise PipelineError(f"interleaved_1f1b puts stage {s} on device {ranks[s % p]!r} (stage s on "
                                        f"device s mod {p}, as ScheduleInterleaved1F1B does); it is on {d!r}")
            rounds = max(1, self.microbatches // p)
            if self.microbatches % rounds:
                raise PipelineError(f"interleaved_1f1b needs micro-batches a multiple of {rounds} rounds "
                                    f"(ScheduleInterleaved1F1B); got {self.microbatches}")
        elif len(ranks) != len(self.stages):
            raise PipelineError(f"{self.schedule} runs one stage per device; devices {list(self.devices)} repeat "
                                "(use interleaved_1f1b for several stages per device)")
        if self.schedule == "1f1b" and self.microbatches < len(self.stages):
            raise PipelineError(f"1f1b needs at least as many micro-batches as stages (Schedule1F1B); got "
                                f"{self.microbatches} for {len(self.stages)} stages (use gpipe, or M >= "
                                f"{len(self.stages)})")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ranks(self) -> tuple[str, ...]:
        """The distinct devices in order of their first stage (rank r runs stages r, r + P, ...)."""
        return tuple(dict.fromkeys(self.devices))

    def stage_of(self) -> dict[str, int]:
        """``{node: stage}``."""
        return {n: i for i, s in enumerate(self.stages) for n in s}

    def assignment(self) -> dict[str, str]:
        """``{node: device}`` of the pipeline's nodes."""
        return {n: self.devices[i] for i, s in enumerate(self.stages) for n in s}

    @property
    def num_replicas(self) -> int:
        return 1 + len(self.replicas)

    @property
    def replica_devices(self) -> tuple[tuple[str, ...], ...]:
        """The stage devices of every replica, replica 0 (``devices``) first."""
        return (self.devices, *self.replicas)

    @property
    def rank_devices(self) -> tuple[str, ...]:
        """The device of every process of the job, in global rank order: replica ``r``'s
        pipeline rank ``l`` is rank ``r * P + l`` (replicas share no device).

        >>> Pipeline((("a",), ("b",)), ("cpu:0", "cpu:1"), 2, "1f1b", replicas=(("cpu:2", "cpu:3"),)).rank_devices
        ('cpu:0', 'cpu:1', 'cpu:2', 'cpu:3')
        """
        return tuple(dict.fromkeys(d for devs in self.replica_devices for d in devs))

    @property
    def is_data_parallel(self) -> bool:
        """One stage, one micro-batch, replicas: DDP itself."""
        return self.num_stages == 1 and self.microbatches == 1 and bool(self.replicas)

    def describe(self) -> str:
        """``"pipelined (2 stages x 2 replicas, 1f1b, M=4)"``; one stage, one micro-batch and
        replicas is DDP: ``"data parallel (DDP over 4 replicas)"``."""
        if self.is_data_parallel:
            return f"data parallel (DDP over {self.num_replicas} replicas)"
        replicas = f" x {self.num_replicas} replicas" if self.replicas else ""
        return f"pipelined ({self.num_stages} stages{replicas}, {self.schedule}, M={self.microbatches})"

    def replica_pipelines(self) -> tuple[Pipeline, ...]:
        """Each replica as a pipeline of its own (no replicas), replica 0 first."""
        return tuple(Pipeline(self.stages, devs, self.microbatches, self.schedule) for devs in self.replica_devices)

    def check_batch(self, batch_size: int) -> None:
        """Raise :class:`PipelineError` unless ``R * M`` divides ``batch_size`` (equal micro-batches:
        ``torch.tensor_split`` in ``microbatch.py`` would make them unequal)."""
        parts = self.microbatches * self.num_replicas
        if batch_size % parts:
            what = (f"{self.microbatches} micro-batches" if self.num_replicas == 1 else
                    f"{self.num_replicas} replicas x {self.microbatches} micro-batches")
            raise PipelineError(f"{what} do not divide the batch of {batch_size}; expected a divisor of {batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in placement files."""
        return {"stages": [list(s) for s in self.stages], "devices": list(self.devices),
                "microbatches": self.microbatches, "schedule": self.schedule,
                **({"replicas": [list(r) for r in self.replicas]} if self.replicas else {})}

    @classmethod
    def from_dict(cls, doc: Any) -> Pipeline:
        """Read :meth:`to_dict`'s form; :class:`PipelineError` naming what is wrong."""
        if not isinstance(doc, dict):
            raise PipelineError(f"pipeline must be an object, got {type(doc).__name__}")
        missing = [k for k in ("stages", "devices", "microbatches", "schedule") if k not in doc]
        if missing:
            raise PipelineError(f"pipeline lacks the field(s) {missing}")
        stages, devices = doc["stages"], doc["devices"]
        if not isinstance(stages, list) or not all(isinstance(s, list) and all(isinstance(n, str) for n in s)
                                                   for s in stages):
            raise PipelineError("pipeline stages must be a list of lists of node names")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise PipelineError("pipeline devices must be a list of device names")
        replicas = doc.get("replicas", [])
        if not isinstance(replicas, list) or not all(isinstance(r, list) and all(isinstance(d, str) for d in r)
                                                     for r in replicas):
            raise PipelineError("pipeline replicas must be a list of lists of device names")
        return cls(tuple(tuple(s) for s in stages), tuple(devices), doc["microbatches"], doc["schedule"],
                   tuple(tuple(r) for r in replicas))


def contiguous_pipeline(order: Sequence[str], cuts: Sequence[int], devices: Sequence[str], microbatches: int,
                        schedule: str = "1f1b") -> Pipeline:
    """The pipeline that cuts ``order`` (a topological order of the nodes) before each index of ``cuts``."""
    bounds = [0, *cuts, len(order)]
    stages = tuple(tuple(order[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1))
    return Pipeline(stages, tuple(devices), microbatches, schedule)


def stage_nodes_of(assignment: Mapping[str, str], order: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Runs of consecutive nodes of ``order`` on one device: (device, nodes) per run."""
    runs: list[tuple[str, list[str]]] = []
    for n in order:
        d = assignment[n]
        if runs and runs[-1][0] == d:
            runs[-1][1].append(n)
        else:
            runs.append((d, [n]))
    return runs


def group_pipeline(problem: PlacementProblem, pipeline: Pipeline) -> Pipeline:
    """``pipeline`` over ``problem.node_names``: a placement file's pipeline names ops, the
    problem's nodes are their groups (each group in the stage of its ops). A pipeline already
    over the problem's nodes is returned as it is.

    Raises:
        PipelineError: an op the problem does not have, or a group whose ops are in two stages.
    """
    names = set(problem.node_names)
    if all(n in names for s in pipeline.stages for n in s):
        return pipeline
    op_index = {n: i for i, n in enumerate(problem.ops.names)}
    group_stage: dict[int, int] = {}
    for s, stage in enumerate(pipeline.stages):
        for op in stage:
            if op not in op_index:
                raise PipelineError(f"the pipeline names {op!r}, which is neither a node nor an op of the model")
            g = int(problem.ops.op_group[op_index[op]])
            if group_stage.setdefault(g, s) != s:
                raise PipelineError(f"group {problem.node_names[g]!r} has ops in stages {group_stage[g]} and {s}; "
                                    "expected each group in one stage")
    stages: list[list[str]] = [[] for _ in pipeline.stages]
    for g, name in enumerate(problem.node_names):
        if g not in group_stage:
            raise PipelineError(f"the pipeline's stages miss the ops of group {name!r}")
        stages[group_stage[g]].append(name)
    return Pipeline(tuple(tuple(s) for s in stages), pipeline.devices, pipeline.microbatches, pipeline.schedule,
                    pipeline.replicas)
