"""DDP and pipelines in the comparison table, and the recommendation line (placer.search.baselines.pipeline_rows)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.problem_compile import compile_problem
from graphs.input_batch import batch_size_of
from placer.report.compare import Candidate, comparison_table
from placer.report.terminal_table import _why_none
from placer.search.baselines.pipeline_rows import parallel_rows, recommendation_line, with_parallel_rows

MB = 2**20


def gpus(n: int = 2, memory: float = 2**34):
    devs = [Device(f"gpu{i}", "V100", memory, 1e13, 9e11) for i in range(n)]
    links = [Link(f"gpu{i}", f"gpu{j}", 1e-5, 1e10) for i in range(n) for j in range(i + 1, n)]
    return make_cluster(devs, links, name="gpus")


def chain(k: int = 8, params: float = MB, fwd: float = 1e-3) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_node("x", op="placeholder", out_bytes=MB, requires_grad=False)
    prev = "x"
    for i in range(k):
        g.add_node(f"l{i}", op="call_module", fwd_time={"V100": fwd}, bwd_time={"V100": 2 * fwd},
                   opt_time={"V100": 1e-5}, out_bytes=MB, requires_grad=True, param_bytes=params, flops=1e9)
        g.add_edge(prev, f"l{i}", bytes=MB)
        prev = f"l{i}"
    g.add_node("output", op="output", out_bytes=0, requires_grad=False)
    g.add_edge(prev, "output", bytes=MB)
    return g


def test_batch_size_is_dim_0_of_the_first_tensor_input():
    assert batch_size_of((torch.zeros(16, 3), torch.zeros(2))) == 16
    assert batch_size_of({"ids": [torch.zeros(8, 4)]}) == 8
    assert batch_size_of((3,)) is None


def test_the_table_shows_ddp_and_each_partitioner_and_ddp_wins_on_a_model_that_fits():
    problem = compile_problem(chain(), gpus(2))
    split = np.array([0] * 5 + [1] * 5)  # half the chain on each GPU, no micro-batches
    table = comparison_table(problem, [Candidate("split", split), Candidate("single", np.zeros(10, dtype=int))])
    table = with_parallel_rows(table, problem, batch_size=32)
    assert set(table["kind"]) == {"placement", "ddp", "pipeline"}
    assert {"ddp", "pipeline:even_layers", "pipeline:even_params", "pipeline:pipedream_dp",
            "placer (pipeline search)", "placer (pipeline x DDP)"} <= set(table["method"])
    # The search starts from the partitioners' pipelines, so it is never slower than the
    # partitioner seeds it simulated.
    steps = table.set_index("method")["step_time"]
    assert steps["placer (pipeline search)"] <= steps["pipeline:pipedream_dp"] * (1 + 1e-9)
    ddp = table[table["method"] == "ddp"].iloc[0]
    assert ddp["fits"] and ddp["speedup_vs_single"] > 1.8
    assert table.iloc[0]["kind"] in ("ddp", "pipeline")
    line = recommendation_line(table, "split")
    assert line.startswith("recommendation: ") and "slower than DDP" in line


def test_ddp_that_does_not_fit_is_reported_and_a_pipeline_recommended():
    # Ops long enough that micro-batches pay for adding 4 GiB of gradients per stage (P2b); a stage
    # of five 1 GiB ops needs ~12.5 GiB with the optimizer step's temporaries (P5e), a replica 20+.
    problem = compile_problem(chain(params=1024 * MB, fwd=20e-3), gpus(2, memory=14 * 2**30))
    rows = np.array([0] * 5 + [1] * 5)
    table = with_parallel_rows(comparison_table(problem, [Candidate("split", rows)]), problem, batch_size=32)
    ddp = table[table["method"] == "ddp"].iloc[0]
    assert not ddp["fits"] and "does not fit" in ddp["note"]
    line = recommendation_line(table, "split")
    assert ", pipeline); DDP does not fit" in line and line.startswith("recommendation: ")


def test_a_measured_winner_is_recommended_among_measured_rows_and_a_simulated_ddp_is_named_as_such():
    problem = compile_problem(chain(), gpus(2))
    split = np.array([0] * 5 + [1] * 5)
    table = comparison_table(problem, [Candidate("split", split), Candidate("single", np.zeros(10, dtype=int))])
    table = with_parallel_rows(table, problem, batch_size=32)
    # As a measured run leaves it: the placements measured (slower than simulated), DDP and
    # the pipelines simulated, some of them faster than any measured row.
    placements = table["kind"] == "placement"
    table.loc[placements, "source"] = "measured"
    table.loc[placements, "step_time"] = table.loc[placements, "step_time"] * 3
    ddp_time = float(table[table["method"] == "ddp"]["step_time"].iloc[0])
    assert ddp_time < table.loc[placements, "step_time"].min()
    line = recommendation_line(table, "split")
    best = table[placements].sort_values("step_time").iloc[0]
    assert line.startswith(f"recommendation: {best['method']} (") and ", measured)" in line
    assert f"DDP simulated at {ddp_time * 1e3:.3f} ms, not measured" in line and "slower than DDP" not in line


def test_no_micro_batch_or_ddp_replica_gets_fewer_samples_than_the_model_runs_on():
    problem = compile_problem(chain(), gpus(2))
    split = np.array([0] * 5 + [1] * 5)
    base = comparison_table(problem, [Candidate("split", split), Candidate("single", np.zeros(10, dtype=int))])
    # The model runs on no fewer than 2 samples (batch norm on one, say): batch 8 allows M <= 4
    # per pipeline and R x M <= 4 for a hybrid.
    table, pipelines = parallel_rows(base, problem, batch_size=8, min_samples=2)
    assert pipelines and all(8 // (p.num_replicas * p.microbatches) >= 2 for p in pipelines.values())
    assert table[table["method"] == "ddp"].iloc[0]["fits"]
    # It runs on its whole batch only: no DDP (each replica would get 4), pipelines of M = 1.
    table, pipelines = parallel_rows(base, problem, batch_size=8, min_samples=8)
    ddp = table[table["method"] == "ddp"].iloc[0]
    assert not ddp["fits"] and ddp["note"].startswith("does not run: each of the 2 replicas would get 4 sample(s)")
    assert all(p.microbatches == 1 and p.num_replicas == 1 for p in pipelines.values())
    line = recommendation_line(table, "split")
    assert "DDP does not run: each of the 2 replicas" in line and "does not fit" not in line
    # The terminal table keeps a note's first clause: the reason is in it
    assert "would get 4 sample(s) of the batch of 8, but the model runs on no fewer than 8" in _why_none(ddp["note"])


def test_a_ddp_run_that_failed_is_named_as_such_beside_a_measured_winner():
    problem = compile_problem(chain(), gpus(2))
    table = with_parallel_rows(comparison_table(problem, [Candidate("single", np.zeros(10, dtype=int))]), problem,
                               batch_size=32)
    placements = table["kind"] == "placement"
    table.loc[placements, "source"] = "measured"
    i = table.index[table["method"] == "ddp"][0]
    table.at[i, "note"] = "2 replicas; measurement invalid: the job failed: rank 0 crashed (exit code 1): ValueError"
    line = recommendation_line(table, "single")
    assert "DDP did not run when measured (the job failed: rank 0 crashed (exit code 1): ValueError)" in line


def test_a_measured_rows_ratio_to_the_lower_bound_is_its_simulated_step_over_the_simulated_bound():
    """The bound is the simulator's: a measured step over it mixed two clocks (gym walkthrough)."""
    from envs.sim.lower_bound import lower_bound

    problem = compile_problem(chain(), gpus(2))
    single = np.zeros(10, dtype=int)
    table = comparison_table(problem, [Candidate("measured", single, measured_step_time=123.0)])
    row = table.iloc[0]
    assert row["source"] == "measured" and row["step_time"] == 123.0
    assert row["ratio_to_lower_bound"] == pytest.approx(row["simulated_step_time"] / lower_bound(problem))


