"""The typed data the stages of ``placer.optimize`` hand on: one frozen dataclass per stage's output.

    prepare   → :class:`PreparedRun`
    compile   → :class:`Compiled` (with the op-level placement file of a group-level row)
    baselines → :class:`BaselineRun`
    search    → :class:`Searched`
    confirm   → :class:`Confirmed`

Apart from the stages (:mod:`placer.optimizing.stages`), so that what only reads a stage's
output (the helpers of a stage, the tests) needs the types and not the stages that make them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from envs.hardware.cluster import Cluster
from envs.hardware.rank_devices import is_distributed_cluster
from envs.runtime.check import CheckReport
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem import PlacementProblem
from graphs.capture import CapturedModel
from graphs.grouping import Grouping
from graphs.model_file import ModelSpec
from graphs.pipeline import Prepared
from placer.measuring.summary import MeasurementSummary
from placer.placement_file import Placement
from placer.report.compare import Candidate
from placer.search.tracker import SearchResult


@dataclass(frozen=True)
class PreparedRun:
    """What :func:`prepare_run` settles: where to place, with which reward, and the prepared model."""

    cluster: Cluster
    reward: str
    out_dir: Path | None
    source: ModelSpec | str | os.PathLike  # what worker processes load (a spec for an nn.Module)
    prepared: Prepared
    seconds: float
    #: What a placement file records so that ``show``/``apply`` rebuild the same model and
    #: costs without being told again: the model arguments and the profile cache folder.
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        return self.prepared.spec

    @property
    def captured(self) -> CapturedModel:
        return self.prepared.captured

    @property
    def grouping(self) -> Grouping:
        return self.prepared.grouping


@dataclass(frozen=True)
class Compiled:
    """The prepared run and the group-level problem every method is scored on."""

    run: PreparedRun
    problem: PlacementProblem

    def op_placement(self, row: np.ndarray, metadata: Mapping[str, Any], pipeline: Pipeline | None = None) -> Placement:
        """The op-level placement file content of a group-level ``row`` (with ``pipeline``, a
        pipeline over the groups: the file's pipeline over the ops, each stage the ops of its
        groups in program order)."""
        run, cluster = self.run, self.run.cluster
        assignment = run.grouping.expand(self.problem.array_to_placement(row))
        op_pipeline = self.op_pipeline(pipeline) if pipeline is not None else None
        meta = {**self.run_metadata(), **metadata}
        return Placement(assignment=assignment, fingerprint=run.captured.fingerprint,
                         devices=list(cluster.device_names), metadata=meta, pipeline=op_pipeline)

    def run_metadata(self) -> dict[str, Any]:
        """What every placement file of this run records besides its own step time: the
        model, its arguments, the cluster and the real devices its names map to."""
        run, cluster = self.run, self.run.cluster
        meta = {"model": run.spec.name, "cluster": cluster.name, "simulated_cluster": cluster.simulated,
                "real_devices": cluster.real_device_map(), **run.provenance}
        if cluster.spec_path is not None:  # show and apply find the spec again without --cluster
            meta["cluster_spec"] = cluster.spec_path
        if is_distributed_cluster(cluster):
            # A rank cluster's links were measured, not named by a preset: show rebuilds it from these.
            names = cluster.device_names
            meta["links"] = [[a, b, cluster.link(a, b).latency_s, cluster.link(a, b).bandwidth_Bps]
                             for i, a in enumerate(names) for b in names[i + 1:]]
        return meta

    def op_pipeline(self, pipeline: Pipeline) -> Pipeline:
        """``pipeline`` (over the groups) over the ops: each stage the ops of its groups in program order."""
        run = self.run
        stage_of_group = pipeline.stage_of()
        stages: list[list[str]] = [[] for _ in pipeline.stages]
        for op in run.captured.graph.nodes:
            stages[stage_of_group[run.grouping.op_to_group[op]]].append(op)
        return Pipeline(tuple(tuple(s) for s in stages), pipeline.devices, pipeline.microbatches,
                        pipeline.schedule, pipeline.replicas)


@dataclass(frozen=True)
class BaselineRun:
    """Every baseline's candidate, in the config's order."""

    candidates: tuple[Candidate, ...]
    seconds: float


@dataclass(frozen=True)
class Searched:
    """The agent's candidate (on real devices with hybrid reward: the measured fastest it found)."""

    result: SearchResult
    candidate: Candidate
    rounds: tuple[dict[str, Any], ...]
    seconds: float
    #: With --resume: the pipeline the earlier run left, read before the search could
    #: replace best_placement.json (see :func:`search_run`).
    resumed_pipeline: Pipeline | None = None


@dataclass(frozen=True)
class Confirmed:
    """Every candidate compared; the winner and its placement."""

    candidates: tuple[Candidate, ...]
    table: pd.DataFrame
    winner: Candidate
    step_time: float
    source: str
    placement: Placement
    measurement: MeasurementSummary | None = None  # on real devices
    seconds: dict[str, float] = field(default_factory=dict)
    #: The batch splits checked while picking the winner, by (M, R): the winner's check reuses its own.
    split_checks: dict[tuple[int, int], CheckReport] = field(default_factory=dict)
