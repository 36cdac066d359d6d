"""Pipelined placements simulated (envs.sim.pipeline): torch's schedule orders, micro-batch costs, memory, M = 1."""

from __future__ import annotations

import pytest

from envs.sim.pipeline import check_pipeline, simulate_pipeline
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.pipeline_schedules import Action, action_order, pipeline_orders
from envs.sim.problem_compile import compile_problem
from envs.sim.rank_costs import ZERO_COSTS
from envs.sim.ranks import simulate_ranks
from envs.sim.stage_costs import stage_costs
from tests.helpers.pipelines import LAT, chain, cpu_cluster, two_stages


def test_gpipe_runs_all_forwards_then_all_backwards_on_every_stage():
    orders = action_order("gpipe", 3, 4)
    for s, acts in enumerate(orders):
        assert [(a.kind, a.mb) for a in acts] == [("F", i) for i in range(4)] + [("B", i) for i in range(4)]
        assert {a.stage for a in acts} == {s}


def test_1f1b_warms_up_with_one_forward_per_later_stage_then_alternates():
    orders = action_order("1f1b", 3, 4)
    # Schedule1F1B: warmup_chunks = min(M, num_stages - stage_index)
    assert [a.kind + str(a.mb) for a in orders[0]] == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert [a.kind + str(a.mb) for a in orders[1]] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert [a.kind + str(a.mb) for a in orders[2]] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_interleaved_order_is_torchs_pipeline_order_without_padding():
    torch = pytest.importorskip("torch")
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

    class FakeStage:  # what ScheduleInterleaved1F1B.__init__ reads of its stages before any communication
        def __init__(self, index, rank, size, n):
            self.stage_index, self.group_rank, self.group_size, self.num_stages = index, rank, size, n
            self.is_first, self.is_last = index == 0, index == n - 1
            self.submod = torch.nn.Identity()
            self.has_backward = True

    p, local, m = 2, 2, 4
    for rank in range(p):
        stages = [FakeStage(j * p + rank, rank, p, p * local) for j in range(local)]
        try:
            sched = ScheduleInterleaved1F1B(stages, m)
        except Exception as exc:  # pragma: no cover - depends on torch internals
            pytest.skip(f"cannot build torch's schedule without a process group: {exc}")
        theirs = [(a.stage_index, "F" if a.computation_type == _ComputationType.FORWARD else "B", a.microbatch_index)
                  for a in sched.pipeline_order[rank] if a is not None]
        pipe = Pipeline(tuple((f"n{s}",) for s in range(p * local)), tuple(f"d{s % p}" for s in range(p * local)),
                        m, "interleaved_1f1b")
        ours = [(a.stage, a.kind, a.mb) for a in pipeline_orders(pipe)[rank]]
        assert ours == theirs


def test_pipelines_of_one_shape_build_their_action_orders_once(monkeypatch):
    """The pipeline search simulates thousands of cuts of a few shapes: the orders depend on the
    shape alone, so a second cut of the same shape (another cluster, other stages) reuses them,
    gets the same step as before, and pipeline_orders still hands out lists of its own."""
    import envs.sim.pipeline_schedules as pipeline_module

    built: list[tuple[str, int, int]] = []
    real = pipeline_module.action_order
    monkeypatch.setattr(pipeline_module, "action_order",
                        lambda schedule, s, m: built.append((schedule, s, m)) or real(schedule, s, m))
    pipeline_module.schedule_orders.cache_clear()
    problem = compile_problem(chain(4, out_bytes=1000), cpu_cluster(2))
    first = simulate_pipeline(problem, two_stages(3, "gpipe"), ZERO_COSTS).step_time
    other = Pipeline((("x", "l0"), ("l1", "l2", "l3", "output")), ("cpu:1", "cpu:0"), 3, "gpipe")
    simulate_pipeline(problem, other, ZERO_COSTS)
    assert simulate_pipeline(problem, two_stages(3, "gpipe"), ZERO_COSTS).step_time == first
    assert built == [("gpipe", 2, 3)]
    mine = pipeline_orders(two_stages(3, "gpipe"))
    mine[0].clear()
    assert [len(o) for o in pipeline_orders(two_stages(3, "gpipe"))] == [6, 6]
    assert built == [("gpipe", 2, 3)]


