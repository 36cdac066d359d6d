"""The error profiling raises when asked for something it cannot do, a :class:`graphs.errors.GraphError`.

In a module of its own because every part of profiling raises it (the devices, the isolated
timing, the whole pass, the training-step timing) and each of them is imported by the pass.
"""

from __future__ import annotations

from graphs.errors import GraphError


class ProfileError(GraphError):
    """Profiling was asked for something it cannot do (bad device, mismatched graph, inputs that do not run)."""
