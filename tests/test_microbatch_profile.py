"""The micro-batch profile (graphs.profile.batch_scaling): each op's fixed part measured on real small
models, carried by the graph and its files, compiled into the problem, and taken by optimize and show
over CPU processes so a pipeline has one step time."""

from __future__ import annotations

import logging
import re
import textwrap

import numpy as np
import pytest
import torch

import placer
from envs.runtime.distributed import rank_cluster as rank_cluster_module
from envs.sim.cost_model import CPU_DISPATCH_S
from envs.sim.problem_compile import compile_problem
from graphs.graph_io import load_graph, save_graph
from graphs.input_batch import batch_size_of
from graphs.pipeline import load_source, prepare
from graphs.profile.batch_scaling import microbatch_ratio, min_microbatch_samples, slice_batch
from placer.cli.main import main as cli_main
from tests.helpers.measurers import fixed_links
from tests.helpers.pipelines import cpu_cluster

#: A chain wide enough that two pipeline stages beat one process (batch 1024, profiled again at 128).
WIDE_CHAIN = textwrap.dedent("""
    import torch

    def get_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                   torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                   torch.nn.Linear(512, 8))

    def get_example_inputs():
        torch.manual_seed(1)
        return (torch.randn(1024, 256),)
    """)

#: A model whose reshape was written for its batch of 16: it cannot run on fewer samples.
BAKED_BATCH = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 32)
            self.b = torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).reshape(16, 4, 8).reshape(16, 32))

    def get_model():
        torch.manual_seed(0)
        return Net()

    def get_example_inputs():
        return (torch.randn(16, 32),)
    """)


#: A chain with batch norm: it trains on 2 samples or more, not on 1.
NORM_CHAIN = textwrap.dedent("""
    import torch

    def get_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 4))

    def get_example_inputs():
        torch.manual_seed(1)
        return (torch.randn(8, 16),)
    """)


def test_a_model_that_fails_on_one_sample_gets_micro_batches_of_the_fewest_it_runs_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "norm.py").write_text(NORM_CHAIN)
    graph = prepare(str(tmp_path / "norm.py"), microbatch_profile=True).captured.graph
    # Batch 8 profiled again at 1 sample: batch norm in training refuses one value per channel.
    assert "does not run on 1 of its 8 samples" in graph.graph["batch_scaling"]["skipped"]
    assert min_microbatch_samples(graph) == 2
    graph.graph.pop("batch_scaling")
    assert min_microbatch_samples(graph) == 1


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(rank_cluster_module, "measure_links", fixed_links)
    (tmp_path / "wide.py").write_text(WIDE_CHAIN)
    (tmp_path / "baked.py").write_text(BAKED_BATCH)
    return tmp_path


def test_the_ratio_is_the_largest_divisor_up_to_eight_and_inputs_are_cut_along_dim_0():
    assert [microbatch_ratio(b) for b in (64, 12, 10, 7, 13, 1)] == [8, 6, 5, 7, None, None]
    x, mask = torch.randn(12, 3), torch.ones(3)
    cut = slice_batch((x, mask, 5), 12, 2)
    assert torch.equal(cut[0], x[:2]) and cut[1] is mask and cut[2] == 5
    assert batch_size_of(({"ids": x},)) == 12 and batch_size_of((3,)) is None


def test_the_profiled_graph_carries_fixed_parts_that_survive_its_files(model_dir):
    prep = prepare(str(model_dir / "wide.py"), microbatch_profile=True)
    graph = prep.captured.graph
    assert graph.graph["batch_scaling"]["ratio"] == 8 and graph.graph["batch_scaling"]["batch"] == 128
    compute = [n for n, a in graph.nodes(data=True) if a.get("op") in ("call_module", "call_function")]
    for n in compute:
        a = graph.nodes[n]
        assert 0.0 <= a["fwd_fixed"]["cpu"] <= a["fwd_time"]["cpu"]
        assert 0.0 <= a["bwd_fixed"]["cpu"] <= a["bwd_time"]["cpu"]
    # Linear layers on 128 of 1024 samples do not cost 1/8: some of every op is fixed, more than dispatch.
    assert sum(graph.nodes[n]["fwd_fixed"]["cpu"] for n in compute) > len(compute) * CPU_DISPATCH_S
    problem = compile_problem(graph, cpu_cluster(2))
    for suffix in ("json", "graphml"):
        back = load_graph(save_graph(graph, model_dir / f"g.{suffix}"))
        assert back.graph["batch_scaling"] == graph.graph["batch_scaling"]
        for n in compute:
            assert back.nodes[n]["fwd_fixed"] == graph.nodes[n]["fwd_fixed"]
            assert back.nodes[n]["bwd_fixed"] == graph.nodes[n]["bwd_fixed"]
        assert np.array_equal(compile_problem(back, cpu_cluster(2)).ops.fixed_parts(), problem.ops.fixed_parts())
    # A second preparation reads both profiles from the cache: the same fixed parts.
    again = prepare(str(model_dir / "wide.py"), microbatch_profile=True).captured.graph
    assert again.graph["batch_scaling"]["cached"]
    assert all(again.nodes[n]["fwd_fixed"] == graph.nodes[n]["fwd_fixed"] for n in compute)


def test_a_model_that_cannot_run_on_a_micro_batch_keeps_the_default_rule_and_says_why(model_dir, caplog, capfd):
    with caplog.at_level(logging.WARNING, logger="graphs.profile.batch_scaling"):
        prep = prepare(str(model_dir / "baked.py"), microbatch_profile=True)
    # One log line says it; torch.fx printed each failed probe's traceback to stderr besides.
    assert "Traceback" not in capfd.readouterr().err
    graph = prep.captured.graph
    assert "does not run on 2 of its 16 samples" in graph.graph["batch_scaling"]["skipped"]
    # Nor on 4 or 8: micro-batches and DDP replicas keep the whole batch.
    assert min_microbatch_samples(graph) == 16
    assert any("micro-batch profile skipped" in r.getMessage() and "16 samples" in r.getMessage()
               for r in caplog.records)
    assert not any("fwd_fixed" in a for _, a in graph.nodes(data=True))
    problem = compile_problem(graph, cpu_cluster(2))
    assert np.all(problem.ops.fixed_parts() == np.minimum(problem.ops.cost[:, :, (0, 2)], CPU_DISPATCH_S))


def test_optimize_over_cpu_processes_simulates_with_the_measured_fixed_parts_and_show_agrees(model_dir, capsys,
                                                                                           numpy_simulator):
    out = model_dir / "out"
    spec = load_source(str(model_dir / "wide.py"))  # a module, not the file: nothing is measured
    profiles = model_dir / "profiles"  # show must read the profiles optimize was given, not profile again
    result = placer.optimize(spec.model, spec.example_inputs, devices="cpu:0,cpu:1", budget="60", reward="simulated",
                             baselines="single", out_dir=out, seed=0, check=False, progress=False, cache_dir=profiles)
    graph = result.prepared.captured.graph
    assert graph.graph["batch_scaling"]["ratio"] == 8
    problem = result.problem
    measured = np.array([[graph.nodes[n].get("fwd_fixed", {}).get("cpu", np.nan) for n in problem.ops.names]]).T
    has = ~np.isnan(measured[:, 0])
    assert has.sum() >= 7
    assert problem.ops.fixed_parts()[has, 0, 0] == pytest.approx(np.minimum(measured[has, 0], problem.ops.cost[has, 0, 0]))
    pipe = result.placement.pipeline
    assert pipe is not None, result.table[["method", "step_time"]].to_string()
    capsys.readouterr()
    code = cli_main(["show", str(out / "placement.json"), "--model", str(model_dir / "wide.py"),
                     "--out", str(model_dir / "pics"), "--cache-dir", str(profiles)])
    shown = capsys.readouterr().out
    assert code == 0, shown
    step = re.search(r"(?:pipelined|data parallel) \(.*?\): ([0-9.]+) ms per step", shown)  # DDP is one too
    assert step is not None, shown
    assert float(step.group(1)) == pytest.approx(result.step_time * 1e3, abs=6e-4)


@pytest.mark.parametrize("sitting, share", [(1.0, 0.0), (1.3, 0.3 / 7)])
def test_a_small_profile_taken_on_a_slower_machine_is_not_read_as_fixed_work(model_dir, monkeypatch, sitting, share):
    """The small profile reads 30% dearer per sample than the full one: pure drift when the whole
    steps, timed in one sitting, cost 1/8 at 1/8 of the batch (no fixed part), real when they
    too cost 1.3/8 (every op 0.3/7 fixed: (8 * 1.3/8 - 1) / 7)."""
    import graphs.profile.batch_scaling as batch_scaling
    from graphs.profile.batch_scaling import profile_fixed_parts

    prep = prepare(str(model_dir / "wide.py"))
    graph = prep.captured.graph
    full = {n: (a["fwd_time"]["cpu"], a["bwd_time"]["cpu"]) for n, a in graph.nodes(data=True) if "fwd_time" in a}
    monkeypatch.setattr(batch_scaling, "in_situ_times",
                        lambda gm, inputs, dev, repeats: {n: (1.3 * f / 8, 1.3 * b / 8) for n, (f, b) in full.items()})
    monkeypatch.setattr(batch_scaling, "step_ratio", lambda gm, big, small, dev: sitting / 8)
    assert profile_fixed_parts(prep.captured, prep.spec.example_inputs, use_cache=False) is not None
    for n, (f, b) in full.items():
        assert graph.nodes[n]["fwd_fixed"]["cpu"] == pytest.approx(share * f, rel=1e-6, abs=1e-12)
        assert graph.nodes[n]["bwd_fixed"]["cpu"] == pytest.approx(share * b, rel=1e-6, abs=1e-12)


def test_the_micro_batch_profile_measures_what_accumulating_into_grad_costs_and_the_simulator_reads_it(model_dir,
                                                                                                        monkeypatch):
    import graphs.profile.batch_scaling as batch_scaling
    from envs.sim.problem_compile import compile_problem
    from graphs.profile.batch_scaling import profile_fixed_parts
    from tests.helpers.pipelines import cpu_cluster

    prep = prepare(str(model_dir / "wide.py"))
    monkeypatch.setattr(batch_scaling, "accumulate_seconds", lambda gm, inputs, dev: 0.0123)
    assert profile_fixed_parts(prep.captured, prep.spec.example_inputs, use_cache=False) is not None
    graph = prep.captured.graph
    assert graph.graph["batch_scaling"]["accumulate_s"] == {"cpu": 0.0123}
    problem = compile_problem(graph, cpu_cluster(2))
    # Shared among the ops that own parameters, by their bytes: the whole model's 12.3 ms.
    assert problem.ops.accumulate[:, 0, 0].sum() == pytest.approx(0.0123)
    assert problem.ops.accumulate[:, :, 1].sum() == 0.0
