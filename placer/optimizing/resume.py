"""``--resume``: what an earlier run left in the output folder to continue from.

The search starts from the placements an earlier run wrote into ``out_dir``
(``placement.json`` and ``best_placement.json``, as group-level rows of the problem:
:func:`_resume_rows`) and the pipeline search from the pipeline they hold
(:func:`_resume_pipeline`); the agent's policy is resumed by the search itself
(:class:`placer.search.config.SearchConfig` ``resume``).

Apart from the search stage (:mod:`placer.optimizing.stages`) that reads them: which
files count, which are skipped and what is said about them is the resume's own rule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem import PlacementProblem
from graphs.capture import CapturedModel
from graphs.grouping import Grouping
from placer.placement_file import PlacementFileError, load_placement

log = logging.getLogger(__name__)


def _resume_rows(out_dir: Path, captured: CapturedModel, grouping: Grouping,
                 problem: PlacementProblem) -> list[np.ndarray]:
    """The group-level rows of the placements an earlier run left in ``out_dir`` (none if there are none).

    Both files count: after a resumed run was killed, ``best_placement.json`` holds a better
    placement than the older ``placement.json`` beside it, and the next ``--resume`` read
    only ``placement.json`` and lost it."""
    paths = [p for p in (out_dir / "placement.json", out_dir / "best_placement.json") if p.exists()]
    loaded, skipped = [], []
    for path in paths:  # a corrupt file next to a valid one: resume from the valid one, and say so
        try:
            loaded.append(load_placement(path, graph=captured, devices=problem.device_names))
        except PlacementFileError as exc:
            skipped.append((path, exc))
    if paths and not loaded:  # nothing to resume from: one error, not a "skipping" line per file first
        raise skipped[0][1]
    for path, why in skipped:
        log.warning("--resume: skipping %s: %s", path.name, why)
    rows: list[np.ndarray] = []
    for placement in loaded:
        group_placement: dict[str, str] = {}
        for op, group in grouping.op_to_group.items():
            group_placement.setdefault(group, placement.assignment[op])
        row = problem.placement_to_array(group_placement)
        if not any(np.array_equal(row, r) for r in rows):
            rows.append(row)
    return rows


def _resume_pipeline(out_dir: Path, problem: PlacementProblem) -> Pipeline | None:
    """The pipeline (over the problem's groups) an earlier run left in ``out_dir``, if any:
    the pipeline search starts from it as the placement search starts from its row."""
    from envs.sim.pipeline_layout import PipelineError, group_pipeline

    for path in (out_dir / "placement.json", out_dir / "best_placement.json"):
        if not path.exists():
            continue
        try:
            placement = load_placement(path)
            if placement.pipeline is not None:
                return group_pipeline(problem, placement.pipeline)
        except (PlacementFileError, PipelineError) as exc:  # _resume_rows has said why, or will
            log.debug("--resume: no pipeline from %s: %s", path.name, exc)
    return None
