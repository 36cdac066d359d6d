"""``torch.get_default_dtype()`` set for a block and put back after it.

The default dtype is process-wide, and a model file may set it when imported
(``torch.set_default_dtype(torch.float64)`` in a scientific model): placer's numerical check runs
the model in float64 with it set so (tensors forward makes, ``torch.zeros(n)``, follow), and
placer's own networks (the search's policy, trained in float32 on float32 features) run with it
set back to float32, whatever the model file chose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["default_dtype"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.get_default_dtype()`` is ``dtype`` inside (None: unchanged), as it was after.

    >>> with default_dtype(torch.float64):
    ...     torch.zeros(1).dtype
    torch.float64
    >>> torch.zeros(1).dtype
    torch.float32
    """
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
