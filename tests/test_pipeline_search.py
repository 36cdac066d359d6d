"""The pipeline search (placer.search.pipeline_search) and the hybrid it searches over
(envs.sim.hybrid.simulate_hybrid, envs.sim.stage_costs.fast_stage_costs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.data_parallel import simulate_data_parallel
from envs.sim.hybrid import simulate_hybrid
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem_compile import compile_problem
from envs.sim.stage_costs import fast_stage_costs, stage_costs
from graphs.model_file import ModelSpec
from graphs.pipeline import prepare
from placer.search.baselines.pipeline_split import best_pipeline
from placer.search.pipeline_moves import MOVE_KINDS, NUM_FEATURES, PipelineState, move_features, neighbours
from placer.search.pipeline_search import search_pipeline

FAST, SLOW = 2e10, 2e6


def mlp_problem(links: dict[tuple[int, int], float] | None = None, batch: int = 16, width: int = 512,
                layers: int = 8, memory: float = 2**34):
    """A real captured MLP (fx, grouped) on 4 GPUs; ``links`` {(i, j): bandwidth}, else all fast."""
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
    spec = ModelSpec(model=model, example_inputs=(torch.randn(batch, width),), name="mlp")
    prep = prepare(spec, profile=False)
    devs = [Device(f"gpu{i}", "V100", memory, 1.5e13, 9e11) for i in range(4)]
    bw = links or {}
    lk = [Link(f"gpu{i}", f"gpu{j}", 1e-5, bw.get((i, j), FAST)) for i in range(4) for j in range(i + 1, 4)]
    return compile_problem(prep.captured.graph, make_cluster(devs, lk, name="4 gpus"), grouping=prep.grouping)


@pytest.fixture(scope="module")
def ring_problem():
    # Fast links only along gpu0-gpu2-gpu1-gpu3: the partitioners take the devices in index
    # order (0, 1, 2, 3), every boundary on a slow link; a better pipeline exists in that order.
    fast = {(0, 2): FAST, (1, 2): FAST, (1, 3): FAST}
    links = {(i, j): fast.get((i, j), SLOW) for i in range(4) for j in range(i + 1, 4)}
    return mlp_problem(links, width=1024)


def test_fast_stage_costs_equal_the_op_by_op_ones():
    problem = mlp_problem()
    n = problem.num_nodes
    bounds, devs = (0, n // 3, n // 2, n), (2, 0, 3)
    pipe = Pipeline(tuple(tuple(problem.node_names[bounds[i]:bounds[i + 1]]) for i in range(3)),
                    tuple(problem.device_names[d] for d in devs), 4, "1f1b")
    for share in (1, 2):
        slow = stage_costs(problem, pipe, share=share)
        fast = fast_stage_costs(problem, bounds, devs, 4, share=share)
        for name in ("fwd", "bwd", "opt", "static", "act", "fwd_bytes", "bwd_bytes", "has_params"):
            np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-9, err_msg=name)
    assert simulate_pipeline(problem, pipe, stage_cost=fast_stage_costs(problem, bounds, devs, 4)).step_time == \
        pytest.approx(simulate_pipeline(problem, pipe).step_time, rel=1e-9)


def test_one_replica_hybrid_is_the_pipeline():
    problem = mlp_problem()
    names = problem.node_names
    pipe = Pipeline((names[:5], names[5:]), ("gpu1", "gpu3"), 4, "gpipe")
    alone = simulate_pipeline(problem, pipe)
    hybrid = simulate_hybrid(problem, [pipe])
    assert hybrid.step_time == alone.step_time and hybrid.peak_memory == alone.peak_memory


@pytest.mark.parametrize("replicas", [2, 4])
def test_one_stage_replicas_are_ddp(replicas):
    problem = mlp_problem()
    devs = problem.device_names[:replicas]
    ddp = simulate_data_parallel(problem, list(devs))
    hybrid = simulate_hybrid(problem, [Pipeline((problem.node_names,), (d,), 1, "gpipe") for d in devs])
    assert hybrid.step_time == pytest.approx(ddp.step_time, rel=1e-12)
    assert hybrid.peak_memory == pytest.approx(ddp.peak_memory, rel=1e-12)


def test_replicas_all_reduce_each_stage_over_its_own_devices():
    problem = mlp_problem(width=1024)
    names = problem.node_names
    half = len(names) // 2
    a = Pipeline((names[:half], names[half:]), ("gpu0", "gpu1"), 2, "1f1b")
    b = Pipeline((names[:half], names[half:]), ("gpu2", "gpu3"), 2, "1f1b")
    hybrid = simulate_hybrid(problem, [a, b])
    alone = simulate_pipeline(problem, a)
    # Each replica computes half the batch, but pays its stages' gradient all-reduce and the
    # bucket copy of its gradients.
    assert hybrid.replicas[0].step_time < alone.step_time
    assert hybrid.step_time > hybrid.replicas[0].step_time
    assert all(hybrid.peak_memory[d] > hybrid.replicas[0].peak_memory[d] for d in ("gpu0", "gpu1"))
    with pytest.raises(PipelineError, match="share devices"):
        simulate_hybrid(problem, [a, a])
    with pytest.raises(PipelineError, match="not the same pipeline"):
        simulate_hybrid(problem, [a, Pipeline((names[:3], names[3:]), ("gpu2", "gpu3"), 2, "1f1b")])


def test_every_move_leads_to_a_valid_state_and_has_features(ring_problem):
    n = ring_problem.num_nodes
    state = PipelineState((0, n // 4, n // 2, 3 * n // 4, n), ((0, 1, 2, 3),), 4, "1f1b")
    cost = np.ones(n)
    moves = neighbours(state, [0, 1, 2, 3], 16, cost)
    kinds = {m.kind for m in moves}
    assert {"shift", "swap", "merge", "m_up", "m_down", "schedule", "reshape"} <= kinds <= set(MOVE_KINDS)
    assert all(m.state.valid(16) and m.state != state for m in moves)
    assert any(m.state.replicas == 2 for m in moves)  # 2 stages x 2 replicas is a reshape away
    from placer.search.pipeline_search import _Evaluator

    current = _Evaluator(ring_problem, None, 10)(state, "seeds")
    f = move_features(moves, current, ring_problem)
    assert f.shape == (len(moves), NUM_FEATURES) and np.isfinite(f).all()


def test_the_search_beats_the_partitioners_seed_when_a_better_pipeline_exists(ring_problem):
    result = search_pipeline(ring_problem, 16, budget=150, seed=0)
    seeds = result.seed_step_time
    partitioners = best_pipeline(ring_problem, 16, microbatches=(1, 2, 4, 8, 16))
    assert result.step_time < 0.8 * seeds
    assert result.step_time < 0.8 * min(c.step_time for c in partitioners.values())
    # It found the fast chain of links: every boundary of every replica on a fast link.
    bw = ring_problem.bandwidth
    for row in result.best.devices:
        assert all(bw[row[i], row[i + 1]] == FAST for i in range(len(row) - 1))
    shares = result.credit()
    assert shares and math.isclose(sum(shares.values()), 1.0) and "seeds" not in shares


def test_same_seed_same_result_and_the_budget_is_counted_in_simulated_pipelines(ring_problem):
    a = search_pipeline(ring_problem, 16, budget=60, seed=3)
    b = search_pipeline(ring_problem, 16, budget=60, seed=3)
    assert (a.best, a.step_time, a.evaluated, a.phase_evaluated) == (b.best, b.step_time, b.evaluated,
                                                                      b.phase_evaluated)
    assert a.evaluated == 60 == sum(a.phase_evaluated.values())
    small = search_pipeline(ring_problem, 16, budget=2, seed=3)
    assert small.evaluated == 2 and small.phase_evaluated == {"seeds": 2}


def test_a_search_lists_each_states_moves_once(ring_problem, monkeypatch):
    """The rounds come back to the same states (each round's start, the local optimum, the best
    state kicked): their moves are listed once per search and reused, with the same result."""
    import placer.search.pipeline_search as pipeline_search

    plain = search_pipeline(ring_problem, 16, budget=150, seed=0)
    asked: list[PipelineState] = []
    real = pipeline_search.neighbours
    monkeypatch.setattr(pipeline_search, "neighbours", lambda state, **kw: asked.append(state) or real(state, **kw))
    counted = search_pipeline(ring_problem, 16, budget=150, seed=0)
    assert (counted.best, counted.step_time, counted.evaluated, counted.history) == (
        plain.best, plain.step_time, plain.evaluated, plain.history)
    assert asked and len(asked) == len(set(asked))


def test_the_ablation_switches_leave_each_phase_alone(ring_problem):
    """Local search alone never asks the policy; the policy alone never runs local search and,
    from scratch, starts from no partitioner; the full search runs both from the same seeds."""
    alone = search_pipeline(ring_problem, 16, budget=80, seed=1, policy_share=0.0)
    assert set(alone.phase_evaluated) <= {"seeds", "local_search"} and "local_search" in alone.phase_evaluated
    scratch = search_pipeline(ring_problem, 16, budget=80, seed=1, seeded=False, local_search=False)
    assert set(scratch.phase_evaluated) == {"seeds", "policy_moves"}
    assert scratch.phase_evaluated["seeds"] == 1 and scratch.seed_methods == {}
    first = scratch.improvements[0]
    assert first.phase == "seeds" and scratch.history[0][0] == 1
    full = search_pipeline(ring_problem, 16, budget=80, seed=1)
    assert {"seeds", "policy_moves", "local_search"} <= set(full.phase_evaluated)
    assert full.seed_methods == alone.seed_methods  # the same partitioners' seeds
    for result in (alone, scratch, full):
        assert result.evaluated <= 80 and result.fits


def test_a_search_needs_two_devices_and_a_budget():
    problem = mlp_problem()
    with pytest.raises(PipelineError, match="at least 1 placement"):
        search_pipeline(problem, 16, budget=0)


def test_optimize_can_pick_a_pipeline_and_its_file_carries_it(tmp_path):
    import placer
    from placer.placement_file import load_placement

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())])
    result = placer.optimize(model, (torch.randn(16, 64),), cluster="4xV100-nvlink", budget="60",
                             baselines=("single", "expert"), out_dir=tmp_path, progress=False)
    table = result.table.set_index("method")
    pipes = table[table["kind"] == "pipeline"]
    assert "placer (pipeline search)" in pipes.index and pipes.loc["placer (pipeline search)", "evaluated"] == 60
    # Launch-bound on one GPU: a pipeline over 4 processes issues its kernels from 4 host threads.
    assert table.loc[result.winner, "kind"] == "pipeline"
    assert result.step_time == pytest.approx(float(pipes["step_time"].min()))
    assert result.check is not None and result.check.ok  # applied un-pipelined: the same math
    loaded = load_placement(tmp_path / "placement.json")
    assert loaded.pipeline is not None and loaded.pipeline == result.placement.pipeline
    assert sum(len(s) for s in loaded.pipeline.stages) == len(loaded.assignment)


def test_a_pipelined_winners_report_gives_its_pipelines_peak_memory_not_the_unpipelined_one(tmp_path):
    import placer
    from envs.hardware.units import format_bytes
    from envs.sim.hybrid import simulate_pipelined
    from envs.sim.pipeline_layout import group_pipeline
    from envs.sim.simulator import simulate
    from placer.report.results import winner_peak_memory

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())])
    result = placer.optimize(model, (torch.randn(16, 64),), cluster="4xV100-nvlink", budget="60",
                             baselines=("single", "expert"), out_dir=tmp_path, progress=False, check=False)
    pipe = result.placement.pipeline
    assert pipe is not None  # as in the test above: a pipeline wins this model
    piped = simulate_pipelined(result.problem, group_pipeline(result.problem, pipe)).peak_memory
    peak, how = winner_peak_memory(result)
    assert peak == [piped.get(d, 0.0) for d in result.problem.device_names] and how.startswith("pipelined")
    # The un-pipelined assignment holds the whole batch's activations at once, not M micro-batches': they differ.
    assert peak != [float(m) for m in simulate(result.problem, result.group_row).peak_memory]
    report = (tmp_path / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("- devices used:"))
    assert "(pipelined" in line and all(format_bytes(m) in line for m in peak)


def test_a_pipelined_winners_schedule_chart_gives_the_pipelines_step_not_the_unpipelined_one(tmp_path,
                                                                                             monkeypatch):
    """schedule.png draws the winner's stage assignment un-pipelined; its title gave that run's
    step, a second number for the one placement."""
    import placer
    import placer.report.gantt as gantt
    from placer.report.results import write_pictures

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())])
    result = placer.optimize(model, (torch.randn(16, 64),), cluster="4xV100-nvlink", budget="60",
                             baselines=("single", "expert"), progress=False, check=False)
    assert result.placement.pipeline is not None
    titles = []
    real = gantt.plot_gantt
    monkeypatch.setattr(gantt, "plot_gantt", lambda *a, title=None, **k: titles.append(title) or real(*a, title=title,
                                                                                                        **k))
    assert "schedule" in write_pictures(result, tmp_path)
    assert titles and f"the pipeline steps in {result.step_time * 1e3:.3f} ms" in titles[0]


def test_a_replicated_pipeline_round_trips_through_its_file_and_is_simulated_as_a_hybrid(tmp_path):
    from envs.sim.hybrid import simulate_pipelined
    from placer.placement_file import Placement, load_placement, save_placement

    problem = mlp_problem()
    names = problem.node_names
    half = len(names) // 2
    pipe = Pipeline((names[:half], names[half:]), ("gpu0", "gpu1"), 2, "1f1b", (("gpu2", "gpu3"),))
    assert pipe.num_replicas == 2 and [p.devices for p in pipe.replica_pipelines()] == [("gpu0", "gpu1"),
                                                                                         ("gpu2", "gpu3")]
    assert simulate_pipelined(problem, pipe).step_time == simulate_hybrid(problem, pipe.replica_pipelines()).step_time
    with pytest.raises(PipelineError, match="simulate_hybrid"):
        simulate_pipeline(problem, pipe)
    with pytest.raises(PipelineError, match="2 replicas x 2 micro-batches do not divide the batch of 6"):
        pipe.check_batch(6)
    with pytest.raises(PipelineError, match="share devices"):
        Pipeline(pipe.stages, ("gpu0", "gpu1"), 2, "1f1b", (("gpu1", "gpu3"),))
    with pytest.raises(PipelineError, match="one device per stage in every replica"):
        Pipeline(pipe.stages, ("gpu0", "gpu1"), 2, "1f1b", (("gpu2",),))
    placement = Placement({n: d for n, d in pipe.assignment().items()}, "fp", list(problem.device_names),
                          pipeline=pipe)
    save_placement(placement, tmp_path / "p.json")
    assert load_placement(tmp_path / "p.json").pipeline == pipe


def test_a_hybrid_winner_is_written_over_the_ops_with_its_replicas(tmp_path):
    from envs.sim.hybrid import simulate_pipelined
    from envs.sim.pipeline_layout import group_pipeline
    from placer.optimizing.stage_outputs import Compiled, PreparedRun
    from placer.placement_file import load_placement, save_placement

    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())])
    spec = ModelSpec(model=model, example_inputs=(torch.randn(16, 64),), name="mlp")
    prep = prepare(spec, profile=False)
    devs = [Device(f"gpu{i}", "V100", 2**34, 1.5e13, 9e11, real_device="cpu") for i in range(4)]
    cluster = make_cluster(devs, [Link(f"gpu{i}", f"gpu{j}", 1e-5, FAST) for i in range(4) for j in range(i + 1, 4)],
                           name="4 gpus")
    problem = compile_problem(prep.captured.graph, cluster, grouping=prep.grouping)
    compiled = Compiled(PreparedRun(cluster, "simulated", tmp_path, spec, prep, 0.0), problem)
    state = PipelineState((0, problem.num_nodes // 2, problem.num_nodes), ((0, 1), (2, 3)), 2, "1f1b")
    pipe = state.pipeline(problem)
    row = problem.placement_to_array(pipe.assignment())
    placement = compiled.op_placement(row, {"step_time": 1.0}, pipe)
    written = placement.pipeline
    assert written is not None and written.replicas == (("gpu2", "gpu3"),)
    assert sorted(n for s in written.stages for n in s) == sorted(prep.captured.graph.nodes)
    save_placement(placement, tmp_path / "placement.json")
    loaded = load_placement(tmp_path / "placement.json")
    # Read back over the groups, it is the pipeline the search simulated.
    assert group_pipeline(problem, loaded.pipeline) == pipe
    assert simulate_pipelined(problem, group_pipeline(problem, loaded.pipeline)).step_time == \
        simulate_pipelined(problem, pipe).step_time


def test_interleaved_1f1b_is_a_move_away_and_back():
    problem = mlp_problem(layers=8)
    n = problem.num_nodes
    state = PipelineState((0, n // 4, n // 2, 3 * n // 4, n), ((0, 1, 2, 3),), 4, "1f1b")
    cost = np.ones(n)
    inter = [m.state for m in neighbours(state, [0, 1, 2, 3], 16, cost) if m.state.schedule == "interleaved_1f1b"]
    assert len(inter) == 1 and inter[0].num_stages == 8 and inter[0].devices == ((0, 1, 2, 3, 0, 1, 2, 3),)
    pipe = inter[0].pipeline(problem)
    assert simulate_pipeline(problem, pipe).step_time > 0  # ScheduleInterleaved1F1B accepts it
    from envs.sim.hybrid import simulate_pipelined

    assert simulate_pipelined(problem, pipe).step_time == simulate_pipeline(problem, pipe).step_time
    back = {m.state.schedule for m in neighbours(inter[0], [0, 1, 2, 3], 16, cost) if m.kind == "schedule"}
    assert back == {"1f1b", "gpipe"}
    assert all(m.state.valid(16) for m in neighbours(inter[0], [0, 1, 2, 3], 16, cost))
