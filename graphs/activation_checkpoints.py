"""Activation checkpointing that a torch.fx trace drops, found while it traces.

``torch.utils.checkpoint.checkpoint(block, x)`` runs ``block`` without keeping its activations
and runs it again in the backward. torch.fx traces through the call: the graph holds
``block``'s ops as plain ops, so the captured model, the placed model and the simulator keep
every activation (the same results, more memory). Measured here (2026-12-07): four checkpointed
MLP blocks captured as 19 plain nodes, no recomputation left.

:func:`recording_checkpoints` records, while a trace runs, each call that reaches
checkpointing's two paths (``use_reentrant=False``: ``_checkpoint_without_reentrant_generator``;
``use_reentrant=True``: ``CheckpointFunction.apply``), both looked up in
``torch.utils.checkpoint`` at call time, so the user's ``from torch.utils.checkpoint import
checkpoint`` is seen too. The caller says what it means (:mod:`graphs.capture` warns).

The reentrant form cannot be captured at all: its forward runs the block under ``no_grad``,
which torch.fx refuses to record, and the graph torch.export made of it carried no gradient
(measured here, 2026-12-07: four checkpointed blocks and a head, the exported graph's output
``requires_grad=False``, every placement failing the check after the search as "the loss does
not require grad"). :func:`reentrant_calls` says which calls were reentrant, so capture can
refuse the model up front, naming them and the remedy (``use_reentrant=False``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["recording_checkpoints", "reentrant_calls"]

#: Appended to a recorded call's label when it took the reentrant path.
_REENTRANT = " (use_reentrant=True)"

#: The two paths of ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` False and True).
_GENERATOR = "_checkpoint_without_reentrant_generator"
_FUNCTION = "CheckpointFunction"


def _label(fn: Any, paths: dict[int, str]) -> str:
    """A checkpointed callable as the user knows it: its module path, else its name."""
    if isinstance(fn, nn.Module):
        path = paths.get(id(fn))
        return repr(path) if path else type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


@contextlib.contextmanager
def recording_checkpoints(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every activation-checkpointed call is appended, as its module path
    (or function name), to the list yielded; checkpointing itself runs as it would."""
    import torch.utils.checkpoint as checkpointing

    paths = {id(m): p for p, m in model.named_modules() if p}
    seen: list[str] = []
    generator: Any = getattr(checkpointing, _GENERATOR, None)
    function: Any = getattr(checkpointing, _FUNCTION, None)

    def recorded_generator(fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(_label(fn, paths))
        return generator(fn, *args, **kwargs)

    class RecordedFunction:
        @staticmethod
        def apply(fn: Any, *args: Any) -> Any:
            seen.append(_label(fn, paths) + _REENTRANT)
            return function.apply(fn, *args)

    # Both are looked up in the module at call time: replacing them here reaches every caller.
    if generator is not None:
        setattr(checkpointing, _GENERATOR, recorded_generator)
    if function is not None:
        setattr(checkpointing, _FUNCTION, RecordedFunction)
    try:
        yield seen
    finally:
        if generator is not None:
            setattr(checkpointing, _GENERATOR, generator)
        if function is not None:
            setattr(checkpointing, _FUNCTION, function)


def reentrant_calls(seen: list[str]) -> list[str]:
    """The calls of ``seen`` (what :func:`recording_checkpoints` yielded) that took the
    reentrant path, as their labels without the marker.

    >>> reentrant_calls(["'blocks.0'", "'blocks.1' (use_reentrant=True)"])
    ["'blocks.1'"]
    """
    return [s[:-len(_REENTRANT)] for s in seen if s.endswith(_REENTRANT)]
