"""An earlier run's results in the output folder: moved aside before a run, put back after a failed one.

A run writes its files (:data:`RESULT_FILES`, every agent's policy) into ``out_dir``. One
that found another run's files there would leave its own beside them, a best so far next
to an older placement.json and report.md; so before the search writes anything they go
to ``out_dir/previous/`` (:func:`set_aside_previous`), and when the run fails without a
result they come back (:func:`put_back_previous`). ``--resume`` continues from them
instead (:mod:`placer.optimizing.resume`), and nothing is moved.

Apart from the stages (:mod:`placer.optimizing.stages`): it is file keeping around the
run, which :func:`placer.optimizing.run.run` does before the search and after a failure,
not a stage of the optimisation.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

from placer.optimizing.config import OptimizeConfig
from placer.optimizing.stage_outputs import Compiled
from placer.options import OptionError
from placer.search.agents.registry import agent_names, get_agent

log = logging.getLogger(__name__)


#: The files a run writes into ``out_dir`` (results, the best so far, the policy).
RESULT_FILES = ("placement.json", "best_placement.json", "report.md", "comparison.csv", "device_map.json",
                "measurements.json", "calibration.json", "placed_graph.png", "memory.png", "schedule.png",
                "search_curve.png", "search_phases.png")


def set_aside_previous(config: OptimizeConfig, compiled: Compiled) -> Path | None:
    """Before the search writes anything: move an earlier run's result files from ``out_dir``
    into ``out_dir/previous/`` (:func:`set_aside_results`), so that this run's files never sit
    beside another run's (a run that fails or is interrupted would otherwise leave its
    best_placement.json next to the earlier placement.json and report.md). Nothing with
    ``--resume``, which continues from them. Returns the folder the files went to (None:
    nothing moved)."""
    out_dir = compiled.run.out_dir
    if config.resume or out_dir is None:
        return None
    return set_aside_results(out_dir)


def set_aside_results(out_dir: Path, resume_hint: bool = True) -> Path | None:
    """Move the result files of an earlier run in ``out_dir`` into ``out_dir/previous/``; the
    one rotation both ``optimize --out`` and :meth:`placer.result.OptimizeResult.save` use, so
    that one folder never mixes two runs. Returns the folder the files went to (None: there
    were none). ``resume_hint``: the messages mention ``--resume`` (not for ``save()``, which
    has no such option).

    ``previous/`` keeps the last *complete* result: the leftovers of a run that did not finish
    (a best so far, a policy, but no placement.json) go to ``unfinished/`` instead when
    ``previous/`` holds one, so a stopped run followed by a new one does not lose it. Only an
    older folder of the same kind is deleted.

    Raises:
        OptionError: the files could not be moved (the folder of that name holds the user's
            own files, or ``out_dir`` is not writable); nothing was written.
    """
    found = _result_files_in(out_dir)
    if not found:
        return None
    complete = (out_dir / "placement.json").is_file()
    target = out_dir / ("unfinished" if not complete and (out_dir / "previous" / "placement.json").is_file()
                        else "previous")
    try:
        _move_into(found, target)
    except FileExistsError as exc:  # the user's own folder of that name: say so, not "not writable"
        raise OptionError(f"cannot move the earlier results in {str(out_dir)!r} aside: {exc.strerror}"
                          + ("; or use --resume to continue from them" if resume_hint else "")) from exc
    except OSError as exc:
        raise OptionError(f"cannot move the earlier results in {str(out_dir)!r} aside into {target.name}/: "
                          f"{exc.strerror or exc}; expected a writable output directory"
                          + (" (or --resume to continue from them)" if resume_hint else "")) from exc
    log.warning("%s held %s results of an earlier run: moved to %s/%s", out_dir, "the" if complete else "unfinished",
                target, " (use --resume to continue from them)" if resume_hint else "")
    return target


def _placer_file_names() -> tuple[str, ...]:
    """The names of the files a run writes into its folder (results, the best so far, every agent's policy)."""
    return (*RESULT_FILES, *dict.fromkeys(get_agent(a).policy_file for a in agent_names()))


def _result_files_in(folder: Path) -> list[Path]:
    """placer's own files in ``folder`` (results, the best so far, every agent's policy)."""
    return [folder / n for n in _placer_file_names() if (folder / n).is_file()]


def _move_into(files: list[Path], folder: Path) -> None:
    """Move ``files`` into a fresh ``folder``. An older one of that name is deleted first, but
    only when it holds nothing but placer's own files: ``--out .`` in a folder whose
    ``previous/`` held the user's notes deleted them.

    Raises:
        FileExistsError: ``folder`` holds something placer did not write (nothing is moved).
    """
    if folder.is_dir():
        names = set(_placer_file_names())
        foreign = sorted(p.name for p in folder.iterdir() if not (p.is_file() and p.name in names))
        if foreign:
            raise FileExistsError(
                errno.EEXIST, f"{folder} holds files placer did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); move them away or choose another output folder")
        shutil.rmtree(folder)
    folder.mkdir()
    for path in files:
        path.replace(folder / path.name)


def put_back_previous(compiled: Compiled, moved: Path | None, interrupted: bool = False) -> None:
    """After a run failed without writing its results: the earlier complete result goes back
    where it was (from ``previous/``), and this run's leftovers (its best so far) to
    ``failed/``, so a failed run leaves ``out_dir`` as the user had it.

    ``interrupted``: the run was stopped (Ctrl-C, SIGTERM). Its best so far stays in
    ``out_dir``, as documented; only when it had written nothing yet does the earlier result
    go back (a Ctrl-C right after the set-aside left ``out_dir`` empty, the results in
    ``previous/`` and the one line "interrupted")."""
    out_dir = compiled.run.out_dir
    if moved is None or out_dir is None or moved.name != "previous" or (out_dir / "placement.json").is_file():
        return
    if interrupted and _result_files_in(out_dir):
        return
    try:
        leftovers = _result_files_in(out_dir)
        if leftovers:
            _move_into(leftovers, out_dir / "failed")
        for path in moved.iterdir():
            path.replace(out_dir / path.name)
        moved.rmdir()
    except OSError as exc:  # the failure being reported matters more; the files are all still there
        log.warning("could not put the earlier results back from %s: %s", moved, exc)
        return
    log.warning("the run %s: the earlier results are back in %s%s", "was interrupted" if interrupted else "failed",
                out_dir, f", this run's best so far in {out_dir / 'failed'}/" if leftovers else "")
