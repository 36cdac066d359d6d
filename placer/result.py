"""What :func:`placer.optimize` returns: the placement found, its step time and how it compares."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from envs.hardware.cluster import Cluster
from envs.runtime.check import CheckReport
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError
from graphs.pipeline import Prepared
from placer.placement_file import Placement
from placer.report.compare import Candidate
from placer.report.results import write_results

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """What :func:`optimize` found.

    Attributes:
        placement: the op-level placement (node → device name), with fingerprint and devices.
        step_time: its step time in seconds (``source`` says simulated or measured).
        source: ``"simulated"`` or ``"measured"``.
        cluster: the devices placed on.
        problem: the group-level placement problem the search ran on.
        group_row: the winner as device indices over ``problem.node_names``.
        prepared: the loaded, captured and grouped model.
        table: the comparison against the baselines.
        check: the numerical check of the applied placement (None if skipped).
        search: the agent's search result.
        candidates: every method's candidate.
        out_dir: the folder the run itself wrote into (with ``out_dir=``/``--out``; None
            without): it also holds the run's best_placement.json and policy, which
            :meth:`save` into that folder must keep.
    """

    placement: Placement
    step_time: float
    source: str
    cluster: Cluster
    problem: PlacementProblem
    group_row: np.ndarray
    prepared: Prepared
    table: pd.DataFrame
    check: CheckReport | None
    search: Any
    candidates: list[Candidate] = field(default_factory=list)
    winner: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    reward: str = "simulated"
    measurement: Any = None  # placer.measuring.summary.MeasurementSummary on real devices
    out_dir: Path | None = None
    #: Folders this result was saved into: saving there again overwrites its own files.
    _saved_to: set[Path] = field(default_factory=set, init=False, repr=False, compare=False)

    def apply(self, model: torch.nn.Module | None = None, output_device: str | None = None) -> torch.fx.GraphModule:
        """The placed, trainable module (over real devices; virtual ones map through the cluster).

        A pipelined winner (micro-batches, DDP replicas) needs one process per device, which a
        module in this process cannot be: its stages' devices are applied un-pipelined, and the
        log says so (``placer apply`` or :func:`placer.api.train_steps` run it as a pipeline)."""
        from envs.runtime.apply import apply_placement
        from graphs.capture import capture

        if self.placement.pipeline is not None:
            log.warning("the placement is %s, which runs one process per device; this module applies its stages' "
                        "devices un-pipelined in one process (run it with `placer apply` to train it as placed)",
                        self.placement.pipeline.describe())

        captured = self.prepared.captured
        if model is not None and model is not self.prepared.spec.model:
            captured = capture(model, self.prepared.spec.example_inputs, leaf_modules=captured.leaf_paths,
                               name=self.prepared.spec.name, batch_dim=self.prepared.spec.batch_dim)
            if captured.fingerprint != self.placement.fingerprint:
                raise PlacerError(
                    f"this placement was made for model {self.placement.fingerprint}, "
                    f"not for the given model ({captured.fingerprint})"
                )
        return apply_placement(captured, self.placement.assignment, output_device=output_device,
                               real_devices=self.cluster.real_device_map())

    def compare(self) -> pd.DataFrame:
        """The comparison table (step time, speed-up, memory per device) of every method."""
        return self.table

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write placement.json, device_map.json (when module-aligned), report.md and pictures;
        returns the path of report.md.

        A folder holding another run's results has them moved to ``previous/`` first, as
        ``optimize --out`` does (:func:`placer.optimizing.earlier_results.set_aside_results`):
        else that run's best_placement.json and policy stayed beside this placement.json, and
        ``--resume`` later continued from the wrong run. The run's own folder and one this
        result was saved into before are written over instead.

        Raises:
            OptionError: the earlier results could not be moved aside (nothing was written).
        """
        from placer.optimizing.earlier_results import set_aside_results

        folder = Path(out_dir)
        resolved = folder.resolve()
        own = {p.resolve() for p in (self.out_dir, *self._saved_to) if p is not None}
        if resolved not in own and folder.is_dir():
            set_aside_results(folder, resume_hint=False)
        report = write_results(self, folder)
        self._saved_to.add(resolved)
        return report
