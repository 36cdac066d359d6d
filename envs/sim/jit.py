"""numba's ``register_jitable`` where numba is installed, the plain function where it is not.

The simulator's loops (:mod:`envs.sim.kernels`, :mod:`envs.sim.kernels_engine`) are plain
Python that numba compiles into its drivers (:mod:`envs.sim.simulator_numba`); without numba
the same functions run as they are (the ``"python"`` backend).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:  # numba is optional: without it these are plain Python functions.
    from numba.cpython.unsafe.numbers import leading_zeros
    from numba.extending import overload
    from numba.extending import register_jitable as jitable
except ImportError:  # pragma: no cover - depends on the environment
    overload = None
    leading_zeros = None

    def jitable(*args: Any, **_options: Any) -> Any:
        """``register_jitable`` without numba: the function itself (``@jitable`` or ``@jitable(inline=...)``)."""
        if args:
            return args[0]
        return lambda fn: fn

__all__ = ["jitable", "inlined", "overload", "leading_zeros"]


def inlined(fn: Callable) -> Callable:
    """``fn`` compiled into its callers' IR (``inline="always"``). A fresh options dict per
    function: numba's ``register_jitable`` pops ``inline`` from the dict its decorator
    closes over, so one shared decorator would inline only the first function.

    Used only for the once-per-placement steps of the loops. The per-op rules (the stream
    enqueue, the copy, the copy targets, the engine's bitset and heap) stay written out in
    each loop: factored into ``inlined`` helpers (same results to the bit) they made the
    engine 32% slower (event_pass, 2,930 against 4,310 placements per CPU-second) and the
    static pass 3.5x slower (7,000 against 24,300), NUMBA_NUM_THREADS=1, 1,000-op layered
    DAG on 4xV100-nvlink, load ~2. Why is not pinned down: a small loop with one inlined
    helper compiled to the same code as the loop written out, so the cost comes with these
    loops' many array arguments and branches, not with inlining as such.
    """
    return jitable(inline="always")(fn)
