"""Rule P2b: a pipeline stage's backwards after its first add into ``.grad`` (envs.sim.grad_accumulation)."""

from __future__ import annotations

import numpy as np
import pytest

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.calibration import scaled_problem
from envs.sim.hybrid import simulate_hybrid
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem_compile import compile_problem
from envs.sim.rank_costs import ZERO_COSTS
from envs.sim.stage_costs import fast_stage_costs, stage_costs
from tests.helpers.pipelines import chain, cpu_cluster, two_stages


def measured_chain(accumulate_s: float = 2e-3):
    g = chain(4, params=1000)
    g.graph["batch_scaling"] = {"accumulate_s": {"cpu": accumulate_s}}
    return g


def test_only_the_backwards_after_a_stages_first_pay_the_measured_accumulation():
    problem = compile_problem(measured_chain(2e-3), cpu_cluster(2))
    result = simulate_pipeline(problem, two_stages(4), ZERO_COSTS, trace=True)
    backwards = {}
    for stage, kind, mb, start, end in result.events:
        if kind == "B":
            backwards.setdefault(stage, []).append((mb, end - start))
    # Four ops own equal parameters: each stage's two carry half of the measured 2 ms.
    for stage, runs in backwards.items():
        first = runs[0][1]
        assert runs[0][0] == 0
        assert [d - first for _, d in runs[1:]] == pytest.approx([1e-3] * 3, abs=1e-12)


def test_one_microbatch_pays_no_accumulation():
    with_adds = compile_problem(measured_chain(2e-3), cpu_cluster(2))
    without = compile_problem(measured_chain(0.0), cpu_cluster(2))
    one = two_stages(1, "gpipe")
    assert simulate_pipeline(with_adds, one, ZERO_COSTS).step_time == simulate_pipeline(without, one, ZERO_COSTS).step_time
    assert simulate_pipeline(with_adds, two_stages(4), ZERO_COSTS).step_time > \
        simulate_pipeline(without, two_stages(4), ZERO_COSTS).step_time + 2.9e-3


def test_ops_without_parameters_or_gradients_pay_nothing():
    g = measured_chain(2e-3)
    for name in ("l1", "l3"):
        g.nodes[name]["param_bytes"] = 0
    problem = compile_problem(g, cpu_cluster(2))
    acc = problem.ops.accumulate[:, 0, 0]
    names = problem.ops.names
    assert acc[names.index("l0")] == pytest.approx(1e-3) and acc[names.index("l2")] == pytest.approx(1e-3)
    assert acc[names.index("l1")] == 0 and acc[names.index("l3")] == 0 and acc[names.index("x")] == 0


def test_the_search_tables_give_the_same_accumulating_backward_as_stage_costs():
    for g in (measured_chain(2e-3), chain(4, params=10_000_000)):  # measured, and the roofline
        problem = compile_problem(g, cpu_cluster(2))
        pipe = two_stages(4)
        slow = stage_costs(problem, pipe)
        bounds = [0, 3, problem.num_nodes]
        fast = fast_stage_costs(problem, bounds, [0, 1], 4)
        assert fast.bwd_acc == pytest.approx(slow.bwd_acc, rel=1e-12)
        assert np.all(slow.bwd_acc > slow.bwd)


def test_on_a_gpu_the_adds_are_launches_on_the_host_and_bandwidth_on_the_stream():
    gpus = make_cluster([Device(f"gpu{i}", "V100", 2**34, 1e13, 1e12) for i in range(2)],
                        [Link("gpu0", "gpu1", 1e-5, 1e10)], name="gpus")
    problem = compile_problem(chain(4, params=4e8), gpus)
    acc = problem.ops.accumulate[problem.ops.names.index("l0"), 0]
    # One tensor: one launch (V100 roofline 6 us) on the host; 3 x 400 MB at 1 TB/s on the stream.
    assert acc.tolist() == pytest.approx([6e-6, 1.2e-3])


def test_calibration_scales_the_accumulation_with_the_device_it_runs_on():
    problem = compile_problem(measured_chain(2e-3), cpu_cluster(2))
    scaled = scaled_problem(problem, np.array([2.0, 1.0]))
    assert scaled.ops.accumulate[:, 0, 0] == pytest.approx(2 * problem.ops.accumulate[:, 0, 0])
    assert scaled.ops.accumulate[:, 1, 0] == pytest.approx(problem.ops.accumulate[:, 1, 0])


def test_a_hybrid_with_microbatches_pays_the_accumulation_too():
    with_adds = compile_problem(measured_chain(4e-3), cpu_cluster(4))
    without = compile_problem(measured_chain(0.0), cpu_cluster(4))
    replicas = [Pipeline(two_stages(2).stages, devs, 2, "1f1b") for devs in (("cpu:0", "cpu:1"), ("cpu:2", "cpu:3"))]
    assert simulate_hybrid(with_adds, replicas).step_time > simulate_hybrid(without, replicas).step_time + 1e-3
