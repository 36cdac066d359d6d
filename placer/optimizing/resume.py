"""``--resume``: what an earlier run left in the output folder to continue from.

The search starts from the placements an earlier run wrote into ``out_dir``
(``placement.json`` and ``best_placement.json``, read once: :func:`read_earlier_run`), as
group-level rows of the problem (:func:`_resume_rows`), and the pipeline search from the
pipeline they hold (:func:`_resume_pipeline`); the agent's policy is resumed by the search
itself (:class:`placer.search.config.SearchConfig` ``resume``).

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
from placer.placement_file import Placement, PlacementFileError, check_loaded_placement, read_placement

log = logging.getLogger(__name__)


#: The files an earlier run left in ``out_dir``, each read once (:func:`read_earlier_run`):
#: its path and its placement, unchecked against the model, or why it could not be read.
EarlierRun = list[tuple[Path, Placement | PlacementFileError]]


def read_earlier_run(out_dir: Path) -> EarlierRun:
    """The placement files an earlier run left in ``out_dir`` (``placement.json``, then
    ``best_placement.json``; those that exist), each read once: :func:`_resume_rows` checks
    them against the model and :func:`_resume_pipeline` takes their pipeline from the same
    reading. Before the search starts: its first improvement may replace ``best_placement.json``."""
    earlier: EarlierRun = []
    for path in (out_dir / "placement.json", out_dir / "best_placement.json"):
        if not path.exists():
            continue
        try:
            earlier.append((path, read_placement(path)))
        except PlacementFileError as exc:
            earlier.append((path, exc))
    return earlier


def _resume_rows(earlier: EarlierRun, captured: CapturedModel, grouping: Grouping,
                 problem: PlacementProblem) -> list[np.ndarray]:
    """The group-level rows of the placements an earlier run left (``earlier``: none if there are none).

    Both files count: after a resumed run was killed, ``best_placement.json`` holds a better
    placement than the older ``placement.json`` beside it, and the next ``--resume`` read
    only ``placement.json`` and lost it."""
    paths = [path for path, _ in earlier]
    loaded, skipped = [], []
    for path, read in earlier:  # a corrupt file next to a valid one: resume from the valid one, and say so
        if isinstance(read, PlacementFileError):
            skipped.append((path, read))
            continue
        try:
            loaded.append(check_loaded_placement(read, path, graph=captured, devices=problem.device_names))
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


def _resume_pipeline(earlier: EarlierRun, problem: PlacementProblem) -> Pipeline | None:
    """The pipeline (over the problem's groups) an earlier run left (``earlier``), if any:
    the pipeline search starts from it as the placement search starts from its row."""
    from envs.sim.pipeline_layout import PipelineError, group_pipeline

    for path, read in earlier:
        if isinstance(read, PlacementFileError):  # _resume_rows has said why
            log.debug("--resume: no pipeline from %s: %s", path.name, read)
            continue
        try:
            if read.pipeline is not None:
                return group_pipeline(problem, read.pipeline)
        except PipelineError as exc:
            log.debug("--resume: no pipeline from %s: %s", path.name, exc)
    return None
