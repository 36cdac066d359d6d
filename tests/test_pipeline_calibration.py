"""The pipeline engine's calibration (envs.sim.pipeline P2, P4; envs.sim.data_parallel D1, D3c): op costs
fitted from profiles at two batch sizes, and the engine's host constants as the default."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from envs.sim.data_parallel import CPU_RING_EFFICIENCY, ring_allreduce_time, simulate_data_parallel, simulate_hybrid
from envs.sim.pipeline import (
    CPU_DISPATCH_S,
    ENGINE_COSTS,
    BatchScaling,
    Pipeline,
    PipelineError,
    fast_stage_costs,
    fit_batch_scaling,
    fixed_host,
    simulate_pipeline,
    stage_costs,
)
from envs.sim.problem import compile_problem
from tests.helpers.pipelines import BW, LAT, ZERO, chain, cpu_cluster, two_stages

# Four layers profiled at the full batch and at a quarter of it: l0 is all per-call work
# (costs the same at both sizes), l3 all per-sample work, l1 and l2 in between.
FULL_F = [1e-3, 2e-3, 3e-3, 4e-3]
SMALL_F = [1e-3, 0.8e-3, 1.5e-3, 1e-3]


def profiled(fwd: list[float]) -> nx.DiGraph:
    g = chain(4)
    for i, t in enumerate(fwd):
        g.nodes[f"l{i}"]["fwd_time"] = {"cpu": t}
        g.nodes[f"l{i}"]["bwd_time"] = {"cpu": 2 * t}
    return g


def problems():
    return compile_problem(profiled(FULL_F), cpu_cluster(2)), compile_problem(profiled(SMALL_F), cpu_cluster(2))


def test_the_fit_gives_each_op_its_fixed_part_from_two_batch_sizes():
    full, small = problems()
    scaling = fit_batch_scaling(full, small, 4)
    fixed = scaling.fixed[:, 0, 0][[full.ops.names.index(f"l{i}") for i in range(4)]]
    # fixed = (4 * small - full) / 3: l0 all fixed, l3 none, l1 (3.2 - 2) / 3, l2 (6 - 3) / 3.
    assert fixed == pytest.approx([1e-3, 0.4e-3, 1e-3, 0.0], abs=1e-12)


def test_micro_batches_of_the_small_size_cost_what_the_small_profile_measured():
    full, small = problems()
    scaling = fit_batch_scaling(full, small, 4)
    at_small = stage_costs(small, two_stages(1, "gpipe"), ZERO)
    fitted = stage_costs(full, two_stages(4), ZERO, scaling=scaling)
    assert fitted.fwd == pytest.approx(at_small.fwd, rel=1e-12)
    assert fitted.bwd == pytest.approx(at_small.bwd, rel=1e-12)
    # Without the fit a micro-batch pays only the dispatch: the per-call l0 looks 4x cheaper.
    plain = stage_costs(full, two_stages(4), ZERO)
    assert plain.fwd[0] < 0.6 * fitted.fwd[0]


def test_one_microbatch_is_the_full_profile_with_or_without_a_fit():
    full, small = problems()
    scaling = fit_batch_scaling(full, small, 4)
    pipe = Pipeline((tuple(full.node_names),), ("cpu:0",), 1, "gpipe")
    with_fit = simulate_pipeline(full, pipe, ZERO, scaling=scaling).step_time
    assert with_fit == pytest.approx(simulate_pipeline(full, pipe, ZERO).step_time, rel=1e-12)


def test_the_fixed_part_stays_between_zero_and_the_full_cost():
    # Noise: an op dearer at the small size than at the full one, another cheaper per sample.
    full = compile_problem(profiled([1e-3, 4e-3, 3e-3, 4e-3]), cpu_cluster(2))
    small = compile_problem(profiled([2e-3, 0.5e-3, 1.5e-3, 1e-3]), cpu_cluster(2))
    fixed = fit_batch_scaling(full, small, 4).fixed
    assert np.all(fixed >= 0) and np.all(fixed <= full.ops.cost[:, :, (0, 2)])
    i0, i1 = full.ops.names.index("l0"), full.ops.names.index("l1")
    assert fixed[i0, 0, 0] == pytest.approx(1e-3) and fixed[i1, 0, 0] == 0.0


def test_the_search_tables_and_the_stage_walk_agree_under_a_fit():
    full, small = problems()
    scaling = fit_batch_scaling(full, small, 4)
    walk = stage_costs(full, two_stages(8), ZERO, scaling=scaling)
    cut = list(full.node_names).index("l2")
    fast = fast_stage_costs(full, [0, cut, full.num_nodes], [0, 1], 8, ZERO, scaling=scaling)
    assert fast.fwd == pytest.approx(walk.fwd, rel=1e-12) and fast.bwd == pytest.approx(walk.bwd, rel=1e-12)
    plain = fast_stage_costs(full, [0, cut, full.num_nodes], [0, 1], 8, ZERO)
    assert not np.allclose(plain.fwd, fast.fwd)  # the tables are kept per scaling


def test_ddp_over_two_reads_the_half_batch_profile_through_the_fit():
    full = compile_problem(profiled(FULL_F), cpu_cluster(2))
    half = compile_problem(profiled([1e-3, 1.2e-3, 2e-3, 2e-3]), cpu_cluster(2))  # no fixed part clipped
    two = simulate_data_parallel(full, 2, ZERO, scaling=fit_batch_scaling(full, half, 2))
    one = simulate_data_parallel(half, 1, ZERO)
    assert two.compute_time == pytest.approx(one.compute_time, rel=1e-12)


def test_profiles_of_different_models_or_a_ratio_not_above_one_are_refused():
    full, small = problems()
    other = compile_problem(chain(3), cpu_cluster(2))
    with pytest.raises(PipelineError, match="different ops"):
        fit_batch_scaling(full, other, 4)
    with pytest.raises(PipelineError, match="smaller"):
        fit_batch_scaling(full, small, 1)
    with pytest.raises(PipelineError, match="ops x"):
        fixed_host(other, fit_batch_scaling(full, small, 4))


def test_without_a_fit_an_op_keeps_the_dispatch_as_its_fixed_part():
    full, _ = problems()
    assert np.all(fixed_host(full) == np.minimum(full.ops.cost[:, :, (0, 2)], CPU_DISPATCH_S))
    assert isinstance(fit_batch_scaling(*problems(), 4), BatchScaling)


def test_the_engine_constants_are_the_default_and_scale_ops_by_one():
    full, _ = problems()
    assert ENGINE_COSTS.op_scale == 1.0
    pipe = two_stages(4)
    assert simulate_pipeline(full, pipe).step_time == simulate_pipeline(full, pipe, ENGINE_COSTS).step_time
    assert simulate_data_parallel(full, 2).step_time == simulate_data_parallel(full, 2, ENGINE_COSTS).step_time


def test_a_hybrid_on_cpu_ranks_all_reduces_each_stage_after_its_last_backward():
    problem = compile_problem(chain(4, params=4 * 2**20), cpu_cluster(4))
    stages = (("x", "l0", "l1"), ("l2", "l3", "output"))
    pipes = [Pipeline(stages, ("cpu:0", "cpu:1"), 2, "1f1b"), Pipeline(stages, ("cpu:2", "cpu:3"), 2, "1f1b")]
    hyb = simulate_hybrid(problem, pipes, ZERO)
    # Stage 0 sends nothing after its last backward, so it waits for its whole ring (D3c):
    # l1 (>= 1 MiB, the first bucket), then l0.
    ring = 2 * ring_allreduce_time(4 * 2**20, 2, BW * CPU_RING_EFFICIENCY, LAT)
    assert hyb.exposed_allreduce[0] == pytest.approx(ring, rel=1e-9)
