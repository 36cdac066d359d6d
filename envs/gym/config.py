"""Construction-time checks shared by the placement environments.

The environments pad every graph to a fixed ``max_nodes`` / ``max_edges`` so that one
policy can serve graphs of different sizes, and the hierarchical action places nodes into
``num_groups`` groups. This module resolves those sizes (with their documented defaults)
and turns every bad construction argument into an :class:`EnvConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphs.errors import PlacerError

#: The hierarchical planner (ICLR 2018) found 256 groups worked best; more only slows learning.
MAX_DEFAULT_GROUPS = 256


class EnvConfigError(PlacerError, ValueError):
    """An environment built with arguments that cannot work (unknown model, cluster or
    reward mode, a graph larger than the padding, ...)."""


#: The render modes of the placement environments: ``"ansi"`` is a text summary of the current
#: placement; ``None`` (the default) renders nothing.
RENDER_MODES: tuple[str, ...] = ("ansi",)


class RenderModeError(EnvConfigError, TypeError):
    """A ``render_mode`` the environments do not have. Also a TypeError, what an env without
    render modes raises for the keyword: SB3's ``make_vec_env`` asks ``gym.make`` for
    ``render_mode="rgb_array"`` and builds the env without it on a TypeError."""


def check_render_mode(render_mode: str | None) -> str | None:
    """``render_mode`` if it is None or one of :data:`RENDER_MODES`, else a :class:`RenderModeError`."""
    if render_mode is not None and render_mode not in RENDER_MODES:
        raise RenderModeError(f"render_mode={render_mode!r} is not supported; the placement environments render "
                              f"{', '.join(repr(m) for m in RENDER_MODES)} (text) or nothing (None)")
    return render_mode


def default_num_groups(num_nodes: int, num_devices: int) -> int:
    """The default group count G of the hierarchical action.

    ``G = min(N, max(2 * D, min(256, 4 * ceil(sqrt(N)))))``: enough groups that every device
    can receive at least two (so a split is never forced through one group), growing like
    sqrt(N) so the grouper has to generalise instead of memorising a per-node table, capped at
    the 256 the hierarchical planner found best, and never more than there are nodes — except
    that G is at least D, so that every placement (node i on device d) is an action even when
    the graph has fewer nodes than there are devices (some groups then stay empty).
    E.g. N=200, D=4 -> 60; N=20, D=4 -> 20; N=5000, D=8 -> 256; N=3, D=5 -> 5.
    """
    if num_nodes < 1:
        raise EnvConfigError("the graph has no nodes; a placement problem needs at least one node")
    if num_devices < 1:
        raise EnvConfigError("the cluster has no devices; a placement problem needs at least one device")
    by_size = min(MAX_DEFAULT_GROUPS, 4 * math.ceil(math.sqrt(num_nodes)))
    return int(max(num_devices, min(num_nodes, max(2 * num_devices, by_size))))


@dataclass(frozen=True)
class Padding:
    """Resolved sizes of an environment's observation and action.

    Attributes:
        num_nodes: N, real nodes of the problem.
        num_edges: E, real edges of the problem.
        max_nodes: padded node count (>= N).
        max_edges: padded edge count (>= E, and >= 1 so every Box has a positive size).
    """

    num_nodes: int
    num_edges: int
    max_nodes: int
    max_edges: int


def resolve_padding(num_nodes: int, num_edges: int, max_nodes: int | None, max_edges: int | None) -> Padding:
    """Check the requested padding against the graph; ``None`` means "exactly the graph's size".

    Raises:
        EnvConfigError: when the graph does not fit the padding, or a size is not a positive int.
    """
    if max_nodes is None:
        max_nodes = num_nodes
    if max_edges is None:
        max_edges = max(num_edges, 1)
    max_nodes = positive_int("max_nodes", max_nodes)
    max_edges = positive_int("max_edges", max_edges)
    if num_nodes > max_nodes:
        raise EnvConfigError(
            f"the graph has {num_nodes} nodes but the environment is padded to max_nodes={max_nodes}; "
            f"pass max_nodes >= {num_nodes} (or group the graph into fewer nodes)"
        )
    if num_edges > max_edges:
        raise EnvConfigError(
            f"the graph has {num_edges} edges but the environment is padded to max_edges={max_edges}; "
            f"pass max_edges >= {num_edges}"
        )
    return Padding(num_nodes=num_nodes, num_edges=num_edges, max_nodes=max_nodes, max_edges=max_edges)


def resolve_num_groups(num_groups: int | None, num_nodes: int, num_devices: int) -> int:
    """Return the group count of the hierarchical action, checking a user-given one."""
    if num_groups is None:
        return default_num_groups(num_nodes, num_devices)
    return positive_int("num_groups", num_groups)


def positive_int(label: str, value: object) -> int:
    """``value`` as an int >= 1, or an :class:`EnvConfigError` naming ``label``."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
        raise EnvConfigError(f"{label} must be a positive integer, got {value!r}")
    return int(value)
