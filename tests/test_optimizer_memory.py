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
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem_compile import compile_problem
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


def _gpus(count: int) -> dict:
    device = {"kind": "K40", "memory": "12GiB", "reserved": 0, "peak_flops": "4.29T", "mem_bandwidth": "288GB/s"}
    return {"name": "gpus", "devices": [{"name": f"gpu{i}", **device} for i in range(count)],
            "default_link": {"latency": "10us", "bandwidth": "10GB/s"}}


def test_on_a_gpu_the_foreach_default_makes_temporaries_of_all_the_devices_parameters():
    """torch.optim runs its foreach implementation when every parameter is on a GPU: Adam's
    ``_foreach_sqrt(exp_avg_sqs)`` is a copy of all of the device's parameters at once. The
    same implementation, asked for on the CPU (``foreach=True``), is what is measured."""
    foreach_adam = lambda p: torch.optim.Adam(p, foreach=True)  # noqa: E731 - one line
    torch.manual_seed(0)
    inputs = (torch.randn(4, 512),)
    captured = capture(Wide(), inputs, name="wide")
    measured = measure_step_peak(Wide(), inputs, _loss, foreach_adam)
    cluster = load_cluster(_gpus(2))
    problem = compile_problem(captured.graph, cluster, optimizer="adam")
    on_gpu0 = float(simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0])
    params = float(problem.param_bytes.sum())
    assert on_gpu0 == 4 * params + float(problem.ops.loop_held_bytes().sum()) + params
    # (foreach's per-parameter scalars - step counts, bias corrections - are a few bytes each)
    assert measured <= on_gpu0 + 1024 and on_gpu0 <= 1.1 * measured
    reference = simulate_reference(captured.graph, cluster, {v: "gpu0" for v in captured.graph}, optimizer="adam")
    assert reference.peak_memory.tolist() == [on_gpu0, 0.0]
    # a pipeline of one stage has the op-level peak; each DDP replica holds it and the buckets
    piped = simulate_pipeline(problem, Pipeline(stages=(tuple(problem.node_names),), devices=("gpu0",),
                                                microbatches=1, schedule="gpipe"))
    assert piped.peak_memory["gpu0"] == on_gpu0
    ddp = simulate_data_parallel(problem, ("gpu0", "gpu1"))
    assert ddp.peak_memory["gpu0"] == on_gpu0 + params


def test_memory_aware_heuristics_count_a_gpus_foreach_temporaries():
    from placer.search.baselines.common import device_memory

    torch.manual_seed(0)
    captured = capture(Wide(), (torch.randn(4, 512),), name="wide")
    problem = compile_problem(captured.graph, load_cluster(_gpus(2)), optimizer="adam")
    row = np.arange(problem.num_nodes) % 2
    assert device_memory(problem, row).tolist() == simulate(problem, row).peak_memory.tolist()
