"""Writing output files atomically: a reader, a crash or a second Ctrl-C never sees half a file.

Every file is written to a temporary file with a unique name in the same directory
(``tempfile.mkstemp``: two writers of one path each get their own, where a fixed
``path + ".tmp"`` let them overwrite each other's half-written data) and renamed over the
target with ``os.replace``, which POSIX and Windows make atomic within one file system.
This is the lowest layer that writes files (graph files, the profile cache), so every
layer above uses it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp creates files readable by their owner only; an output file gets the mode a
#: plain open() would give it. Read once: os.umask can only be read by setting it.
_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a unique temporary path next to ``path``; on success it replaces ``path``.

    For writers that want a file name rather than a handle (matplotlib's ``savefig``,
    pandas' ``to_csv``). On an exception the temporary file is removed and ``path`` is
    left as it was. ``suffix`` defaults to ``path``'s, so format-by-extension writers
    (savefig) pick the right format.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                               suffix=target.suffix if suffix is None else suffix)
    try:
        os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module doc); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not land before the data on a crash
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module doc); returns the path."""
    return write_bytes_atomic(path, text.encode(encoding))
