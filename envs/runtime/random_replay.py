"""The full batch's random draws replayed in its parts, for the batch-split check: :class:`RandomReplay`.

A batch and its micro-batches draw different random numbers: a stochastic-depth mask
(``torch.rand(batch, 1, 1, 1) < keep``, timm's ``DropPath`` with ``bernoulli_``), noise
injection, a VAE's ``randn_like``. Compared draw for draw they never agree, however sample-wise
the model is, so the check (:mod:`envs.runtime.batch_split`) could only set every pipeline and
DDP of such a model aside. Dropout is switched off instead (:mod:`envs.runtime.no_dropout`);
these draws are ordinary tensors the model computes with, so they are *replayed*: while the full
batch runs, each draw's result is recorded in call order; while a part runs, its ``i``-th draw
returns the ``i``-th recorded one, cut to the part's samples along the one dimension where the
shapes differ (``full = requested x parts``), or whole where the shapes are equal (one draw
shared by every sample). Then the split computes what the full batch computed, number for
number, and whatever still differs is the split's doing.

A draw that cannot be replayed (another shape, ``randperm``, whose values depend on its length,
or more draws than the full batch made) is drawn afresh and counted in :attr:`RandomReplay.missed`;
the comparison then differs, and the check says it cannot compare (the random draws differ).

It is a torch function mode, which sees both the functions an fx graph calls (``torch.rand``,
``Tensor.bernoulli_``) and the ATen operators of a torch.export graph (``aten.rand.default``).
The part being run and its draw count are per thread: the replicas of the check with
synchronised BatchNorms run as threads of one process.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["RandomReplay"]

#: Functions and methods (and ATen operators, by packet name) that draw random numbers.
RANDOM_DRAWS = frozenset({
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "bernoulli", "bernoulli_", "normal",
    "normal_", "uniform_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_", "poisson",
    "multinomial", "randperm",
})
#: Draws whose values depend on how many are drawn: a part's cannot be cut from the whole's.
_LENGTH_DEPENDENT = frozenset({"randperm"})


def draw_name(func: Any) -> str | None:
    """The random draw ``func`` makes (``"rand"``, ``"bernoulli_"``), or None when it draws none.

    >>> draw_name(torch.rand), draw_name(torch.Tensor.bernoulli_), draw_name(torch.ops.aten.randn.default)
    ('rand', 'bernoulli_', 'randn')
    >>> draw_name(torch.add) is None
    True
    """
    if isinstance(func, torch._ops.OpOverload):
        name = func.overloadpacket.__name__
    else:
        name = getattr(func, "__name__", "")
    return name if name in RANDOM_DRAWS else None


class RandomReplay(TorchFunctionMode):
    """Records the full batch's random draws, then replays them cut to each part (module doc).

    Use: enter it, call :meth:`record` and run the full batch; then for each part call
    :meth:`replay` with the part's index and the number of parts, and run it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recorded: list[torch.Tensor] = []
        #: Draws replayed from the full batch's.
        self.replayed = 0
        #: Draws a part made that the full batch's could not give (drawn afresh).
        self.missed = 0
        self._state = threading.local()
        self._lock = threading.Lock()

    def record(self) -> None:
        """Record from now on (the full batch's run), forgetting an earlier run's draws and counts."""
        self.recorded = []
        self.replayed = self.missed = 0
        self._state.part = None

    def replay(self, part: int, parts: int) -> None:
        """Replay from now on, as part ``part`` of ``parts`` (this thread's run of one part)."""
        self._state.part, self._state.parts, self._state.calls = part, parts, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = draw_name(func)
        part = getattr(self._state, "part", None)
        if name is None:
            return func(*args, **kwargs)
        if part is None:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.recorded.append(out.detach().clone())
            return out
        index = self._state.calls
        self._state.calls += 1
        value = self._cut(name, index, part, self._state.parts, args, kwargs)
        with self._lock:
            if value is None:
                self.missed += 1
            else:
                self.replayed += 1
        if value is None:
            return func(*args, **kwargs)
        if name.endswith("_"):  # in place: the draw fills its first argument
            with torch.no_grad():
                args[0].copy_(value)
            return args[0]
        return value.clone()

    def _cut(self, name: str, index: int, part: int, parts: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if name in _LENGTH_DEPENDENT or index >= len(self.recorded):
            return None
        whole = self.recorded[index]
        shape = _requested_shape(name, args, kwargs)
        if shape is None:
            return None
        if tuple(shape) == tuple(whole.shape):
            return whole
        if len(shape) != whole.dim():
            return None
        differ = [d for d, (a, b) in enumerate(zip(whole.shape, shape, strict=True)) if a != b]
        if len(differ) != 1 or whole.shape[differ[0]] != shape[differ[0]] * parts:
            return None
        size = shape[differ[0]]
        return whole.narrow(differ[0], part * size, size)


def _requested_shape(name: str, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The shape this call of draw ``name`` fills or returns, without drawing."""
    if name.endswith("_") or name.endswith("_like") or name in ("bernoulli", "poisson"):
        first = args[0] if args else kwargs.get("input")
        return tuple(first.shape) if isinstance(first, torch.Tensor) else None
    if name == "normal":
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if tensors:
            return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
        size = kwargs.get("size", args[2] if len(args) > 2 else None)
        return tuple(size) if size is not None else None
    if name == "multinomial":
        first, samples = args[0], (args[1] if len(args) > 1 else kwargs.get("num_samples"))
        return (*first.shape[:-1], int(samples)) if isinstance(first, torch.Tensor) and samples is not None else None
    if name == "randint":
        size = kwargs.get("size") or next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None)
        return tuple(size) if size is not None else None
    # rand, randn: (*size) or (size,)
    size = kwargs.get("size")
    if size is None:
        if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
            size = args[0]
        elif all(isinstance(a, int) for a in args):
            size = args
    return tuple(int(s) for s in size) if size is not None else None
