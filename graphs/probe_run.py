"""One forward of a captured graph that leaves no trace: on fake tensors, or on real ones with the
buffers and the random state put back.

The capture's probes (what autograd saves, :mod:`graphs.saved_activations`; whether the loss
differentiates through the model, :mod:`graphs.loss_reach`; which sizes depend on the data,
:mod:`graphs.shape_dependence`) each run the graph once. Fake tensors (``FakeTensorMode``) cost no
memory and no compute, so paper sizes capture in seconds; an op without a fake kernel needs real
tensors, and then the run must not move the model: the captured module shares its buffers with
the user's model (batch-norm statistics, counters) and a dropout draw would shift every later one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from graphs.buffers import preserved_buffers

__all__ = ["probe_module"]


@contextlib.contextmanager
def probe_module(gm: fx.GraphModule, inputs: tuple, *, fake: bool,
                 shape_env: Any = None) -> Iterator[tuple[fx.GraphModule, tuple]]:
    """``(module, inputs)`` to run once inside the block: a fake copy of ``gm`` and fake inputs
    under a ``FakeTensorMode`` (with ``shape_env``, a ``ShapeEnv``, where given), or ``gm`` itself
    and the real inputs, its buffers and the random state put back when the block ends."""
    with contextlib.ExitStack() as stack:
        if fake:
            from torch._dynamo.utils import deepcopy_to_fake_tensor
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
            module: fx.GraphModule = deepcopy_to_fake_tensor(gm, mode)
            run_inputs = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
            stack.enter_context(mode)
        else:
            module, run_inputs = gm, inputs
            stack.enter_context(preserved_buffers(gm))
            stack.enter_context(torch.random.fork_rng())
        yield module, run_inputs
