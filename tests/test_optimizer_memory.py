"""The optimizer's memory as the simulators count it, against torch.optim on the CPU allocator.

A model whose parameters dominate its memory: the state the optimizer keeps (Adam's amsgrad
a third moment, a centered RMSprop a gradient average) must be counted as torch.optim keeps
it, or a placement said to fit runs out of memory.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR, optimizer_state_kind

ONE_CPU = {"name": "1xcpu", "devices": [
    {"name": "cpu", "kind": "cpu", "memory": "24GiB", "peak_flops": "100G", "mem_bandwidth": "20GB/s"}]}

#: torch.optim configurations a user writes in get_optimizer, weight decay included.
OPTIMIZERS: dict[str, Callable[[object], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd weight decay": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4),
    "sgd nesterov weight decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p),
    "adam weight decay": lambda p: torch.optim.Adam(p, weight_decay=1e-4),
    "adam amsgrad weight decay": lambda p: torch.optim.Adam(p, amsgrad=True, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, weight_decay=0.1),
    "adamw amsgrad": lambda p: torch.optim.AdamW(p, amsgrad=True, weight_decay=0.1),
    "rmsprop weight decay": lambda p: torch.optim.RMSprop(p, weight_decay=1e-4),
    "rmsprop centered momentum": lambda p: torch.optim.RMSprop(p, centered=True, momentum=0.9, weight_decay=1e-4),
    "adagrad weight decay": lambda p: torch.optim.Adagrad(p, weight_decay=1e-4),
    "nadam weight decay (costed as adam)": lambda p: torch.optim.NAdam(p, weight_decay=1e-4),
    "adadelta weight decay (costed as adam)": lambda p: torch.optim.Adadelta(p, weight_decay=1e-4),
}


def _state_and_step_peak(optimizer_fn: Callable[[object], torch.optim.Optimizer], numel: int,
                         count: int) -> tuple[float, float]:
    """(state bytes, the peak a second step() allocates above parameters, gradients and state)
    for ``count`` parameters of ``numel`` floats each."""
    params = [nn.Parameter(torch.randn(numel)) for _ in range(count)]
    opt = optimizer_fn(params)
    for p in params:
        p.grad = torch.randn(numel)
    opt.step()  # the state is made on the first step
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.numel() > 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    level = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        level += nbytes
        peak = max(peak, level)
    return float(state), float(peak)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_is_what_torch_optim_keeps(name):
    optimizer_fn = OPTIMIZERS[name]
    kind = optimizer_state_kind(optimizer_fn)
    numel = 1 << 16
    param_bytes = 4.0 * numel
    state, _ = _state_and_step_peak(optimizer_fn, numel, 3)
    if "costed as adam" in name:
        assert state <= 3 * param_bytes * OPTIMIZER_STATE_FACTOR[kind]
    else:
        assert state == 3 * param_bytes * OPTIMIZER_STATE_FACTOR[kind]
