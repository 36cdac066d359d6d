"""What the CLI prints of the library's log: the library logs (``logging``), the CLI decides.

A command wraps its work in :func:`printed_logs`: records of the ``placer`` loggers at
``level`` and above are printed as ``placer: <message>`` while the command runs —
informational ones on stdout, where the command's own output goes, warnings and errors on
stderr — and the handlers are removed afterwards, so library users who configure logging
themselves see no change.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class _Below(logging.Filter):
    """Passes records below ``level``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


@contextmanager
def printed_logs(level: int = logging.INFO, out: TextIO | None = None, err: TextIO | None = None) -> Iterator[None]:
    """Print ``placer`` log records of ``level`` and above while the block runs (below WARNING on
    ``out``, default stdout; the rest on ``err``, default stderr)."""
    logger = logging.getLogger("placer")
    formatter = logging.Formatter("placer: %(message)s")
    info = logging.StreamHandler(out if out is not None else sys.stdout)
    info.setLevel(level)
    info.addFilter(_Below(logging.WARNING))
    warnings = logging.StreamHandler(err if err is not None else sys.stderr)
    warnings.setLevel(max(level, logging.WARNING))
    handlers = (info, warnings)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    old_level = logger.level
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(old_level)
