"""DDP simulated (envs.sim.data_parallel): buckets, ring all-reduce (overlapped with the backward on GPUs,
after it on CPU ranks), does-not-fit."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.cost_model import CPU_DISPATCH_S
from envs.sim.data_parallel import (
    BUCKET_BYTES,
    CPU_ALLREDUCE_BYTES_PER_S,
    CPU_ALLREDUCE_STEP_S,
    CPU_DDP_STEP_S,
    CPU_REDUCER_SECONDS_PER_BYTE,
    FIRST_BUCKET_BYTES,
    buckets,
    ring_allreduce_time,
    simulate_data_parallel,
)
from envs.sim.pipeline import simulate_pipeline
from envs.sim.pipeline_layout import Pipeline
from envs.sim.problem_compile import compile_problem
from envs.sim.rank_costs import ZERO_COSTS

LAT, BW = 100e-6, 1e9
MB = 2**20


def cluster(n: int = 2, memory: int = 2**33):
    devs = [Device(f"cpu:{i}", "cpu", memory, 1e11, 1e10, real_device="cpu") for i in range(n)]
    links = [Link(f"cpu:{i}", f"cpu:{j}", LAT, BW) for i in range(n) for j in range(i + 1, n)]
    return make_cluster(devs, links, name="ranks", simulated=False)


def chain(n: int = 4, params: float = 4 * MB, out_bytes: float = 1000, bwd: float = 2e-3) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_node("x", op="placeholder", out_bytes=100, requires_grad=False)
    prev = "x"
    for i in range(n):
        g.add_node(f"l{i}", op="call_module", fwd_time={"cpu": 1e-3}, bwd_time={"cpu": bwd}, opt_time={"cpu": 0.0},
                   out_bytes=out_bytes, requires_grad=True, param_bytes=params)
        g.add_edge(prev, f"l{i}", bytes=g.nodes[prev]["out_bytes"])
        prev = f"l{i}"
    g.add_node("output", op="output", out_bytes=0, requires_grad=False)
    g.add_edge(prev, "output", bytes=out_bytes)
    return g


def test_buckets_follow_ddp_caps_first_one_mib_then_25_mib():
    assert FIRST_BUCKET_BYTES == 2**20 and BUCKET_BYTES == 25 * 2**20
    sizes = [0.5 * MB, 0.6 * MB, 10 * MB, 10 * MB, 10 * MB, 1 * MB]
    assert buckets(sizes) == [[0, 1], [2, 3, 4], [5]]


def test_ring_allreduce_is_2_n_minus_1_over_n_bytes_over_bandwidth_plus_latencies():
    assert ring_allreduce_time(1e9, 4, 1e9, 1e-5) == pytest.approx(2 * 3 / 4 * 1.0 + 2 * 3 * 1e-5)
    assert ring_allreduce_time(1e9, 1, 1e9, 1e-5) == 0.0


def test_one_replica_is_the_one_stage_pipeline():
    problem = compile_problem(chain(), cluster(2))
    dp = simulate_data_parallel(problem, 1)
    nodes = tuple(problem.node_names)
    pipe = simulate_pipeline(problem, Pipeline((nodes,), ("cpu:0",), 1, "1f1b"))
    assert dp.step_time == pytest.approx(pipe.step_time, rel=1e-12)
    assert dp.bucket_bytes and dp.exposed_allreduce == 0.0




def test_on_cpu_ranks_the_all_reduce_follows_the_backward_at_the_hosts_measured_ring_speed():
    # Four layers of 4 MiB: buckets [l3] (>= 1 MiB), then l2..l0 (12 MiB, under 25 MiB).
    problem = compile_problem(chain(), cluster(2))
    dp = simulate_data_parallel(problem, 2, ZERO_COSTS)
    assert dp.bucket_bytes == [4 * MB, 12 * MB]

    def half(t: float) -> float:  # an op on half the batch: its dispatch is fixed, the rest halves
        return CPU_DISPATCH_S + (t - CPU_DISPATCH_S) / 2

    back_end = 4 * half(1e-3) + 4 * half(2e-3)
    ring = sum(ring_allreduce_time(b, 2, min(BW, CPU_ALLREDUCE_BYTES_PER_S), max(LAT, CPU_ALLREDUCE_STEP_S)) for b in (4 * MB, 12 * MB))
    copies = CPU_REDUCER_SECONDS_PER_BYTE * 16 * MB  # D3d: the reducer's copies of every gradient byte
    beside = CPU_DDP_STEP_S  # D3e: DDP's own step beside the other replica
    assert dp.exposed_allreduce == pytest.approx(ring + copies + beside, rel=1e-9)  # D3c: nothing hidden
    assert dp.step_time == pytest.approx(back_end + ring + copies + beside + problem.ops.host.step_s, rel=1e-9)


def test_a_faster_ping_pong_does_not_make_the_cpu_ring_faster_than_the_host_runs_it():
    """gloo sums on the CPU: 17 KB-34 MB all-reduced at 1.15 GB/s above 0.3 ms whether the day's
    ping-pong gave 2.0 or 5.46 GB/s; taking a share of the ping-pong, DDP steps of small models
    were simulated 1.4-1.7x short. A slower link (between hosts) still decides."""
    fast = make_cluster([Device(f"cpu:{i}", "cpu", 2**33, 1e11, 1e10, real_device="cpu") for i in range(2)],
                        [Link("cpu:0", "cpu:1", 20e-6, 20e9)], name="ranks", simulated=False)
    slow = make_cluster([Device(f"cpu:{i}", "cpu", 2**33, 1e11, 1e10, real_device="cpu") for i in range(2)],
                        [Link("cpu:0", "cpu:1", 1e-3, 0.1e9)], name="ranks", simulated=False)
    on_fast = simulate_data_parallel(compile_problem(chain(), fast), 2, ZERO_COSTS)
    on_slow = simulate_data_parallel(compile_problem(chain(), slow), 2, ZERO_COSTS)
    host = sum(ring_allreduce_time(b, 2, CPU_ALLREDUCE_BYTES_PER_S, CPU_ALLREDUCE_STEP_S) for b in (4 * MB, 12 * MB))
    link = sum(ring_allreduce_time(b, 2, 0.1e9, 1e-3) for b in (4 * MB, 12 * MB))
    rest = CPU_REDUCER_SECONDS_PER_BYTE * 16 * MB + CPU_DDP_STEP_S
    assert on_fast.exposed_allreduce == pytest.approx(host + rest, rel=1e-9)
    assert on_slow.exposed_allreduce == pytest.approx(link + rest, rel=1e-9)


def test_on_gpus_the_all_reduce_overlaps_the_backward_and_only_the_last_bucket_is_exposed():
    devs = [Device(f"gpu{i}", "K40", 2**33, 4.29e12, 288e9) for i in range(2)]
    gpus = make_cluster(devs, [Link("gpu0", "gpu1", LAT, BW)], name="gpus", simulated=True)
    g = chain(bwd=0.2)  # l3's backward (0.1 s on half the batch) hides its 4 MiB bucket's ring
    for n in g.nodes:
        for key in ("fwd_time", "bwd_time", "opt_time"):
            if key in g.nodes[n]:
                g.nodes[n][key] = {"K40": g.nodes[n][key]["cpu"]}
    problem = compile_problem(g, gpus)
    dp = simulate_data_parallel(problem, 2)
    assert dp.bucket_bytes == [4 * MB, 12 * MB]
    last = ring_allreduce_time(12 * MB, 2, BW, LAT)
    assert dp.exposed_allreduce == pytest.approx(last, rel=1e-6)


def test_half_the_batch_per_replica_halves_the_compute():
    problem = compile_problem(chain(params=0), cluster(2))
    one, two = simulate_data_parallel(problem, 1), simulate_data_parallel(problem, 2)
    assert two.compute_time < 0.55 * one.compute_time


def test_a_replica_that_does_not_fit_says_so():
    problem = compile_problem(chain(params=64 * MB), cluster(2, memory=2**29))
    dp = simulate_data_parallel(problem, 2)
    assert not dp.fits and "does not fit" in dp.describe()
    assert "DDP x2" in dp.describe()


@pytest.mark.parametrize("replicas", [2, 3])
def test_ddp_written_as_a_one_stage_pipeline_simulates_to_ddps_step_on_cpu_ranks(replicas):
    from envs.sim.data_parallel import data_parallel_pipeline
    from envs.sim.hybrid import simulate_pipelined

    problem = compile_problem(chain(6), cluster(replicas))
    devices = list(problem.device_names)
    pipe = data_parallel_pipeline(problem, devices)
    assert pipe.num_stages == 1 and pipe.num_replicas == replicas and pipe.microbatches == 1
    assert pipe.describe() == f"data parallel (DDP over {replicas} replicas)"
    piped, ddp = simulate_pipelined(problem, pipe), simulate_data_parallel(problem, devices)
    assert piped.step_time == pytest.approx(ddp.step_time, rel=1e-12)
    assert piped.peak_memory == pytest.approx(ddp.peak_memory, rel=1e-12)


def test_ddp_written_as_a_one_stage_pipeline_simulates_to_ddps_step_on_gpus():
    from envs.sim.data_parallel import data_parallel_pipeline
    from envs.sim.hybrid import simulate_pipelined
    from tests.helpers.problems import random_problem

    problem = random_problem(n=12, d=4, seed=3)
    gpus = list(problem.device_names[1:])
    piped = simulate_pipelined(problem, data_parallel_pipeline(problem, gpus))
    assert piped.step_time == pytest.approx(simulate_data_parallel(problem, gpus).step_time, rel=1e-12)


def test_a_ddp_winner_is_the_recommendation_and_is_compared_with_placers_own_best():
    import pandas as pd

    from placer.search.baselines.pipeline_rows import recommendation_line

    table = pd.DataFrame([
        {"method": "ddp", "kind": "ddp", "step_time": 0.002, "fits": True, "source": "simulated", "note": ""},
        {"method": "placer (pipeline x DDP)", "kind": "pipeline", "step_time": 0.003, "fits": True,
         "source": "simulated", "note": ""},
        {"method": "heft", "kind": "placement", "step_time": 0.004, "fits": True, "source": "simulated", "note": ""},
    ])
    line = recommendation_line(table, "ddp")
    assert line == ("recommendation: ddp (2.000 ms per step, ddp); the placement placer (pipeline x DDP) is 1.50x "
                    "slower than DDP (2.000 ms, simulated), so the placement written is DDP")


def test_ddp_over_replicas_that_do_not_divide_the_batch_is_a_row_that_does_not_run():
    from placer.search.baselines.pipeline_rows import parallel_records

    problem = compile_problem(chain(), cluster(4))
    records, pipelines = parallel_records(problem, 6, 1.0, search_budget=None)
    ddp = next(r for r in records if r["method"] == "ddp")
    assert not ddp["fits"] and ddp["note"] == "does not run: the batch of 6 does not split into 4 equal replicas"
    assert "ddp" not in pipelines
    records, pipelines = parallel_records(problem, 8, 1.0, search_budget=None)
    assert next(r for r in records if r["method"] == "ddp")["fits"] and "ddp" in pipelines


def test_inputs_that_disagree_on_the_batch_rule_out_ddp_with_the_reason_and_pipelines_keep_it_whole():
    """A flat tensor of every sample's tokens with offsets: the batch read off the first input was
    the 615 tokens, and DDP's row said the batch "does not split into 4 equal replicas"."""
    from graphs.batch_agreement import batch_disagreement
    from placer.search.baselines.pipeline_rows import SEARCH_METHOD, parallel_records

    lengths = torch.randint(5, 30, (32,), generator=torch.Generator().manual_seed(0))
    text = torch.zeros(int(lengths.sum()), dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    why = batch_disagreement((text, offsets, torch.zeros(32, dtype=torch.long)), targets=1)
    assert why is not None and why.startswith(f"the batch is read as {len(text)} along dim 0 of the first input, "
                                              "but input 3, a loss target, holds 32")
    problem = compile_problem(chain(6), cluster(4))
    records, pipelines = parallel_records(problem, len(text), 1.0, search_budget=40, batch_refusal=why)
    ddp = next(r for r in records if r["method"] == "ddp")
    assert not ddp["fits"] and ddp["note"] == f"does not run: {why}" and "ddp" not in pipelines
    assert pipelines and all(p.microbatches == 1 and not p.replicas for p in pipelines.values())
    assert SEARCH_METHOD not in pipelines  # one micro-batch leaves the pipeline search nothing to vary


def test_targets_that_hold_the_batch_agree_in_either_batch_dimension():
    from graphs.batch_agreement import batch_disagreement

    assert batch_disagreement((torch.zeros(8, 5), torch.zeros(8, dtype=torch.long)), targets=1) is None
    # sequence-first: (time, batch) tokens and (time, batch) targets, batch_dim 1
    assert batch_disagreement((torch.zeros(12, 8), torch.zeros(12, 8)), batch_dim=1, targets=1) is None
    # a list of one image per sample: the first input's "batch" is an image's 3 channels
    images = [torch.zeros(3, 16, 16) for _ in range(8)]
    assert "holds 8" in batch_disagreement((images, torch.zeros(8)), targets=1)
    # without targets nothing tells the batch apart
    assert batch_disagreement((images,), targets=0) is None
    # a PyG-style graph batch: every graph's nodes stacked, one integer label per graph
    nodes, batch_vector = torch.zeros(284, 16), torch.repeat_interleave(torch.arange(8), 284 // 8 + 1)[:284]
    why = batch_disagreement((nodes, torch.zeros(2, 852, dtype=torch.long), batch_vector,
                              torch.zeros(8, dtype=torch.long)), targets=1)
    assert why is not None and "holds 8 (tensor[8] int64, integer labels, one per sample)" in why
    # a target no other input confirms (class weights passed as an input) is taken for a constant
    assert batch_disagreement((torch.zeros(8, 5), torch.zeros(8), torch.ones(10)), targets=2) is None


def test_on_one_device_ddp_is_a_row_that_does_not_run_and_never_wins():
    """One replica is no DDP: priced by the pipeline engine's stage costs it came out faster
    than the same one-device placement, won, and had no pipeline to write (a traceback)."""
    from placer.search.baselines.pipeline_rows import parallel_records

    problem = compile_problem(chain(), cluster(1))
    records, pipelines = parallel_records(problem, 8, 1.0, search_budget=None)
    ddp = next(r for r in records if r["method"] == "ddp")
    assert not ddp["fits"] and "ddp" not in pipelines
    assert ddp["note"] == "does not run: DDP needs 2 devices at least; the cluster has 1 it can use"


def test_rows_that_split_the_batch_report_no_ratio_to_the_whole_batch_lower_bound():
    """The lower bound runs the whole batch in one pass; DDP's quarter-batch replicas came out
    at 0.40 of it, a 'bound' a row must never beat."""
    import math

    from placer.search.baselines.pipeline_rows import parallel_records
    from tests.helpers.problems import random_problem

    problem = random_problem(n=12, d=4, seed=3)
    records, pipelines = parallel_records(problem, 8, 1.0, search_budget=None)
    for r in records:
        pipe = pipelines.get(r["method"])
        splits = r["method"] == "ddp" or (pipe is not None and (pipe.microbatches > 1 or pipe.replicas))
        if r["fits"] and splits:
            assert math.isnan(r["ratio_to_lower_bound"]), r
        elif r["fits"]:
            assert r["ratio_to_lower_bound"] >= 1 - 1e-9, r


def test_on_fewer_than_four_devices_the_hybrid_row_says_none_can_exist():
    from placer.search.baselines.pipeline_rows import HYBRID_METHOD, parallel_records

    problem = compile_problem(chain(6), cluster(2))
    records, _ = parallel_records(problem, 8, 1.0, search_budget=40)
    hybrid = next(r for r in records if r["method"] == HYBRID_METHOD)
    assert not hybrid["fits"]
    assert hybrid["note"].startswith("no pipeline x DDP hybrid on 2 devices: one needs 2 stages x 2 replicas")


def test_when_ddp_wins_placers_own_best_is_named_among_rows_tied_at_its_time():
    import pandas as pd

    from placer.search.baselines.pipeline_rows import recommendation_line

    rows = [("ddp", "ddp", 0.001), ("critical_path", "placement", 0.002), ("single", "placement", 0.002),
            ("placer (moves)", "placement", 0.002)]
    table = pd.DataFrame([{"method": m, "kind": k, "step_time": t, "fits": True, "source": "simulated", "note": ""}
                          for m, k, t in rows])
    assert "the placement placer (moves) is 2.00x slower than DDP" in recommendation_line(table, "ddp")


def test_a_winner_faster_than_an_unchecked_ddp_says_ddps_split_was_not_checked():
    import pandas as pd

    from placer.search.baselines.pipeline_rows import recommendation_line

    table = pd.DataFrame([
        {"method": "placer (moves)", "kind": "placement", "step_time": 0.001, "fits": True, "source": "simulated",
         "note": ""},
        {"method": "ddp", "kind": "ddp", "step_time": 0.002, "fits": True, "source": "simulated",
         "note": "4 replicas of 1/4 batch; batch split not checked (slower than the winner)"},
    ])
    line = recommendation_line(table, "placer (moves)")
    assert line.endswith("is 2.00x faster than DDP (2.000 ms, simulated; whether DDP's batch split computes the same "
                         "was not checked)")


def test_one_stage_on_one_gpu_costs_what_the_op_level_simulator_gives_the_same_placement():
    """The engine charged a GPU stage no host constants, so one GPU running the whole step came out
    20 us (the backward call) under the op-level simulator's figure, a 30% edge to DDP and
    pipelines on small models. Now both charge the single-process host overheads."""
    import numpy as np
    import torch

    from envs.hardware.loading import load_cluster
    from envs.sim.simulator import simulate
    from graphs.capture import capture

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    graph = capture(model, (torch.randn(4, 16),), name="mlp").graph
    for preset in ("4xV100-nvlink", "4xK40"):
        problem = compile_problem(graph, load_cluster(preset))
        one_gpu = simulate(problem, np.full(problem.num_nodes, problem.device_names.index("gpu0"))).step_time
        engine = simulate_data_parallel(problem, ["gpu0"]).step_time
        assert engine == pytest.approx(one_gpu, rel=1e-3), preset


def _with_norms(g: nx.DiGraph, channels: dict[str, int]) -> nx.DiGraph:
    for name, c in channels.items():
        g.nodes[name].update(module_type="BatchNorm2d", shape=[8, c, 4, 4])
    return g


def test_a_batchnorms_sync_costs_its_gathers_and_on_cpu_processes_the_waits_and_its_slower_kernels():
    from envs.sim.data_parallel import (
        CPU_GATHER_IN_STEP_S,
        CPU_REPLICA_NORM_EXTRA,
        NORM_STAT_BYTES,
        SLEEPING_WAIT,
        norm_sync_seconds,
    )

    channels = np.array([0.0, 8.0, 0.0, 0.0, 4.0, 0.0])  # BatchNorms at ops 1 and 4
    fwd_op = np.array([1.0, 2.0, 3.0, 0.05, 4.0, 5.0]) * 1e-3
    bwd_op = 2 * fwd_op
    gather = [(LAT + v * NORM_STAT_BYTES / BW) for v in (17.0, 16.0, 9.0, 8.0)]  # 1 + 2C, then 2C
    f, b = norm_sync_seconds(channels, fwd_op, bwd_op, 2, BW, LAT, on_cpu=False)
    assert f.tolist() == pytest.approx([0, gather[0], 0, 0, gather[2], 0])
    assert b.tolist() == pytest.approx([0, gather[1], 0, 0, gather[3], 0])
    f, b = norm_sync_seconds(channels, fwd_op, bwd_op, 2, BW, LAT, on_cpu=True)
    slow = CPU_GATHER_IN_STEP_S - LAT  # a gather inside a CPU step, not the link's latency
    wait, cold, extra = SLEEPING_WAIT.expected_wake_s, SLEEPING_WAIT.cold_factor, CPU_REPLICA_NORM_EXTRA
    # forward: after op 1 the ops 2-3 run cold (3.05 ms), after op 4 op 5 (5 ms); backward:
    # after op 1 op 0 (2 ms), after op 4 ops 2-3 (6.1 ms)
    assert f[1] == pytest.approx(gather[0] + slow + wait + cold * 3.05e-3 + extra * 2e-3)
    assert f[4] == pytest.approx(gather[2] + slow + wait + cold * 5e-3 + extra * 4e-3)
    assert b[1] == pytest.approx(gather[1] + slow + wait + cold * 2e-3 + extra * 4e-3)
    assert b[4] == pytest.approx(gather[3] + slow + wait + cold * 6.1e-3 + extra * 8e-3)
    assert f[[0, 2, 3, 5]].tolist() == b[[0, 2, 3, 5]].tolist() == [0, 0, 0, 0]
    long = norm_sync_seconds(channels, fwd_op * 100, bwd_op * 100, 2, BW, LAT, on_cpu=True)[0]
    assert long[4] == pytest.approx(gather[2] + slow + wait + cold * SLEEPING_WAIT.cold_s + extra * 0.4)  # cold_s caps


def test_ddp_on_cpu_ranks_adds_each_batchnorms_sync_to_its_step():
    plain = compile_problem(chain(4), cluster(2))
    normed = compile_problem(_with_norms(chain(4), {"l1": 64, "l3": 16}), cluster(2))
    extra = simulate_data_parallel(normed, 2).step_time - simulate_data_parallel(plain, 2).step_time
    assert extra > 4 * LAT  # four gathers at least, and on CPU processes their waits
    assert simulate_data_parallel(normed, 1).step_time == simulate_data_parallel(plain, 1).step_time  # nothing to sync


@pytest.mark.parametrize("replicas", [2, 3])
def test_ddp_as_a_one_stage_pipeline_pays_the_same_batchnorm_gathers(replicas):
    from envs.sim.data_parallel import data_parallel_pipeline
    from envs.sim.hybrid import simulate_pipelined

    problem = compile_problem(_with_norms(chain(6), {"l2": 32, "l4": 8}), cluster(replicas))
    devices = list(problem.device_names)
    piped = simulate_pipelined(problem, data_parallel_pipeline(problem, devices))
    assert piped.step_time == pytest.approx(simulate_data_parallel(problem, devices).step_time, rel=1e-12)
    plain = compile_problem(chain(6), cluster(replicas))
    assert piped.step_time > simulate_pipelined(plain, data_parallel_pipeline(plain, devices)).step_time


def test_a_hybrid_syncs_batchnorms_with_one_microbatch_and_not_with_several():
    from envs.sim.hybrid import simulate_hybrid

    def step(graph: nx.DiGraph, m: int) -> float:
        problem = compile_problem(graph, cluster(4))
        names = problem.node_names
        stages = (tuple(names[:4]), tuple(names[4:]))
        pipes = [Pipeline(stages, ("cpu:0", "cpu:1"), m, "gpipe"), Pipeline(stages, ("cpu:2", "cpu:3"), m, "gpipe")]
        return simulate_hybrid(problem, pipes).step_time

    normed = _with_norms(chain(6), {"l1": 32, "l4": 32})
    assert step(normed, 1) > step(chain(6), 1)
    assert step(normed, 2) == step(chain(6), 2)


def test_each_sparse_gradient_costs_glooss_measured_all_reduce_beyond_its_ring_between_cpu_ranks():
    from dataclasses import replace

    from envs.sim.data_parallel import CPU_SPARSE_ALLREDUCE_S

    g = chain()
    for name in ("l0", "l1"):  # two embedding tables whose gradients are 64 KiB of rows
        g.nodes[name].update(sparse_param_bytes=4 * MB, sparse_grad_bytes=64 * 1024)
    problem = compile_problem(g, cluster(2))
    sparse = simulate_data_parallel(problem, 2, ZERO_COSTS)
    assert sum(sparse.bucket_bytes) == pytest.approx(2 * 4 * MB + 2 * 64 * 1024)  # the rows, not the tables
    as_dense = replace(problem, ops=replace(problem.ops, sparse_grad=None))  # the same bytes, dense
    ring_only = simulate_data_parallel(as_dense, 2, ZERO_COSTS)
    assert sparse.step_time - ring_only.step_time == pytest.approx(2 * CPU_SPARSE_ALLREDUCE_S, rel=1e-9)
