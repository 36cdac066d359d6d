"""Guards around an fx trace of forward(): a tensor fx would bake into the graph is recorded as a
node, and an update of the model's state fx would not record is stopped before it runs.

While fx traces, :class:`GuardedTrace` records a tensor forward() makes from constants alone
(factories and random draws: fx would run them once and keep the result) as a node, records
factories sized by the data (:func:`factories_taking_proxies`), and stops an in-place update
of the model's own state reached without a proxy before it runs. :func:`replaced` swaps module
attributes for the block (the torch factories here, Python's random draws in
:mod:`graphs.python_draws`).

The other guards around a trace have their own modules: :mod:`graphs.python_draws` (draws from
Python's or numpy's random numbers), :mod:`graphs.state_snapshot` (state updates a tracer did
not record, found after the trace), :mod:`graphs.carried_state` (state carried to the next call
in a Python attribute), :mod:`graphs.update_lines` (the model line that made an update),
:mod:`graphs.untraced_modes` (grad mode and autocast) and :mod:`graphs.root_hooks` (hooks on
the model's own module).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from graphs.errors import CaptureError
from graphs.ops import (
    FACTORY_OPS,
    RANDOM_FACTORY_OPS,
    draws_random_numbers,
    method_updates_in_place,
)
from graphs.state_snapshot import TraceTimeUpdate, unrecorded_update
from graphs.user_frames import describe_frame, is_user_file


class RandomDrawNotTraced(CaptureError):
    """forward() draws random numbers with its own ``torch.Generator``, which an fx graph cannot
    hold (torch.export can try)."""


class GuardedTrace(torch.overrides.TorchFunctionMode):
    """While fx traces: record a tensor that forward() makes from constants alone as a node, and
    stop an in-place update of the model's own state before it runs.

    fx records only calls that touch a Proxy, so ``torch.randn(8, 16)`` or ``torch.zeros(3, 8)``
    ran once at trace time and the tensor became a constant (``_tensor_constantN``), with two
    silent consequences (found by trying): noise of a fixed shape was the same at every step
    (first loss 0.2833 against the original's 0.2838), and an update of the tensor that reads
    the data (``out.index_add_(0, idx, h)``, ``out[:, :4] = h``) was recorded on the constant
    while the Python variable kept the unchanged real tensor, so what forward() computed from it
    afterwards (``total += out``) ran at trace time and was baked in too: the model returned
    ones, whatever its input. As a node the tensor is made anew at every call, and everything
    computed from it is traced (a draw keeps its generator: ``envs.runtime.apply`` keeps it on
    the original's device). A random draw from constants alone (``torch.bernoulli(self.keep)`` of
    a plain tensor attribute, ``torch.tensor([...]).normal_()``, a mixup weight
    ``Beta(0.4, 0.4).sample()``) was baked the same way, the same numbers at every step (found by
    trying: outputs 0.68 off), so it is a node too (:func:`graphs.ops.draws_random_numbers`).
    ``torch.tensor(data)`` stays a constant: an update of it that reads
    the data is refused (:class:`ConstantUpdatedByData`), so torch.export, which records it,
    captures the model. Calls that touch a Proxy go on to fx.

    fx traces forward()'s Python on Proxies, but a tensor it reaches without one (parameters
    through ``self.target.parameters()``, a buffer through a list) is the real one: an update of
    it (a mean teacher's ``p.mul_(0.99).add_(q, alpha=0.01)`` under ``no_grad``) ran on the
    user's model at every trace, and capture traces more than once (the line is looked for,
    eval mode is traced too). :func:`checked_trace` refuses such an update after the trace and
    puts buffers back, but not parameters (a copy of each would double a large model's
    memory): the user's teacher was left one or more updates ahead (found by trying). So the
    update is refused here, before it runs, naming the tensor and the model's line.
    """

    def __init__(self, tracer: fx.Tracer, root: Any) -> None:
        super().__init__()
        self.tracer = tracer
        self.state: dict[int, str] = {}  # storage address -> the parameter or buffer it holds
        if isinstance(root, nn.Module):
            for name, t in [*root.named_parameters(), *root.named_buffers()]:
                if t.device.type != "meta":
                    self.state.setdefault(t.untyped_storage().data_ptr(), name)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self._refuse_unrecorded_update(func, args, kwargs)
        if _reads_data(args, kwargs) or not (_is_factory_call(func) or _is_random_call(func)):
            return func(*args, **kwargs)
        return _factory_node(self.tracer, func, args, kwargs)

    def _refuse_unrecorded_update(self, func: Any, args: tuple, kwargs: dict) -> None:
        written = [args[0]] if method_updates_in_place(str(getattr(func, "__name__", ""))) and args else []
        if isinstance(kwargs.get("out"), torch.Tensor):
            written.append(kwargs["out"])
        for t in written:
            if not isinstance(t, torch.Tensor) or isinstance(t, fx.Proxy) or t.device.type == "meta":
                continue
            held = self.state.get(t.untyped_storage().data_ptr())
            if held is None and not _reads_data(args, kwargs):
                continue  # a constant updated by constants: computed once, as forward() would each call
            frame = next((f for f in reversed(traceback.extract_stack()) if is_user_file(f.filename)), None)
            if held is not None:
                raise TraceTimeUpdate(unrecorded_update(f"tensor {held!r}", frame and describe_frame(frame),
                                                         "torch.fx", stopped=True))
            where = f" at {describe_frame(frame)}" if frame is not None else ""
            raise ConstantUpdatedByData(
                f"forward() updates a tensor made from constants alone with values of the data{where}: fx "
                "records the update on a constant and goes on with the tensor as it was")


def _reads_data(args: tuple, kwargs: dict) -> bool:
    """Whether a call's arguments hold a Proxy (a value computed from the model's inputs)."""
    return any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0])


def _is_factory_call(func: Any) -> bool:
    """Whether ``func`` is one of torch's factories a trace records as a node (:data:`_MADE_AS_NODES`)."""
    return getattr(func, "__name__", "") in _MADE_AS_NODES and getattr(func, "__module__", "") == "torch"


