"""The error of a placement that cannot be applied: :class:`ApplyError`.

Every step of applying a placement refuses with it (a device name that is neither a torch
device nor mapped, a module shared by nodes on two devices, state updated in place on two
devices), in :mod:`envs.runtime.apply` and in the modules it is built from; it lives apart
from all of them so that each can raise it without importing the others. Callers catch it
from :mod:`envs.runtime.apply`, which re-exports it.
"""

from __future__ import annotations

from graphs.errors import PlacerError

__all__ = ["ApplyError"]


class ApplyError(PlacerError, ValueError):
    """A placement that cannot be applied to the model it was given."""
