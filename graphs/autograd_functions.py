"""Custom autograd Functions: recorded as one node that calls the Function, so that its backward runs.

A model that calls ``GradReverse.apply(x, alpha)`` (a gradient-reversal layer, a straight-through
estimator, a fused kernel with a hand-written backward) means the Function's own ``backward``.
Left to fx, ``Function.apply`` runs ``forward`` on Proxies under ``torch.no_grad``
(``torch/autograd/function.py``: ``_SingleLevelFunction.apply`` is the C++ ``_FunctionBase.apply``):
the graph would hold the forward's ops, whose gradient is not the Function's (gradient
reversal: the sign flipped), and capture refused the model (``GradModeNotTraced``); torch.export
likewise replaces the backward by the gradient of the forward.

While :class:`graphs.fx_tracer.PlacerTracer` traces, :func:`functions_recorded_whole` records each
such call as one ``call_function`` node of :func:`apply_function`, named by the Function's
module and qualified name (``apply_function("model:GradReverse", x, 0.5)``): a plain
importable function, so the placed GraphModule pickles, and reaches the worker processes, where
the model file is loaded under the same module name (``envs.runtime.pipeline.launcher``). The
node is marked as fx marks a ``torch.fx.wrap`` call (``meta["is_wrapped"]``), so the generated
code declares it wrapped and fx's re-trace when such a module is unpickled keeps it one node.
Autograd then runs the Function's ``forward`` and ``backward`` wherever the node is placed.

A Function its name does not find again (defined inside a function, or in code that was not
loaded from a file) cannot be called from another process: capture refuses it with the fixes
(define it at module level, or call it inside a leaf module). torch's own Functions (reentrant
checkpointing's ``CheckpointFunction``) are left to fx and the rules capture has for them
(:mod:`graphs.activation_checkpoints`).

Example::

    class Double(torch.autograd.Function):          # at module level of the model file
        @staticmethod
        def forward(ctx, x): return x * 2
        @staticmethod
        def backward(ctx, g): return g * 2

    # fx_trace(model) records Double.apply(h) as apply_function("<module>:Double", h)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch.fx as fx
from torch.autograd.function import Function
from torch.utils._pytree import tree_leaves

from graphs.errors import CaptureError

__all__ = ["FunctionNotNamed", "apply_function", "function_name", "functions_recorded_whole", "is_function_call"]


class FunctionNotNamed(CaptureError):
    """forward() calls an autograd Function that another process cannot name (defined inside a
    function). torch.export is not tried instead: it would replace the Function's backward."""


def function_name(function: type[Function]) -> str:
    """``module:Qualname`` of a Function class: what :func:`apply_function` resolves."""
    return f"{function.__module__}:{function.__qualname__}"


def _resolved(name: str) -> type[Function]:
    """The Function ``module:Qualname`` names, looked up on every call (a few microseconds): a
    model file loaded or reloaded anew defines a new class under the same name."""
    module_name, _, qualname = name.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def _found(name: str) -> Any:
    try:
        return _resolved(name)
    except (ImportError, AttributeError, ValueError):
        return None


def apply_function(function: str, *args: Any, **kwargs: Any) -> Any:
    """Call the autograd Function named ``function`` (``module:Qualname``) on ``args``, as
    ``Function.apply`` does: autograd records it and runs its own backward.

    >>> import torch
    >>> apply_function("torch.autograd._functions.tensor:Resize", torch.ones(2, 3), (6,)).shape
    torch.Size([6])
    """
    return _resolved(function).apply(*args, **kwargs)


def is_function_call(node: fx.Node) -> bool:
    """Whether ``node`` is a custom autograd Function recorded whole."""
    return node.op == "call_function" and node.target is apply_function


@contextlib.contextmanager
def functions_recorded_whole(tracer: fx.Tracer) -> Iterator[None]:
    """While fx traces with ``tracer``, record ``SomeFunction.apply(...)`` on Proxies as one
    :func:`apply_function` node (module doc); calls on real tensors run as usual."""
    original = Function.__dict__["apply"]

    def apply(cls: type[Function], *args: Any, **kwargs: Any) -> Any:
        if cls.__module__.split(".")[0] == "torch" or not any(isinstance(a, fx.Proxy)
                                                               for a in tree_leaves((args, kwargs))):
            # torch's own Functions (reentrant checkpointing's CheckpointFunction) keep the
            # handling capture has for them (graphs.activation_checkpoints)
            return original.__func__(cls, *args, **kwargs)
        name = function_name(cls)
        if _found(name) is not cls:
            raise FunctionNotNamed(
                f"forward() calls the autograd Function {cls.__qualname__}, which its name {name!r} does not find "
                "again (defined inside a function, or in code not loaded from a file); the placed model calls it by "
                "that name, also in worker processes: define it at module level of a file (the model file is "
                "fine), or call it inside a submodule named as a leaf module (leaf_modules, or `--leaf MODULE` on "
                "the command line), which runs it whole")
        proxy = tracer.create_proxy("call_function", apply_function, (name, *args), kwargs,
                                    name=_snake(cls.__name__))
        proxy.node.meta["is_wrapped"] = True  # as torch.fx.wrap marks its calls: fx's re-trace keeps it one node
        return proxy

    Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        Function.apply = original  # type: ignore[method-assign]


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))