def _is_random_call(func: Any) -> bool:
    """Whether ``func`` is torch's own function or Tensor method that draws random numbers
    (:func:`graphs.ops.draws_random_numbers`: ``torch.bernoulli``, ``Tensor.normal_``,
    ``torch.multinomial``, ``F.dropout``), not a user function of the same name."""
    name = getattr(func, "__name__", "")
    owned = getattr(torch.Tensor, name, None) is func or str(getattr(func, "__module__", "")).startswith("torch")
    return owned and draws_random_numbers(name)


def _factory_node(tracer: fx.Tracer, factory: Callable[..., Any], args: tuple, kwargs: dict) -> fx.Proxy:
    """The call of a torch factory or random draw recorded as a node, a Tensor method as a method
    call (a draw with a generator of its own refused: an fx graph cannot hold the generator)."""
    if kwargs.get("generator") is not None:
        raise RandomDrawNotTraced(f"forward() calls torch.{factory.__name__} with a generator of its own, which an "
                                  "fx graph cannot hold")
    if getattr(torch.Tensor, factory.__name__, None) is factory:
        return tracer.create_proxy("call_method", factory.__name__, args, kwargs)
    return tracer.create_proxy("call_function", factory, args, kwargs)


@contextlib.contextmanager
def replaced(replacements: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """``(module, name, value)``: each module attribute set to its value for the block, then
    put back (the torch factories and the random draws a trace must not run as they are)."""
    originals = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    for module, name, value in replacements:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


@contextlib.contextmanager
def factories_taking_proxies(tracer: fx.Tracer) -> Iterator[None]:
    """While fx traces, let ``torch.zeros(x.size(0), 16)`` (a size that reads the data) be a node.

    torch's argument parser refuses a Proxy inside a size before any ``__torch_function__`` or
    mode can see the call ("zeros() takes 1 positional argument but 2 were given"), so such a
    forward failed under fx and went to torch.export, whose graph bakes the example's size in:
    an RNN's initial state ``torch.zeros(x.size(0), hidden)`` then refused every other batch
    size, and ``x * torch.ones(x.shape[0], 1)`` broadcast a batch of 1 to the example's 8 rows
    (found by trying). The factories of :data:`_MADE_AS_NODES` on the ``torch`` module are
    wrapped for the trace: a call with a Proxy among its arguments is recorded as the factory's
    node, any other goes to the factory itself (and so to :class:`GuardedTrace`).
    """
    originals = {name: getattr(torch, name) for name in sorted(_MADE_AS_NODES) if callable(getattr(torch, name, None))}

    def taking_proxies(factory: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(factory)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _factory_node(tracer, factory, args, kwargs) if _reads_data(args, kwargs) else factory(*args, **kwargs)

        return call

    with replaced([(torch, name, taking_proxies(factory)) for name, factory in originals.items()]):
        yield


class ConstantUpdatedByData(CaptureError):
    """forward() updates a tensor fx holds as a constant (``torch.tensor([...])``, a plain tensor
    attribute) with values of the data: fx records the update on the constant, but what forward()
    then computes from the tensor in Python runs at trace time, on the old values, and is baked
    in. torch.export records it."""


#: torch factories a trace records as nodes when no argument reads the data (:class:`GuardedTrace`):
#: all but those of ``data`` (``torch.tensor([...])``), which stay constants.
_MADE_AS_NODES = (FACTORY_OPS | RANDOM_FACTORY_OPS) - {"tensor", "as_tensor", "scalar_tensor"}
