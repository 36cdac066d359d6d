"""When results cannot be written (a full disk, an output directory that became read-only).

Every write of a placement into the output directory goes through :func:`save_or_fallback`:
an :class:`OSError` (``ENOSPC``, ``EACCES``, ``EROFS``, ...) does not lose the best
placement behind a traceback. The placement is saved atomically to a fallback file in the
system's temporary directory, named by the model's fingerprint so a rerun of the same
model finds (and replaces) it, and an :class:`OutputWriteError` — a
:class:`~graphs.errors.PlacerError`, so the CLI prints one line and exits 2 — names the
path, the operating system's reason and where the placement went. When even the fallback
cannot be written, the error carries the placement's JSON for the CLI to print on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

from graphs.errors import PlacerError
from placer.placement_file import Placement, save_placement

__all__ = ["OutputWriteError", "fallback_path", "os_reason", "rescue", "save_or_fallback"]

log = logging.getLogger(__name__)


class OutputWriteError(PlacerError):
    """Results could not be written; the best placement was saved elsewhere or is carried here.

    Attributes:
        path: the file that could not be written.
        reason: the operating system's reason (``No space left on device``).
        fallback: where the best placement was saved instead (None when that failed too).
        placement_json: the placement as JSON when no file could hold it, else None.
    """

    def __init__(self, path: Path, reason: str, fallback: Path | None, placement_json: str | None) -> None:
        self.path, self.reason, self.fallback, self.placement_json = path, reason, fallback, placement_json
        where = (f"the best placement was saved to {fallback} instead" if fallback is not None
                 else "the fallback file could not be written either; the best placement follows on stderr")
        super().__init__(f"cannot write {path}: {reason}; {where}")


def fallback_path(fingerprint: str | None) -> Path:
    """The fallback file of a model's best placement: ``<tmp>/placer-best-<fingerprint>.json``."""
    tag = "".join(ch for ch in (fingerprint or "unknown")[:16] if ch.isalnum()) or "unknown"
    return Path(tempfile.gettempdir()) / f"placer-best-{tag}.json"


def os_reason(exc: OSError) -> str:
    """The operating system's words for ``exc`` (``No space left on device``), else its text."""
    if exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    return str(exc)


def rescue(placement: Placement, path: Path, exc: OSError) -> OutputWriteError:
    """Save ``placement`` to its fallback file after writing ``path`` failed with ``exc``.

    Returns the error to raise: it says where the placement went, or carries its JSON
    when the fallback could not be written either.
    """
    fallback = fallback_path(placement.fingerprint)
    try:
        save_placement(placement, fallback)  # atomic too: never a half-written fallback
    except OSError as again:
        log.debug("fallback %s not writable either: %s", fallback, again)
        return OutputWriteError(path, os_reason(exc), None, json.dumps(placement.to_dict(), indent=2, default=str))
    return OutputWriteError(path, os_reason(exc), fallback, None)


def save_best_so_far(placement: Placement, out_dir: str | os.PathLike) -> Path:
    """``out_dir/best_placement.json``: the best placement a run has found so far, marked
    ``"checked": false`` (only ``placement.json`` is written after the numerical check), so
    ``placer apply`` can say so. Otherwise as :func:`save_or_fallback`.

    A faster placement of the same model on the same devices already there (by the same kind
    of step time) is kept: a resumed run's search starts from scratch and would otherwise
    replace the earlier run's best with its own first, slower ones, and lose it if stopped.
    """
    path = Path(out_dir) / "best_placement.json"
    # This process's own file is always replaced: a recalibrated reward rescores its best.
    if path.resolve() not in _WRITTEN_HERE and _faster_on_disk(path, placement):
        log.debug("%s holds a faster placement of this model: kept", path)
        return path
    marked = dataclasses.replace(placement, metadata={**placement.metadata, "checked": False})
    written = save_or_fallback(marked, path)
    _WRITTEN_HERE.add(path.resolve())
    return written


#: The best_placement.json files this run wrote (see :func:`save_best_so_far`).
_WRITTEN_HERE: set[Path] = set()


def new_run_in(out_dir: str | os.PathLike) -> None:
    """A new run starts writing into ``out_dir``: its first best is compared with the file on
    disk, as another process's would be. The set was the process's, so a second
    ``placer.optimize(..., resume=True)`` in one process replaced the earlier run's faster
    best with its own first, slower one, which an interrupt then left on disk."""
    _WRITTEN_HERE.discard((Path(out_dir) / "best_placement.json").resolve())


def _faster_on_disk(path: Path, placement: Placement) -> bool:
    """Whether ``path`` holds a placement of the same model, devices and step-time source as
    ``placement`` with a lower step time (an unreadable file holds nothing to keep)."""
    from placer.placement_file import PlacementFileError, load_placement

    if not path.is_file():
        return False
    try:
        old = load_placement(path)
    except PlacementFileError:
        return False
    same = (old.fingerprint == placement.fingerprint and list(old.devices) == list(placement.devices)
            and old.metadata.get("source") == placement.metadata.get("source")
            and old.metadata.get("cluster") == placement.metadata.get("cluster"))
    try:
        return same and float(old.metadata["step_time"]) < float(placement.metadata["step_time"])
    except (KeyError, TypeError, ValueError):
        return False


def save_or_fallback(placement: Placement, path: str | os.PathLike) -> Path:
    """:func:`~placer.placement_file.save_placement`, or the fallback and an :class:`OutputWriteError`.

    Raises:
        OutputWriteError: ``path`` could not be written (the placement is in ``error.fallback``
            or ``error.placement_json``).
    """
    target = Path(path)
    try:
        return save_placement(placement, target)
    except OSError as exc:
        raise rescue(placement, target, exc) from exc
