"""The optimizer's memory as the simulators count it, against torch.optim on the CPU allocator.

A model whose parameters dominate its memory peaks in the optimizer step, not in the
backward: the state the optimizer keeps (Adam's amsgrad a third moment, a centered RMSprop
a gradient average) and the temporaries its per-parameter update allocates must both be
counted, or a placement said to fit runs out of memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from envs.hardware.loading import load_cluster
from envs.sim.data_parallel import simulate_data_parallel
from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR, OPTIMIZER_STEP_WORK, optimizer_state_kind
from envs.sim.pipeline import Pipeline, simulate_pipeline
from envs.sim.problem import compile_problem
from envs.sim.reference_simulator import simulate_reference
from envs.sim.simulator import simulate
from graphs.capture import capture
from graphs.saved_activations import measure_step_peak

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
def test_state_and_step_temporaries_are_what_torch_optim_allocates(name):
    optimizer_fn = OPTIMIZERS[name]
    kind = optimizer_state_kind(optimizer_fn)
    numel = 1 << 16
    param_bytes = 4.0 * numel
    # Three parameters of equal size: the order where one update's last temporary, still
    # referenced, meets the next one's (the worst case of the per-parameter loop).
    state, step_peak = _state_and_step_peak(optimizer_fn, numel, 3)
    if "costed as adam" in name:
        assert state <= 3 * param_bytes * OPTIMIZER_STATE_FACTOR[kind]
    else:
        assert state == 3 * param_bytes * OPTIMIZER_STATE_FACTOR[kind]
    # (a few bytes more: the step's scalar tensors, bias corrections and the like)
    assert step_peak <= OPTIMIZER_STEP_WORK[kind] * param_bytes + 256


class Wide(nn.Module):
    """Parameters far larger than the activations (batch 4): the step, not the backward, peaks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


@pytest.mark.parametrize("name", ["adam", "adam amsgrad weight decay", "rmsprop centered momentum",
                                  "sgd weight decay"])
def test_simulated_peak_of_a_parameter_heavy_model_covers_its_optimizer_step(name):
    optimizer_fn = OPTIMIZERS[name]
    torch.manual_seed(0)
    model, inputs = Wide(), (torch.randn(4, 512),)
    captured = capture(model, inputs, name="wide")
    measured = measure_step_peak(Wide(), inputs, _loss, optimizer_fn)
    cluster = load_cluster(ONE_CPU)
    kind = optimizer_state_kind(optimizer_fn)
    problem = compile_problem(captured.graph, cluster, optimizer=kind)
    simulated = float(simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0])
    reference = simulate_reference(captured.graph, cluster, {v: "cpu" for v in captured.graph}, optimizer=kind)
    assert reference.peak_memory.tolist() == [simulated]
    assert measured <= simulated <= 1.25 * measured


def test_pipelines_and_ddp_count_the_optimizer_step_as_one_device_does():
    torch.manual_seed(0)
    captured = capture(Wide(), (torch.randn(4, 512),), name="wide")
    cluster = load_cluster({"name": "2xcpu", "devices": [
        {"name": f"cpu{i}", "kind": "cpu", "memory": "24GiB", "peak_flops": "100G", "mem_bandwidth": "20GB/s"}
        for i in range(2)], "default_link": {"latency": "10us", "bandwidth": "10GB/s"}})
    problem = compile_problem(captured.graph, cluster, optimizer="adam")
    one = float(simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0])
    static = float(problem.static_memory().sum())
    held = float(problem.ops.loop_held_bytes().sum())  # the batch and the output
    assert held == 2 * 4 * 512 * 4
    assert one == static + held + 4 * 512 * 513 * 4  # and Adam's temporaries of one Linear's parameters
    piped = simulate_pipeline(problem, Pipeline(stages=(tuple(problem.node_names),), devices=("cpu0",),
                                                microbatches=1, schedule="gpipe"))
    assert piped.peak_memory["cpu0"] == one
    ddp = simulate_data_parallel(problem, ("cpu0", "cpu1"))
    # each replica also holds the reducer's buckets, a copy of the gradients
    assert ddp.peak_memory["cpu0"] >= one + float(problem.param_bytes.sum())
