"""optimize's numerical checks within the memory the machine has free.

The checks train the model in this process: the winner's check trains a copy of the model
and the placed copy side by side, the check of a pipeline's batch split trains it on the
full batch and on its parts. On a cluster of CPUs both run under
:func:`envs.runtime.host_memory.host_memory_limit`, so a model too large for them stops
with a message saying what was kept, where the kernel would have killed the process
(the 8-layer paper NMT on a 24 GB machine: exit 137 a minute into the winner's check,
2026-12-06, before this guard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from envs.hardware.cluster import Cluster
from envs.runtime.host_memory import available_bytes, host_memory_limit, is_out_of_memory
from graphs.errors import PlacerError

__all__ = ["within_host_memory"]


def _gib(n: int | None) -> str:
    """``n`` bytes as GiB for a message ("an unknown amount" when None).

    >>> _gib(3 * 2**30), _gib(None)
    ('3.0 GiB', 'an unknown amount')
    """
    return "an unknown amount" if n is None else f"{n / 2**30:.1f} GiB"


def on_host(cluster: Cluster) -> bool:
    """Whether every real device of ``cluster`` is a CPU (the host memory limit applies to nothing else)."""
    return all(str(d).split(":")[0] == "cpu" for d in cluster.real_device_map().values())


@contextlib.contextmanager
def within_host_memory(cluster: Cluster, what: str, trains: str) -> Iterator[None]:
    """Run the block (``what``: the check it runs, "the numerical check"; ``trains``: what it
    trains, "a copy of the model and the placed copy side by side") under the host memory
    limit when ``cluster``'s devices are CPUs; an allocation that fails there becomes a
    :class:`PlacerError` saying so, what was kept and how to go on. Elsewhere the block runs as is.

    Raises:
        PlacerError: the block ran out of host memory.
    """
    if not on_host(cluster):
        yield
        return
    free = available_bytes()  # read now: once the block has failed, it has taken it
    with host_memory_limit():
        try:
            yield
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise PlacerError(
                f"{what} ran out of host memory: it trains {trains} on this machine's CPU, and about {_gib(free)} "
                "was free when it started; placement.json not written (the winner is in best_placement.json, not "
                "checked). Run again with --resume --no-check to write it unchecked (the search starts from it), or "
                "on a machine with more free memory") from None