def test_one_microbatch_reproduces_the_unpipelined_step_over_one_process_per_stage():
    g = chain(4, params=1000)
    cluster = cpu_cluster(2)
    problem = compile_problem(g, cluster)
    for schedule in ("gpipe",):  # Schedule1F1B refuses M < S
        result = simulate_pipeline(problem, two_stages(1, schedule), ZERO_COSTS)
        ranks = simulate_ranks(g, {"x": "cpu:0", "l0": "cpu:0", "l1": "cpu:0", "l2": "cpu:1", "l3": "cpu:1",
                                   "output": "cpu:1"}, cluster, ZERO_COSTS)
        # The problem's fixed host cost per process that holds parameters is the only difference (P5).
        fixed = problem.ops.host.step_s
        assert result.step_time == pytest.approx(ranks.step_time + fixed, rel=1e-12, abs=1e-15)


def test_microbatches_overlap_the_stages():
    problem = compile_problem(chain(4, out_bytes=1000), cpu_cluster(2))
    one = simulate_pipeline(problem, two_stages(1, "gpipe"), ZERO_COSTS).step_time
    four = simulate_pipeline(problem, two_stages(4), ZERO_COSTS).step_time
    # Two equal stages, F = 2 ms, B = 4 ms on the whole batch: 6 ms each; with 4 micro-batches
    # the bubble is (S - 1) / M of a stage's time, so the step is (1 + 1/4) * 6 ms instead of 12,
    # plus the link latencies on the critical path (a few hops of 100 us).
    assert one == pytest.approx(12e-3 + 2 * LAT, rel=1e-3)
    assert 6e-3 * (1 + 1 / 4) <= four <= 6e-3 * (1 + 1 / 4) + 5 * LAT
    assert four < 0.7 * one


def test_each_microbatch_carries_its_share_of_the_boundary_bytes():
    problem = compile_problem(chain(4, out_bytes=1_000_000), cpu_cluster(2))
    sc = stage_costs(problem, two_stages(4), ZERO_COSTS)
    assert sc.fwd_bytes.tolist() == [250_000]
    assert sc.bwd_bytes.tolist() == [250_000]


def test_a_skip_connection_is_relayed_through_every_stage_in_between():
    g = chain(4, skip=True, out_bytes=1000)
    problem = compile_problem(g, cpu_cluster(3))
    pipe = Pipeline((("x", "l0"), ("l1", "l2"), ("l3", "output")), ("cpu:0", "cpu:1", "cpu:2"), 3, "1f1b")
    sc = stage_costs(problem, pipe, ZERO_COSTS)
    # l0 is read by l1 (stage 1) and l3 (stage 2): it crosses boundary 1 besides l2.
    assert sc.fwd_bytes.tolist() == [1000 / 3, 2000 / 3]


def test_gpipe_keeps_every_microbatch_in_flight_and_1f1b_at_most_the_later_stages():
    problem = compile_problem(chain(4, out_bytes=1000), cpu_cluster(2))
    assert simulate_pipeline(problem, two_stages(8, "gpipe"), ZERO_COSTS).in_flight == [8, 8]
    assert simulate_pipeline(problem, two_stages(8, "1f1b"), ZERO_COSTS).in_flight == [2, 1]


def test_a_stage_that_does_not_fit_its_device_is_refused_naming_it():
    # Each stage keeps 20 MB of activations per batch; the 10 MB boundary has receive buffers
    # for every micro-batch: activations on stage 1, their gradients on stage 0; and each
    # device the backward's working set, 2 x its largest output gradient at 1/M (2 x 2.5 MB);
    # and each process the input batch (100 B, P5d).
    problem = compile_problem(chain(4, out_bytes=10_000_000), cpu_cluster(2, memory=25_000_100))
    ok = check_pipeline(problem, two_stages(4, "1f1b"), batch_size=8)
    assert ok.fits and ok.peak_memory == {"cpu:0": 2 * 5e6 + 10e6 + 5e6 + 100, "cpu:1": 5e6 + 10e6 + 5e6 + 100}
    with pytest.raises(PipelineError, match=r"stage\(s\) \[0\] do not fit cpu:0: they need 0.03 GiB"):
        check_pipeline(problem, two_stages(4, "gpipe"), batch_size=8)


