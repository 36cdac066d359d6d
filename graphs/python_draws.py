"""Draws from Python's or numpy's random numbers refused while a tracer runs forward(): no graph
can hold them.

A tracer runs such a call once and the graph keeps its value, so the placed model would use that
one value at every step; neither torch.fx nor torch.export records it.
:func:`python_draws_refused` swaps the module-level draws for a refusal
(:class:`ChangingValue`, naming the call and the model's line) while the trace runs;
:data:`CHANGING_REMEDY` says what to write instead.
"""

from __future__ import annotations

import contextlib
import random
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from graphs.errors import CaptureError
from graphs.trace_guards import replaced
from graphs.user_frames import describe_frame, is_user_file


class ChangingValue(CaptureError):
    """forward() computes with a Python value that changes from one call to the next (a draw of
    Python's ``random`` or ``numpy.random``): a tracer runs the call once and the graph keeps its
    value, so the placed model would use that one value at every step. Neither tracer records it."""


CHANGING_REMEDY = ("Expected such values drawn with torch (torch.rand(()), torch.distributions), which the graph "
                    "draws anew at every step, or passed to forward() as tensors")


#: Functions of Python's ``random`` and ``numpy.random`` that draw nothing: torch's own tracing
#: saves and restores Python's random state (torch._dynamo's preserve_rng_state).
_NOT_DRAWS = frozenset({"seed", "getstate", "setstate", "get_state", "set_state"})


@contextlib.contextmanager
def python_draws_refused() -> Iterator[None]:
    """While a tracer runs forward(): a call of Python's ``random`` functions or ``numpy.random``'s
    raises :class:`ChangingValue`, naming the call and the model's line.

    Traced, ``if random.random() < p:`` (a layer drop) or ``h * random.uniform(0.5, 1.5)`` ran once
    and the graph kept its branch or its number: the placed model trained with one value for good,
    with no error (walkthrough: outputs 0.52 off). Only the module-level functions are seen (a
    ``random.Random`` of the model's own is not); a value that still changes from one trace to the
    next is refused after a second trace (:func:`graphs.eval_capture.mode_baked_by_fx`).
    """
    draws: list[tuple[Any, str]] = []
    sources: list[tuple[Any, Any]] = [(random, random._inst)]
    numpy = sys.modules.get("numpy")  # a model that draws with numpy has imported it
    numpy_random = getattr(numpy, "random", None)  # numpy imports its random module on first use
    if numpy_random is not None:
        sources.append((numpy_random, getattr(getattr(numpy_random, "mtrand", None), "_rand", None)))
    for module, state in sources:
        for name in getattr(module, "__all__", ()):
            draw = getattr(module, name, None)
            if state is not None and getattr(draw, "__self__", None) is state and name not in _NOT_DRAWS:
                draws.append((module, name))

    def refusing(qualname: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            frame = next((f for f in reversed(traceback.extract_stack()) if is_user_file(f.filename)), None)
            where = f" at {describe_frame(frame)}" if frame is not None else ""
            raise ChangingValue(f"forward() calls {qualname}(){where}, whose value a trace runs once and bakes into "
                                f"the graph: the placed model would use that one value at every step. {CHANGING_REMEDY}")

        return refuse

    with replaced([(module, name, refusing(f"{module.__name__}.{name}")) for module, name in draws]):
        yield
