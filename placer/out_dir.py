"""The output and cache directories of a command: refused up front when they cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

from placer.options import OptionError


def check_out_dir(out_dir: str | os.PathLike | None) -> Path | None:
    """Refuse an output directory that cannot be written, without creating it.

    The directory is created by the first file written into it, so a run that fails
    early (bad input, a model that does not fit) leaves no empty directory behind. A
    leading ``~`` is the home directory, as for ``--cache-dir``: ``--out "~/runs"`` (quoted,
    or from a script's config) made a folder named ``~`` in the current one and printed
    "results in ~/runs/". Callers write into the path returned.
    """
    if out_dir is not None and str(out_dir).strip():
        out_dir = Path(out_dir).expanduser()
    return _check_writable_dir(out_dir, "--out", "output directory")


def check_cache_dir(cache_dir: str | os.PathLike | None) -> Path | None:
    """Refuse a profile cache directory that cannot be written (a file, a read-only place),
    before the model is captured: the profiler found out only when it first saved a profile,
    with a traceback. None: the default cache, which is checked where it is made."""
    if cache_dir is None:
        return None
    return _check_writable_dir(Path(cache_dir).expanduser() if str(cache_dir).strip() else cache_dir,
                               "--cache-dir", "cache directory")


def check_placement_cache_dir(folder: str | os.PathLike) -> Path | None:
    """Refuse a placement cache (``placer.place``'s ``cache_dir``) that cannot be written,
    before the search: it was found only when the searched placement was to be saved, after
    the whole budget (two minutes by default), and the placement was lost."""
    try:
        return _check_writable_dir(folder, "cache_dir", "placement cache")
    except OptionError as exc:
        raise OptionError(f"{exc}; pass cache_dir= a writable folder or use_cache=False") from None


def _check_writable_dir(folder: str | os.PathLike | None, option: str, what: str) -> Path | None:
    if folder is None:
        return None
    if not str(folder).strip():
        # Path("") is the current directory: the results landed there and were reported as in "/".
        raise OptionError(f"{option} is empty; expected a directory to write into")
    path = Path(folder)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"cannot write to {what} {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"cannot write to {what} {str(path)!r}: {str(existing)!r} is not writable")
    try:
        if existing != path:
            # os.access trusts mode bits: root passes them, and so do /proc or a read-only
            # mount; only creating something there shows the folder can be made.
            probe_dir = existing / f".placer-write-test-{os.getpid()}"
            probe_dir.mkdir()
            probe_dir.rmdir()
            return path
        probe = path / f".placer-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OptionError(f"cannot write to {what} {str(path)!r}: {exc.strerror or exc}") from exc
    return path
