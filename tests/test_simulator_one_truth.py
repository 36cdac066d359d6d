"""One truth (issue 15): a placement has the same simulated step time in optimize, show, the
report and the benchmark harness, because all of them simulate the op graph with the
model's groups and optimizer."""

from __future__ import annotations

import numpy as np

from envs.sim.hybrid import simulate_pipelined
from envs.sim.pipeline_layout import group_pipeline
from envs.sim.simulator import simulate_batch


def test_the_same_placement_has_the_same_step_time_in_optimize_show_report_and_benchmarks(tmp_path):
    from placer import optimize
    from placer.benchmark import prepare_cases
    from placer.cli.show import simulate_placement

    result = optimize("zoo:rnnlm", cluster="4xK40", budget="64", seed=0, out_dir=tmp_path)
    assert result.source == "simulated"
    problem = result.problem
    assert problem.ops.num_ops == result.prepared.captured.graph.number_of_nodes()  # the op graph executes
    pipeline = result.placement.pipeline  # a pipelined winner (issue 16) is simulated as a pipeline everywhere

    def step_of(prob, row) -> float:
        if pipeline is not None:
            return simulate_pipelined(prob, group_pipeline(prob, pipeline)).step_time
        return float(simulate_batch(prob, row).step_time[0])

    optimized = step_of(problem, result.group_row)
    assert result.step_time == optimized

    # show: the placement file's op assignment (and pipeline), compiled as show compiles it.
    shown_problem, shown = simulate_placement(result.prepared, result.placement.assignment, "4xK40")
    assert (step_of(shown_problem, None) if pipeline is not None else shown.step_time) == optimized

    # the report's comparison table: the winner's simulated step.
    table = result.table
    winner = table[table["method"] == result.winner]
    assert float(winner["simulated_step_time"].iloc[0]) == optimized

    # the benchmark harness: the same model and cluster compiled by prepare_cases.
    [case] = prepare_cases(["rnnlm"], ["4xK40"], size="small")
    group_of = result.prepared.grouping.op_to_group
    assignment = result.placement.assignment
    row = np.array([case.problem.device_names.index(assignment[next(op for op, g in group_of.items() if g == name)])
                    for name in case.problem.node_names])
    assert step_of(case.problem, row) == optimized
