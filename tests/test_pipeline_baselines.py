"""Pipeline partitioners (placer.search.baselines.pipeline_split): even splits and PipeDream's DP."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.pipeline import engine_host_costs, simulate_pipeline
from envs.sim.problem_compile import compile_problem
from envs.sim.stage_costs import segment_step_seconds, stage_costs
from placer.search.baselines.common import NoFit
from placer.search.baselines.pipeline_split import (
    _pipeline,
    best_pipeline,
    even_split_layers,
    even_split_params,
    pipedream_dp,
)

MB = 2**20


def gpus(n: int = 3, memory: float = 2**34):
    devs = [Device(f"gpu{i}", "V100", memory, 1e13, 9e11) for i in range(n)]
    links = [Link(f"gpu{i}", f"gpu{j}", 1e-5, 1e10) for i in range(n) for j in range(i + 1, n)]
    return make_cluster(devs, links, name="gpus")


def chain(costs, params=None, out_bytes=4 * MB) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_node("x", op="placeholder", out_bytes=out_bytes, requires_grad=False)
    prev = "x"
    for i, c in enumerate(costs):
        g.add_node(f"l{i}", op="call_module", fwd_time={"V100": c}, bwd_time={"V100": 2 * c}, opt_time={"V100": 0.0},
                   out_bytes=out_bytes, requires_grad=True, param_bytes=(params[i] if params else MB), flops=1e9)
        g.add_edge(prev, f"l{i}", bytes=out_bytes)
        prev = f"l{i}"
    g.add_node("output", op="output", out_bytes=0, requires_grad=False)
    g.add_edge(prev, "output", bytes=out_bytes)
    return g


def test_even_split_by_layers_gives_each_stage_as_many_parameterised_nodes():
    problem = compile_problem(chain([1e-3] * 9), gpus(3))
    pipe = even_split_layers(problem, 4)
    counts = [sum(1 for n in s if n.startswith("l")) for s in pipe.stages]
    assert counts == [3, 3, 3] and pipe.devices == ("gpu0", "gpu1", "gpu2") and pipe.microbatches == 4


def test_even_split_by_parameters_balances_bytes_not_layers():
    params = [6 * MB, 1 * MB, 1 * MB, 1 * MB, 1 * MB, 1 * MB, 1 * MB, 6 * MB, 0]
    problem = compile_problem(chain([1e-3] * 9, params), gpus(3))
    pipe = even_split_params(problem, 4)
    per_stage = [sum(problem.param_bytes[problem.node_index(n)] for n in s) for s in pipe.stages]
    assert max(per_stage) <= 7 * MB


def _bottleneck(problem, cuts, devs, m):
    """The busiest device or link of the simulated pipeline (GPUs: no per-call constants beside the busy time)."""
    pipe = _pipeline(problem, cuts, devs, m, "1f1b")
    sc = stage_costs(problem, pipe)
    links = [m * max(sc.fwd_bytes[b] / problem.bandwidth[devs[b], devs[b + 1]],
                     sc.bwd_bytes[b] / problem.bandwidth[devs[b + 1], devs[b]]) for b in range(len(devs) - 1)]
    return max([*simulate_pipeline(problem, pipe).busy.values(), *links])


def test_pipedream_dp_finds_the_smallest_bottleneck_of_all_splits():
    rng = np.random.default_rng(0)
    for trial in range(5):
        problem = compile_problem(chain(list(rng.uniform(1e-4, 3e-3, 8))), gpus(3))
        pipe = pipedream_dp(problem, 4)
        names = list(problem.node_names)
        ours = [names.index(s[0]) for s in pipe.stages[1:]]
        best = min(_bottleneck(problem, list(c), [0, 1, 2], 4)
                   for c in itertools.combinations(range(1, problem.num_nodes), 2))
        assert _bottleneck(problem, ours, [0, 1, 2], 4) == pytest.approx(best, rel=1e-9), trial


def cpu_processes(n: int = 2):
    devs = [Device(f"cpu:{i}", "cpu", 2**34, 1e11, 1e10) for i in range(n)]
    links = [Link(f"cpu:{i}", f"cpu:{j}", 5e-5, 1e9) for i in range(n) for j in range(i + 1, n)]
    return make_cluster(devs, links, name="ranks")


def test_segment_step_seconds_are_what_the_simulator_keeps_each_process_busy():
    problem = compile_problem(chain([1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 2e-3], out_bytes=MB), cpu_processes(2))
    host = engine_host_costs(problem, 0)
    for cut in range(1, problem.num_nodes):
        for m in (1, 4):
            res = simulate_pipeline(problem, _pipeline(problem, [cut], [0, 1], m, "gpipe" if m == 1 else "1f1b"))
            ours = [float(segment_step_seconds(problem, np.array([0]), cut, 0, m, host, first=True, last=False)[0]),
                    float(segment_step_seconds(problem, np.array([cut]), problem.num_nodes, 1, m, host,
                                               first=False, last=True)[0])]
            # the simulator's busy time leaves out the receives, sends and the per-step constant
            calls = m * (host.recv_s + host.send_s) + host.step_s
            assert ours == pytest.approx([res.busy["cpu:0"] + calls, res.busy["cpu:1"] + calls], rel=1e-9)


def test_pipedream_dp_counts_the_optimizer_update_and_the_per_microbatch_costs():
    # Equal forward and backward per layer, but the last three layers' updates cost 5x their
    # compute: a split that balances compute alone leaves the second process the slower.
    g = chain([1e-3] * 12)
    for i in range(9, 12):
        g.nodes[f"l{i}"]["opt_time"] = {"cpu": 15e-3}
    for i in range(12):
        for key in ("fwd_time", "bwd_time"):
            g.nodes[f"l{i}"][key] = {"cpu": g.nodes[f"l{i}"][key]["V100"]}
    problem = compile_problem(g, cpu_processes(2))
    names = list(problem.node_names)
    steps = {cut: simulate_pipeline(problem, _pipeline(problem, [cut], [0, 1], 4, "1f1b")).step_time
             for cut in range(1, problem.num_nodes)}
    pipe = pipedream_dp(problem, 4)
    ours = steps[names.index(pipe.stages[1][0])]
    assert ours <= min(steps.values()) * 1.01
    compute_only = 7  # half of the forward and backward seconds on each side
    assert ours < 0.9 * steps[compute_only]


def test_pipedream_dp_respects_memory_per_microbatch_count_and_says_when_nothing_fits():
    problem = compile_problem(chain([1e-3] * 6, [100 * MB] * 6), gpus(3, memory=2**30))
    assert simulate_pipeline(problem, pipedream_dp(problem, 4)).fits
    tight = compile_problem(chain([1e-3] * 6, [100 * MB] * 6), gpus(3, memory=300 * MB))
    with pytest.raises(NoFit, match="no 3-stage split fits"):
        pipedream_dp(tight, 4)


def test_best_pipeline_beats_the_unpipelined_split_with_microbatches():
    problem = compile_problem(chain([2e-3] * 12, out_bytes=MB), gpus(3))
    found = best_pipeline(problem, batch_size=32)
    dp = found["pipedream_dp"]
    assert dp.pipeline is not None and dp.pipeline.microbatches > 1
    one = simulate_pipeline(problem, pipedream_dp(problem, 1, "gpipe")).step_time
    assert dp.step_time < 0.6 * one
    assert all(32 % c.pipeline.microbatches == 0 for c in found.values() if c.pipeline is not None)
