"""The pipeline engine's calibration (envs.sim.pipeline P2, P4; envs.sim.data_parallel D1, D3c): each op's
fixed part fitted from profiles at two batch sizes (graphs.profile.batch_scaling) and carried by the
compiled problem, and the engine's host constants as the default."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from envs.sim.cost_model import CPU_DISPATCH_S, CostModel
from envs.sim.data_parallel import (
    CPU_ALLREDUCE_BYTES_PER_S,
    CPU_ALLREDUCE_STEP_S,
    CPU_DDP_STEP_S,
    CPU_REDUCER_SECONDS_PER_BYTE,
    ring_allreduce_time,
    simulate_data_parallel,
)
from envs.sim.hybrid import simulate_hybrid
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem_compile import compile_problem
from envs.sim.rank_costs import ZERO_COSTS
from envs.sim.stage_costs import ENGINE_COSTS, fast_stage_costs, stage_costs
from graphs.profile.batch_scaling import fixed_parts
from tests.helpers.pipelines import BW, LAT, chain, cpu_cluster, two_stages

# Four layers profiled at the full batch and at a quarter of it: l0 is all per-call work
# (costs the same at both sizes), l3 all per-sample work, l1 and l2 in between.
FULL_F = [1e-3, 2e-3, 3e-3, 4e-3]
SMALL_F = [1e-3, 0.8e-3, 1.5e-3, 1e-3]


def profiled(fwd: list[float], small: list[float] | None = None, ratio: float = 4) -> nx.DiGraph:
    """The chain profiled at ``fwd`` (backward twice it); with ``small`` (the same at 1/``ratio``
    of the batch) also its fixed parts, as graphs.profile.batch_scaling stores them."""
    g = chain(4)
    fixed = fixed_parts(np.array(fwd), np.array(small), ratio) if small is not None else None
    for i, t in enumerate(fwd):
        g.nodes[f"l{i}"]["fwd_time"] = {"cpu": t}
        g.nodes[f"l{i}"]["bwd_time"] = {"cpu": 2 * t}
        if fixed is not None:
            g.nodes[f"l{i}"]["fwd_fixed"] = {"cpu": float(fixed[i])}
            g.nodes[f"l{i}"]["bwd_fixed"] = {"cpu": 2 * float(fixed[i])}
    return g


def problems():
    """(the chain with measured fixed parts, the chain profiled at the quarter batch, the chain
    without a micro-batch profile)."""
    return (compile_problem(profiled(FULL_F, SMALL_F), cpu_cluster(2)),
            compile_problem(profiled(SMALL_F), cpu_cluster(2)), compile_problem(profiled(FULL_F), cpu_cluster(2)))


def test_the_fit_gives_each_op_its_fixed_part_from_two_batch_sizes():
    # fixed = (4 * small - full) / 3: l0 all fixed, l3 none, l1 (3.2 - 2) / 3, l2 (6 - 3) / 3.
    assert fixed_parts(np.array(FULL_F), np.array(SMALL_F), 4) == pytest.approx([1e-3, 0.4e-3, 1e-3, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="smaller"):
        fixed_parts(np.array(FULL_F), np.array(SMALL_F), 1)


def test_the_problem_carries_the_measured_fixed_parts_and_the_dispatch_elsewhere():
    fitted, _, plain = problems()
    i = [fitted.ops.names.index(f"l{k}") for k in range(4)]
    assert fitted.ops.fixed_parts()[i, 0, 0] == pytest.approx([1e-3, 0.4e-3, 1e-3, 0.0], abs=1e-12)
    assert fitted.ops.fixed_parts()[i, 1, 1] == pytest.approx([2e-3, 0.8e-3, 2e-3, 0.0], abs=1e-12)
    assert np.all(plain.ops.fixed_parts() == np.minimum(plain.ops.cost[:, :, (0, 2)], CPU_DISPATCH_S))


def test_a_measured_fixed_part_never_exceeds_the_op_nor_goes_below_zero():
    g = profiled(FULL_F)
    g.nodes["l0"]["fwd_fixed"] = {"cpu": 5e-3}  # above its 1 ms: a graph edited by hand, a stale profile
    g.nodes["l1"]["fwd_fixed"] = {"cpu": -1.0}
    fixed = compile_problem(g, cpu_cluster(2)).ops.fixed_parts()
    names = list(g.nodes)
    assert fixed[names.index("l0"), 0, 0] == pytest.approx(1e-3) and fixed[names.index("l1"), 0, 0] == 0.0
    # A part measured on another kind is not this CPU's: the dispatch stands.
    other = CostModel().op_fixed({"fwd_fixed": {"cuda": 1e-3}}, cpu_cluster(1).devices[0], (2e-3, 0, 4e-3, 0, 0, 0))
    assert other == (CPU_DISPATCH_S, CPU_DISPATCH_S)


def test_micro_batches_of_the_small_size_cost_what_the_small_profile_measured():
    fitted, small, plain = problems()
    at_small = stage_costs(small, two_stages(1, "gpipe"), ZERO_COSTS)
    on_micro = stage_costs(fitted, two_stages(4), ZERO_COSTS)
    assert on_micro.fwd == pytest.approx(at_small.fwd, rel=1e-12)
    assert on_micro.bwd == pytest.approx(at_small.bwd, rel=1e-12)
    # Without the micro-batch profile a micro-batch pays only the dispatch: the per-call l0
    # looks 4x cheaper, and the pipeline's step is shorter than it runs.
    default = stage_costs(plain, two_stages(4), ZERO_COSTS)
    assert default.fwd[0] < 0.6 * on_micro.fwd[0]
    assert simulate_pipeline(plain, two_stages(4), ZERO_COSTS).step_time < \
        0.8 * simulate_pipeline(fitted, two_stages(4), ZERO_COSTS).step_time


def test_one_microbatch_is_the_full_profile_with_or_without_fixed_parts():
    fitted, _, plain = problems()
    pipe = Pipeline((tuple(fitted.node_names),), ("cpu:0",), 1, "gpipe")
    assert simulate_pipeline(fitted, pipe, ZERO_COSTS).step_time == \
        pytest.approx(simulate_pipeline(plain, pipe, ZERO_COSTS).step_time, rel=1e-12)


def test_the_fixed_part_stays_between_zero_and_the_full_cost():
    # Noise: an op dearer at the small size than at the full one, another cheaper per sample.
    full, small = np.array([1e-3, 4e-3, 3e-3, 4e-3]), np.array([2e-3, 0.5e-3, 1.5e-3, 1e-3])
    fixed = fixed_parts(full, small, 4)
    assert np.all(fixed >= 0) and np.all(fixed <= full)
    assert fixed[0] == pytest.approx(1e-3) and fixed[1] == 0.0


def test_the_search_tables_and_the_stage_walk_agree_with_measured_fixed_parts():
    fitted, _, plain = problems()
    walk = stage_costs(fitted, two_stages(8), ZERO_COSTS)
    cut = list(fitted.node_names).index("l2")
    fast = fast_stage_costs(fitted, [0, cut, fitted.num_nodes], [0, 1], 8, ZERO_COSTS)
    assert fast.fwd == pytest.approx(walk.fwd, rel=1e-12) and fast.bwd == pytest.approx(walk.bwd, rel=1e-12)
    default = fast_stage_costs(plain, [0, cut, plain.num_nodes], [0, 1], 8, ZERO_COSTS)
    assert not np.allclose(default.fwd, fast.fwd)  # the tables read each problem's own fixed parts


def test_ddp_over_two_reads_the_half_batch_profile_through_the_fixed_parts():
    half_f = [1e-3, 1.2e-3, 2e-3, 2e-3]  # no fixed part clipped
    full = compile_problem(profiled(FULL_F, half_f, 2), cpu_cluster(2))
    half = compile_problem(profiled(half_f), cpu_cluster(2))
    two = simulate_data_parallel(full, 2, ZERO_COSTS)
    one = simulate_data_parallel(half, 1, ZERO_COSTS)
    assert two.compute_time == pytest.approx(one.compute_time, rel=1e-12)
    # Without the half-batch profile DDP's replicas would be near half the full cost.
    plain = simulate_data_parallel(compile_problem(profiled(FULL_F), cpu_cluster(2)), 2, ZERO_COSTS)
    assert plain.compute_time < 0.85 * two.compute_time


def test_the_engine_constants_are_the_default_and_scale_ops_by_one():
    full, _, _ = problems()
    assert ENGINE_COSTS.op_scale == 1.0
    pipe = two_stages(4)
    assert simulate_pipeline(full, pipe).step_time == simulate_pipeline(full, pipe, ENGINE_COSTS).step_time
    assert simulate_data_parallel(full, 2).step_time == simulate_data_parallel(full, 2, ENGINE_COSTS).step_time


def test_a_hybrid_on_cpu_ranks_all_reduces_each_stage_after_its_last_backward():
    problem = compile_problem(chain(4, params=4 * 2**20), cpu_cluster(4))
    stages = (("x", "l0", "l1"), ("l2", "l3", "output"))
    pipes = [Pipeline(stages, ("cpu:0", "cpu:1"), 2, "1f1b"), Pipeline(stages, ("cpu:2", "cpu:3"), 2, "1f1b")]
    hyb = simulate_hybrid(problem, pipes, ZERO_COSTS)
    # Stage 0 sends nothing after its last backward, so it waits for its whole ring (D3c):
    # l1 (>= 1 MiB, the first bucket), then l0; then the reducer copies its 8 MiB back (D3d).
    ring = 2 * ring_allreduce_time(4 * 2**20, 2, min(BW, CPU_ALLREDUCE_BYTES_PER_S),
                                   max(LAT, CPU_ALLREDUCE_STEP_S))
    copies = CPU_REDUCER_SECONDS_PER_BYTE * 8 * 2**20
    assert hyb.exposed_allreduce[0] == pytest.approx(ring + copies + CPU_DDP_STEP_S, rel=1e-9)  # and D3e
