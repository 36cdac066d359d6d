"""A model's buffers put back as they were after a trial forward (a BatchNorm's running
statistics, a quantization observer's ranges), so that probing a model leaves no trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer on exit (trial forward passes must leave no trace): its values, and its
    shape where the forward changed it (:func:`restore_buffers`)."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        restore_buffers(model, saved)


def restore_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put ``model``'s buffers back to ``saved`` (by name; others are left), shape included: a
    quantization observer sizes its per-channel ``min_val`` from ``(0,)`` to ``(channels,)`` on its
    first call, and a trial forward that left that made the parent's model another model than the
    one a worker process builds from the same file (and ``copy_`` of the saved value then failed:
    "The size of tensor a (16) must match the size of tensor b (0)").

    >>> norm = nn.BatchNorm1d(2)
    >>> saved = {n: b.clone() for n, b in norm.named_buffers()}
    >>> _ = norm(torch.randn(4, 2) + 3)
    >>> restore_buffers(norm, saved)
    >>> norm.running_mean.tolist(), int(norm.num_batches_tracked)
    ([0.0, 0.0], 0)
    """
    with torch.no_grad():
        for name, buf in list(model.named_buffers()):
            if name not in saved:
                continue
            value = saved[name]
            if buf.shape != value.shape:
                try:
                    buf.resize_(value.shape)
                except RuntimeError:  # not resizable (a view): a copy of the saved value takes its place
                    owner, _, leaf = name.rpartition(".")
                    model.get_submodule(owner)._buffers[leaf] = value.detach().clone().to(buf.device)
                    continue
            buf.copy_(value.to(buf.device) if value.device != buf.device else value)