def _measured_table(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "kind": k, "step_time": t, "fits": True, "source": "measured", "note": ""}
                         for m, k, t in rows])


def test_a_measured_winner_closer_to_the_next_than_repeat_runs_differ_says_no_measured_difference():
    table = _measured_table([("placer (moves)", "placement", 0.8329), ("heft", "placement", 0.8450),
                             ("ddp", "ddp", 0.8600)])
    line = recommendation_line(table, "placer (moves)", noise=0.05)
    assert ("the next, heft (845.000 ms), is 1.5% slower, less than the 5.0% two runs of one placement differed by: "
            "no measured difference") in line
    assert line.endswith("is 1.03x faster than DDP (860.000 ms, measured) (within the noise of repeat runs)")
    # DDP as the next row is named once, in its own comparison.
    only_ddp = _measured_table([("placer (moves)", "placement", 0.8329), ("ddp", "ddp", 0.8600)])
    assert "the next" not in recommendation_line(only_ddp, "placer (moves)", noise=0.05)


def test_a_measured_gap_beyond_the_repeat_noise_or_without_a_noise_figure_stands_as_it_is():
    table = _measured_table([("placer (moves)", "placement", 0.80), ("heft", "placement", 0.90), ("ddp", "ddp", 1.0)])
    for noise in (0.05, None):
        line = recommendation_line(table, "placer (moves)", noise=noise)
        assert "no measured difference" not in line and "within the noise" not in line
    # Simulated rows carry no run-to-run noise: the figure is never qualified.
    simulated = table.assign(source="simulated", step_time=[0.80, 0.81, 0.82])
    assert "no measured difference" not in recommendation_line(simulated, "placer (moves)", noise=0.05)


def test_placements_timed_in_the_same_runs_are_compared_run_by_run():
    """A winner slower than the next in one run of the final comparison is no measured win,
    whatever the noise figure; one faster in both runs, by more than the gap moved, stands."""
    table = _measured_table([("critical_path", "placement", 0.0080), ("single", "placement", 0.0082)])
    table["measured_runs"] = [(0.0079, 0.0081), (0.0083, 0.0080)]
    line = recommendation_line(table, "critical_path", noise=0.001)
    assert ("the next, single (8.200 ms), is 2.5% slower on average, but +5.1% and -1.2% in the 2 runs of the "
            "final comparison: no measured difference") in line
    table["measured_runs"] = [(0.0079, 0.0081), (0.0082, 0.0084)]
    assert "no measured difference" not in recommendation_line(table, "critical_path", noise=0.10)