def test_bad_pipelines_get_one_clear_error_each():
    with pytest.raises(PipelineError, match="unknown pipeline schedule 'zb'"):
        Pipeline((("a",),), ("d",), 1, "zb")
    with pytest.raises(PipelineError, match="do not divide the batch of 10"):
        Pipeline((("a",),), ("d",), 4).check_batch(10)
    with pytest.raises(PipelineError, match="integer >= 1"):
        Pipeline((("a",),), ("d",), 0)
    with pytest.raises(PipelineError, match="at least as many micro-batches as stages"):
        Pipeline((("a",), ("b",)), ("d", "e"), 1, "1f1b")
    with pytest.raises(PipelineError, match="one stage per device"):
        Pipeline((("a",), ("b",)), ("d", "d"), 2, "1f1b")
    problem = compile_problem(chain(4), cpu_cluster(2))
    backwards = Pipeline((("x", "l0", "l2"), ("l1", "l3", "output")), ("cpu:0", "cpu:1"), 2)
    with pytest.raises(PipelineError, match="no stage sends back"):
        simulate_pipeline(problem, backwards)
    with pytest.raises(PipelineError, match="miss 1 node"):
        simulate_pipeline(problem, Pipeline((("x", "l0", "l1"), ("l2", "l3")), ("cpu:0", "cpu:1"), 2))


def test_pipeline_round_trips_through_its_dict():
    p = two_stages(4, "gpipe")
    assert Pipeline.from_dict(p.to_dict()) == p
    assert Action(0, "F", 1) == Action(0, "F", 1)


def test_one_stage_without_micro_batches_has_the_op_level_simulators_peak_memory():
    """One number per placement: a 1-stage, M=1 pipeline holds what the op-level simulator
    says its all-on-one-device placement holds, backward working set included (here a shared
    parameter's gradient, which a micro-batch does not shrink, is the largest)."""
    import numpy as np

    from envs.sim.simulator import simulate

    g = chain(4, out_bytes=1_000_000)
    g.nodes["l2"]["shared_param_bytes"] = 3_000_000
    problem = compile_problem(g, cpu_cluster(2))
    one = Pipeline((tuple(problem.node_names),), ("cpu:0",), 1, "1f1b")
    op_level = simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0]
    assert simulate_pipeline(problem, one, ZERO_COSTS).peak_memory["cpu:0"] == pytest.approx(op_level)
    # With M micro-batches the output gradients shrink, the shared one does not.
    sc = stage_costs(problem, Pipeline((tuple(problem.node_names),), ("cpu:0",), 4, "1f1b"), ZERO_COSTS)
    assert sc.work.tolist() == [2 * 3_000_000]


def test_the_search_tables_give_the_same_working_set_as_stage_costs():
    from envs.sim.stage_costs import fast_stage_costs

    g = chain(6, out_bytes=1_000_000)
    g.nodes["l1"]["out_bytes"] = 4_000_000
    g.nodes["l4"]["shared_param_bytes"] = 1_500_000
    problem = compile_problem(g, cpu_cluster(2))
    names = problem.node_names
    for cut in range(1, len(names)):
        pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 4, "1f1b")
        slow = stage_costs(problem, pipe, ZERO_COSTS)
        fast = fast_stage_costs(problem, [0, cut, len(names)], [0, 1], 4, ZERO_COSTS)
        assert fast.work.tolist() == pytest.approx(slow.work.tolist())


def test_accumulating_micro_batches_hold_a_fresh_weight_gradient_beside_its_grad():
    """P5a: with M >= 2 every backward after the first allocates each weight's gradient (and,
    for a convolution, a same-size temporary) beside the ``.grad`` it is added into (measured:
    +9 + 9 MiB for a 512x512x3x3 weight where the rule gave 0.25 MiB); M = 1 adds nothing."""
    from envs.sim.memory_rules import BACKWARD_WORK_FACTOR
    from envs.sim.stage_costs import fast_stage_costs

    g = chain(4, out_bytes=100_000)
    g.nodes["l2"]["param_bytes"] = 5_000_000
    problem = compile_problem(g, cpu_cluster(2))
    names = problem.node_names
    cut = names.index("l2")
    for m, expected in ((1, 2 * 100_000), (2, BACKWARD_WORK_FACTOR * 5_000_000)):
        pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), m, "gpipe")
        slow = stage_costs(problem, pipe, ZERO_COSTS)
        assert slow.work[1] == pytest.approx(expected)
        fast = fast_stage_costs(problem, [0, cut, len(names)], [0, 1], m, ZERO_COSTS)
        assert fast.work.tolist() == pytest.approx(slow.work.tolist())


