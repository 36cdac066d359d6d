"""One truth on ranks (issue 15): a placement over processes (``--devices cpu:0,cpu:1``) has
one simulated step time, the multi-process runtime's (envs.sim.ranks.RankSimulator), in the
search, the comparison table, the report and ``placer show``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from envs.runtime.distributed import rank_cluster as rank_cluster_module
from envs.runtime.measurer import MeasureCache, MeasureResult
from envs.sim.rank_compile import value_leaves
from envs.sim.rank_simulator import RankSimulator
from envs.sim.simulator import simulate_batch
from tests.helpers.measurers import ClosableFake, fixed_links


class _Constant(ClosableFake):
    """Measures every placement at 10 ms (and runs no pipelines, DDP or one-process reference)."""

    def __init__(self):
        self.cache = MeasureCache()

    def measure(self, placements):
        return [MeasureResult(step_time=0.010) for _ in placements]


@pytest.fixture(scope="module")
def rank_run(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setattr(rank_cluster_module, "measure_links", fixed_links)
    try:
        from placer import optimize

        out = tmp_path_factory.mktemp("ranks")
        # The final confirmation's measurements are not what these tests are about, and real
        # ones (six jobs of worker processes, ~30 s) would make the winner vary from run to run.
        result = optimize("zoo:rnnlm", devices="cpu:0,cpu:1", reward="simulated", budget="32", seed=0,
                          out_dir=out, progress=False, verbose=0, measurer=_Constant())
        yield result, result.cluster, out
    finally:
        patch.undo()


def _rank_step(result, cluster) -> float:
    captured = result.prepared.captured
    if result.placement.pipeline is not None:  # a pipelined winner (issue 16): the pipeline's simulated step
        from envs.sim.hybrid import simulate_pipelined
        from envs.sim.pipeline_layout import group_pipeline
        from placer.cli.show import simulate_placement

        problem, _ = simulate_placement(result.prepared, result.placement.assignment, cluster)
        return simulate_pipelined(problem, group_pipeline(problem, result.placement.pipeline)).step_time
    sim = RankSimulator(captured.graph, cluster, leaves=value_leaves(captured.gm),
                        op_to_group=result.prepared.grouping.op_to_group)
    return sim.simulate(result.placement.assignment, trace=False).step_time


def test_optimize_on_ranks_reports_the_rank_simulators_step_for_its_winner(rank_run):
    result, cluster, _ = rank_run
    expected = _rank_step(result, cluster)
    assert result.problem.rank_simulator is not None
    if result.placement.pipeline is not None:
        winner = result.table[result.table["method"] == result.winner]
        assert float(winner["simulated_step_time"].iloc[0]) == pytest.approx(expected, rel=1e-12)
        return
    assert float(simulate_batch(result.problem, result.group_row).step_time[0]) == pytest.approx(expected, rel=1e-12)
    winner = result.table[result.table["method"] == result.winner]
    assert float(winner["simulated_step_time"].iloc[0]) == pytest.approx(expected, rel=1e-12)
    if result.source == "simulated":  # else the winner was measured too, and its step is the measurement
        assert result.step_time == pytest.approx(expected, rel=1e-12)
    # The figure is not the one-process simulator's, which serialises nothing over gloo.
    one_process = replace(result.problem, rank_simulator=None)
    assert float(simulate_batch(one_process, result.group_row).step_time[0]) != pytest.approx(expected, rel=1e-6)


def test_every_row_of_the_comparison_table_is_simulated_over_ranks(rank_run):
    result, _, _ = rank_run
    problem = result.problem
    rows = np.array([c.row for c in result.candidates if c.row is not None])
    assert len(rows) >= 2
    got = simulate_batch(problem, rows).step_time
    want = problem.rank_simulator.step_times_rows(rows, problem.node_names)
    assert np.array_equal(got, want)


def test_show_on_the_saved_placement_agrees_with_optimize_over_ranks(rank_run):
    from placer.cli.show import simulate_placement
    from placer.placement_file import load_placement

    result, cluster, out = rank_run
    saved = load_placement(out / "placement.json")
    problem, shown = simulate_placement(result.prepared, saved.assignment, cluster)
    step = shown.step_time
    if saved.pipeline is not None:  # show simulates the saved pipeline (issue 16)
        from envs.sim.hybrid import simulate_pipelined
        from envs.sim.pipeline_layout import group_pipeline

        step = simulate_pipelined(problem, group_pipeline(problem, saved.pipeline)).step_time
    assert step == pytest.approx(_rank_step(result, cluster), rel=1e-12)
    winner = result.table[result.table["method"] == result.winner]
    assert step == pytest.approx(float(winner["simulated_step_time"].iloc[0]), rel=1e-12)


def test_placer_show_rebuilds_the_rank_cluster_from_the_recorded_links(rank_run, tmp_path, capsys):
    from placer.cli.main import main

    result, cluster, out = rank_run
    assert main(["show", str(out / "placement.json"), "--model", "zoo:rnnlm", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    pipe = result.placement.pipeline
    # The winner is picked on measured times, so it is a placement, a pipeline or DDP from run to
    # run; show names each as Pipeline.describe() does (DDP: "data parallel (DDP over 2 replicas)").
    shape = "" if pipe is None else f", {pipe.describe()}"
    assert f"simulated on {cluster.name}{shape}: {_rank_step(result, cluster) * 1e3:.3f} ms per step" in printed


def test_malformed_recorded_links_are_refused_with_one_clear_line(rank_run):
    from placer.cli.show import recorded_rank_cluster
    from placer.options import OptionError
    from placer.placement_file import load_placement

    _, _, out = rank_run
    saved = load_placement(out / "placement.json")
    with pytest.raises(OptionError, match="expected a list of \\[device, device, latency seconds"):
        recorded_rank_cluster(replace(saved, metadata={**saved.metadata, "links": [["cpu:0", "cpu:1", "fast"]]}))


def test_every_rank_placement_in_the_table_is_at_or_above_the_rank_lower_bound(rank_run):
    # The one-process bound charged one host thread with every op, which ranks do not have:
    # the table's ratio now divides by the rank simulator's own bound.
    result, _, _ = rank_run
    table = result.table
    placements = table[table["kind"] == "placement"] if "kind" in table else table
    ratios = placements["ratio_to_lower_bound"].dropna()
    assert len(ratios) >= 2
    assert (ratios >= 1.0 - 1e-9).all()
    # DDP replicas and micro-batched pipelines are not rank placements: no proven bound, no ratio.
    if "kind" in table:
        assert table[table["kind"] != "placement"]["ratio_to_lower_bound"].isna().all()


def test_a_placement_the_rank_runtime_refuses_is_an_invalid_reward_with_the_runtimes_reason():
    """The search scores a cut that ``split_by_rank`` refuses as invalid, so it never keeps it
    as its best; ``show`` and the report say why (a mask sent before it is halved in place)."""
    import torch

    from envs.gym.rewards import SimulatedReward
    from envs.sim.problem_compile import compile_problem
    from graphs.capture import capture
    from tests.helpers.problems import ranks_cluster
    from tests.helpers.runtime_models import MaskUpdatedAfterItIsRead

    cap = capture(MaskUpdatedAfterItIsRead(), (torch.randn(6, 8),))
    problem = compile_problem(cap.graph, ranks_cluster(), leaves=value_leaves(cap.gm))
    on_rank_1 = {"a", "add", "mul", "c"}
    refused = np.array([int(n in on_rank_1) for n in problem.node_names])
    together = np.zeros_like(refused)
    ev = SimulatedReward(problem).simulate(np.stack([refused, together]))
    assert ev.valid.tolist() == [False, True]
    assert ev.reason[0].startswith("refused by the runtime: node 'mul_' updates 'float_1' in place")
    assert np.isinf(ev.step_time[0]) and np.isfinite(ev.step_time[1])
