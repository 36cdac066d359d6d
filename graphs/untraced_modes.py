"""Grad-mode and autocast changes inside forward(), which torch.fx cannot record (torch.export
can): refused with their own errors.

The fx tracer refuses an op run with gradients switched off inside forward()
(:class:`GradModeNotTraced`) and a node made under another autocast state than the one tracing
began in (:class:`AutocastNotTraced`, compared with :func:`autocast_state`).
"""

from __future__ import annotations

from typing import Any

import torch

from graphs.errors import CaptureError


class GradModeNotTraced(CaptureError):
    """forward() changes the grad mode, which torch.fx cannot record (torch.export can)."""


class AutocastNotTraced(CaptureError):
    """forward() enters or leaves ``torch.autocast``, which torch.fx cannot record (torch.export can)."""


#: Device types whose autocast state a forward() may change.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> tuple[tuple[bool, torch.dtype], ...]:
    """Whether autocast is on, and to which dtype, per device type."""
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)


def target_name(target: Any) -> str:
    return str(getattr(target, "__name__", target))