def test_a_sent_value_autograd_does_not_save_is_kept_by_its_stage_per_microbatch_in_flight():
    """P5b: PipelineStage keeps a stage's outputs until that micro-batch's backward; a value no
    op saves (a Linear's output read by the next stage's residual add) was charged nothing."""
    from envs.sim.stage_costs import fast_stage_costs

    g = chain(4, out_bytes=400_000)
    for n in g.nodes:
        g.nodes[n]["act_bytes"] = 100_000 if n.startswith("l") else 0
    g.nodes["l1"]["act_bytes"] = 0  # the value sent over the cut after l1
    problem = compile_problem(g, cpu_cluster(2))
    names = problem.node_names
    cut = names.index("l2")
    pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 4, "gpipe")
    slow = stage_costs(problem, pipe, ZERO_COSTS)
    assert slow.act.tolist() == pytest.approx([(100_000 + 400_000) / 4, 2 * 100_000 / 4])
    fast = fast_stage_costs(problem, [0, cut, len(names)], [0, 1], 4, ZERO_COSTS)
    assert fast.act.tolist() == pytest.approx(slow.act.tolist())
    # GPipe keeps all 4 micro-batches in flight on stage 0: all of the sent value's bytes
    peak = simulate_pipeline(problem, pipe, ZERO_COSTS).peak_memory["cpu:0"]
    g.nodes["l1"]["act_bytes"] = 400_000  # the same value, saved: kept once, not twice
    saved = simulate_pipeline(compile_problem(g, cpu_cluster(2)), pipe, ZERO_COSTS).peak_memory["cpu:0"]
    assert peak == pytest.approx(saved)


def test_a_tied_parameter_read_on_another_device_is_held_there_as_a_copy_with_its_grad_and_state():
    """P5c: the runtime keeps a copy of a tied weight on every rank that reads it (its own
    .grad and optimizer state, gradients all-reduced); the simulator charged it to the
    owner's stage only (GPT-2's tied wte: 2 MiB under on the head's rank, measured)."""
    import torch

    from envs.sim.stage_costs import fast_stage_costs
    from graphs.capture import capture

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 16)
            self.mid = torch.nn.Linear(16, 16)

        def forward(self, idx):
            return torch.nn.functional.linear(torch.tanh(self.mid(self.emb(idx))), self.emb.weight).sum()

    graph = capture(Tied(), (torch.randint(0, 64, (4, 3)),), name="tied").graph
    readers = {n: d["tied_param_bytes"] for n, d in graph.nodes(data=True) if "tied_param_bytes" in d}
    assert list(readers.values()) == [{"emb": 64 * 16 * 4}]
    problem = compile_problem(graph, cpu_cluster(2), optimizer="adam")
    names = problem.node_names
    cut = names.index("mid") + 1
    pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe")
    slow = stage_costs(problem, pipe, ZERO_COSTS)
    copy = 64 * 16 * 4 * (2 + problem.optimizer_state_factor)
    assert slow.static[1] == pytest.approx(copy)  # the head's stage owns no parameter but holds the copy
    fast = fast_stage_costs(problem, [0, cut, len(names)], [0, 1], 2, ZERO_COSTS)
    assert fast.static.tolist() == pytest.approx(slow.static.tolist())
    # both stages on one device: one tensor, no copy
    same = fast_stage_costs(problem, [0, cut, len(names)], [0, 0], 2, ZERO_COSTS)
    assert same.static[1] == 0.0


def test_every_process_of_a_pipeline_holds_the_whole_input_batch():
    """P5d: the job ships the batch to every rank and a stage's micro-batches are views of it;
    one process (the op-level simulator's case) holds it once, as its training loop does (P5e:
    at the optimizer step, with the model's output)."""
    g = chain(4, out_bytes=1_000)
    g.nodes["x"]["out_bytes"] = 7_000_000
    problem = compile_problem(g, cpu_cluster(2))
    assert problem.ops.input_bytes == 7_000_000
    two = simulate_pipeline(problem, two_stages(2, "gpipe"), ZERO_COSTS).peak_memory
    g.nodes["x"]["out_bytes"] = 0
    none = simulate_pipeline(compile_problem(g, cpu_cluster(2)), two_stages(2, "gpipe"), ZERO_COSTS).peak_memory
    assert {d: two[d] - none[d] for d in two} == pytest.approx({"cpu:0": 7_000_000, "cpu:1": 7_000_000}, abs=1)
    one = Pipeline((tuple(problem.node_names),), ("cpu:0",), 1, "gpipe")
    with_inputs = simulate_pipeline(problem, one, ZERO_COSTS).peak_memory["cpu:0"]
    without = simulate_pipeline(compile_problem(g, cpu_cluster(2)), one, ZERO_COSTS).peak_memory["cpu:0"]
    assert without < 7_000_000
    assert with_inputs == pytest.approx(7_000_000 + 1_000, abs=1)  # the batch and the output (1,000 B)
