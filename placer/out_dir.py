"""The output directory of a command: refused up front when it cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

from placer.options import OptionError


def check_out_dir(out_dir: str | os.PathLike | None) -> Path | None:
    """Refuse an output directory that cannot be written, without creating it.

    The directory is created by the first file written into it, so a run that fails
    early (bad input, a model that does not fit) leaves no empty directory behind.
    """
    if out_dir is None:
        return None
    if not str(out_dir).strip():
        # Path("") is the current directory: the results landed there and were reported as in "/".
        raise OptionError("--out is empty; expected a directory to write the results into")
    path = Path(out_dir)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"cannot write to output directory {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"cannot write to output directory {str(path)!r}: {str(existing)!r} is not writable")
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
        raise OptionError(f"cannot write to output directory {str(path)!r}: {exc.strerror or exc}") from exc
    return path
