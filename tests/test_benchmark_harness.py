"""The benchmark harness on tiny hand-made problems: columns, files, scenarios, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from envs.hardware.units import format_bytes
from envs.sim.simulator import simulate_batch
from placer.benchmark import (
    COLUMNS,
    BenchCase,
    BenchmarkError,
    MethodOutcome,
    best_single_time,
    expand_methods,
    get_method,
    register_method,
    run_benchmark,
    split_cluster_name,
    tighten,
)
from tests.helpers.arrays import MB, diamond_problem, graph_for

pytestmark = pytest.mark.usefixtures("numpy_simulator")


def _case(**kw) -> BenchCase:
    problem = diamond_problem(param_bytes=np.full(8, 10 * MB), **kw)
    return BenchCase("diamond", "hand3", problem, graph_for(problem))


def test_table_columns_and_files(tmp_path) -> None:
    table = run_benchmark([], [], ["single", "round_robin", "random", "heft", "pipeline_dp"], budget="64",
                          out_dir=tmp_path, cases=[_case()])
    assert list(table.columns) == COLUMNS
    assert set(table["method"]) == {"single", "round_robin", "random", "heft", "pipeline_dp"}
    assert (table["source"] == "simulated").all()
    assert table.loc[table["method"] == "single", "speedup_vs_single"].iloc[0] == pytest.approx(1.0)
    assert (table["ratio_to_lower_bound"].dropna() >= 1 - 1e-9).all()
    assert table.loc[table["method"] == "random", "evaluated"].iloc[0] == 64
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == 5
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("| model") and "heft" in md
    assert (tmp_path / "bars_diamond.png").stat().st_size > 0
    assert (tmp_path / "search_diamond_hand3.png").stat().st_size > 0  # random reports a history


def test_a_model_no_method_fits_gets_its_table_and_no_bar_chart(tmp_path) -> None:
    table = run_benchmark([], [], ["single", "round_robin"], budget="16", out_dir=tmp_path,
                          cases=[_case(capacity=1 * MB)])
    assert not table["fits"].any() and table["note"].str.len().gt(0).all()
    assert (tmp_path / "results.csv").exists() and not (tmp_path / "bars_diamond.png").exists()


def test_step_times_are_the_simulators() -> None:
    case = _case()
    table = run_benchmark([], [], ["single:d1"], cases=[case])
    row = np.full(case.problem.num_nodes, 1)
    assert table["step_time"].iloc[0] == pytest.approx(simulate_batch(case.problem, row[None]).step_time[0])
    peak = table["peak_memory"].iloc[0]
    assert peak.split()[-1] in ("GiB", "MiB", "KiB", "B") and peak.count("/") == 2  # one figure per device


def test_tight_memory_forces_placement_and_reports_none() -> None:
    case = _case()
    n = case.problem.num_nodes
    need = simulate_batch(case.problem, np.zeros((1, n), dtype=np.int64)).peak_memory[0, 0]  # all on one device
    tight = tighten(case.problem, 0.4)
    assert np.all(tight.memory_capacity <= 0.4 * need + 1)
    # never below what the largest node needs alone on a device, in the simulator's memory model
    huge = diamond_problem(param_bytes=np.array([100, 1, 1, 1, 1, 1, 1, 1]) * MB)
    alone = np.zeros((1, n), dtype=np.int64)
    alone[0, 0] = 1
    assert np.all(tighten(huge, 0.1).memory_capacity >= simulate_batch(huge, alone).peak_memory[0, 1])
    ref = best_single_time(case.problem)
    tight_case = BenchCase("diamond", "hand3-tight", tight, case.graph, reference_single=ref, note="memory capped")
    table = run_benchmark([], [], ["single", "m_etf", "pipeline_dp"], cases=[tight_case])
    single = table[table["method"] == "single"].iloc[0]
    assert not single["fits"] and np.isnan(single["step_time"])
    assert f"needs {format_bytes(need)} on one device" in single["note"]  # the simulated peak it lacked
    found = table[table["fits"]]
    assert set(found["method"]) == {"m_etf", "pipeline_dp"}
    assert (found["speedup_vs_single"] > 0).all()


def test_split_cluster_name() -> None:
    assert split_cluster_name("4xK40-tight") == ("4xK40", 0.4)
    assert split_cluster_name("4xK40") == ("4xK40", None)


def test_bad_requests_are_clear_errors(tmp_path) -> None:
    with pytest.raises(BenchmarkError, match="unknown method"):
        run_benchmark([], [], ["nope"], cases=[_case()])
    with pytest.raises(BenchmarkError, match="no methods"):
        run_benchmark([], [], [], cases=[_case()])
    with pytest.raises(BenchmarkError, match="positive"):
        tighten(_case().problem, 0)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BenchmarkError, match="not a directory"):
        run_benchmark([], [], ["single"], out_dir=f, cases=[_case()])


def test_registered_method_and_expansion() -> None:
    def all_on_last(problem, graph, captured, budget, seed, op_to_group):
        return MethodOutcome(np.full(problem.num_nodes, problem.num_devices - 1), "", 0.01, 1)

    register_method("test_all_on_last", all_on_last)
    case = _case()
    table = run_benchmark([], [], ["test_all_on_last", "single:*"], cases=[case])
    assert set(table["method"]) == {"test_all_on_last", "single:d0", "single:d1", "single:d2"}
    assert "m_sct" in expand_methods(["baselines"], case.problem)
    with pytest.raises(BenchmarkError):
        get_method("agent:")


def test_cli_reports_bad_model_without_traceback(capsys, tmp_path) -> None:
    from placer.cli.benchmark import main

    code = main(["--models", "no_such_model", "--clusters", "4xK40", "--out", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and "no_such_model" in err and "Traceback" not in err


def test_a_crashing_method_is_reported_not_fatal() -> None:
    def broken(problem, graph, captured, budget, seed, op_to_group):
        raise ZeroDivisionError("bug in method")

    register_method("test_broken", broken)
    table = run_benchmark([], [], ["test_broken", "single"], cases=[_case()])
    row = table[table["method"] == "test_broken"].iloc[0]
    assert not row["fits"] and "ZeroDivisionError: bug in method" in row["note"]


@pytest.mark.slow
def test_zoo_model_end_to_end(tmp_path) -> None:
    table = run_benchmark(["rnnlm"], ["4xK40", "4xK40-tight"], ["baselines"], out_dir=tmp_path)
    assert set(table["cluster"]) == {"4xK40", "4xK40-tight"}
    tight = table[table["cluster"] == "4xK40-tight"]
    assert not tight[tight["method"] == "single"]["fits"].iloc[0]
    assert tight["fits"].sum() >= 5  # the memory-aware heuristics find placements
    assert (table[table["fits"]]["ratio_to_lower_bound"] >= 1 - 1e-9).all()


@pytest.mark.slow
def test_measured_on_real_cpu(tmp_path) -> None:
    table = run_benchmark(["rnnlm"], ["real"], ["single", "m_etf"], measure=True, out_dir=tmp_path)
    assert (table["source"] == "measured").all()
    assert (table["step_time"] > 0).all()


@pytest.mark.slow
def test_agent_method_runs_through_the_same_table() -> None:
    table = run_benchmark([], [], ["agent:reinforce", "heft"], budget="300", cases=[_case()])
    agent = table[table["method"] == "agent:reinforce"].iloc[0]
    assert agent["fits"] and agent["evaluated"] == 300 and agent["source"] == "simulated"


@pytest.mark.parametrize("argv,message", [
    (["--methods", "single,nope"], "unknown method 'nope'"),
    (["--memory-fraction", "-1"], "--memory-fraction must be a positive"),
    (["--budget", "soon"], "budget"),
    (["--methods", "single,agent:nope"], "unknown agent 'nope'"),
    (["--models", "rnnlm,no_such_model"], "unknown zoo model 'no_such_model'"),
    (["--models", "rnnlm,no/such/net.py"], "model file 'no/such/net.py' does not exist"),
    (["--models", "rnnlm,gpt2", "--size", "huge"], "unknown zoo size 'huge'"),
])
def test_cli_refuses_bad_options_before_preparing(capsys, tmp_path, argv, message) -> None:
    from placer.cli.benchmark import main

    code = main(["--models", "rnnlm", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "preparing" not in err


def test_a_size_given_for_model_files_alone_is_refused_not_ignored(capsys, tmp_path) -> None:
    """--size is the zoo's: with only model files it was accepted and changed nothing."""
    from placer.cli.benchmark import main

    model_file = Path(__file__).resolve().parents[1] / "graphs" / "zoo" / "rnnlm.py"
    code = main(["--models", str(model_file), "--size", "paper", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--size paper sizes zoo models" in err and "preparing" not in err


def test_optimizer_name_reads_the_model_files_optimizer() -> None:
    import torch

    from placer.benchmark import optimizer_name

    class Spec:
        def __init__(self, fn):
            self.optimizer_fn = fn

    assert optimizer_name(Spec(lambda p: torch.optim.Adam(p))) == "adam"
    assert optimizer_name(Spec(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))) == "sgd_momentum"
    assert optimizer_name(Spec(lambda p: torch.optim.SGD(p, lr=0.1))) == "sgd"
    assert optimizer_name(Spec(lambda p: torch.optim.Adagrad(p))) == "adagrad"
    assert optimizer_name(Spec(lambda p: 1 / 0)) == "sgd"


def test_measured_speedups_are_over_the_measured_single_device(monkeypatch) -> None:
    # Measured rows were divided into the *simulated* single-device time: on this CPU the
    # measured "single" row read 0.02x faster than itself.
    from types import SimpleNamespace

    import envs.runtime.measure as measure_module
    from placer.benchmark import run_case
    from tests.helpers.measurers import FakeMeasurer

    problem = diamond_problem(param_bytes=np.full(8, 10 * MB))
    fake = FakeMeasurer(problem, slowdown=(20.0,), overhead=1e-3)
    monkeypatch.setattr(measure_module, "SingleProcessMeasurer", lambda *args, **kwargs: fake)
    case = BenchCase("diamond", "real", problem, graph_for(problem), grouping=SimpleNamespace(expand=dict),
                     source="zoo:diamond", cluster_obj=SimpleNamespace(simulated=False))
    table, _ = run_case(case, ["single", "m_etf"], measure=True)
    assert (table["source"] == "measured").all()
    singles = [fake.measure([{n: d for n in problem.node_names}])[0].step_time for d in problem.device_names]
    expected = min(singles) / table["step_time"]
    assert np.allclose(table["speedup_vs_single"], expected)
    assert table.loc[table["method"] == "single", "speedup_vs_single"].iloc[0] == pytest.approx(1.0)


def test_measuring_a_simulated_spec_is_refused_naming_the_benchmarks_own_option() -> None:
    # The refusal said "--cluster real"; placer benchmark's option is --clusters.
    with pytest.raises(BenchmarkError, match=r"--clusters real") as err:
        run_benchmark(["rnnlm"], ["4xK40"], ["single"], measure=True)
    assert "--cluster " not in str(err.value) + " "


def _ctrl_c(problem, graph, captured, budget, seed, op_to_group):
    raise KeyboardInterrupt  # what the CLI's SIGINT handler raises inside a baseline


def test_a_ctrl_c_in_a_method_stops_the_whole_benchmark_and_writes_the_rows_so_far(tmp_path) -> None:
    # Each Ctrl-C ended only the method under way; every later method and model still ran.
    register_method("test_ctrl_c", _ctrl_c)
    table = run_benchmark([], [], ["single", "test_ctrl_c", "round_robin"], out_dir=tmp_path,
                          cases=[_case(), _case()])
    assert list(table["method"]) == ["single", "test_ctrl_c"]
    assert table.attrs["interrupted"]
    assert "interrupted" in table.loc[table["method"] == "test_ctrl_c", "note"].iloc[0]
    assert list(pd.read_csv(tmp_path / "results.csv")["method"]) == ["single", "test_ctrl_c"]


def test_an_agent_search_stopped_by_ctrl_c_keeps_its_row_and_stops_the_benchmark(monkeypatch) -> None:
    # search() turns the Ctrl-C into stop_reason "interrupted" and returns: the benchmark went on.
    from types import SimpleNamespace

    import placer.search.search as search_module

    problem = _case().problem
    best = np.zeros(problem.num_nodes, dtype=np.int64)
    monkeypatch.setattr(search_module, "search", lambda *a, **k: SimpleNamespace(
        best_row=best, best_fits=True, stop_reason="interrupted", evaluated=7, history=[]))
    table = run_benchmark([], [], ["agent:moves", "single"], cases=[_case(), _case()])
    assert len(table) == 1 and table.attrs["interrupted"]
    row = table.iloc[0]
    assert row["method"] == "agent:moves" and row["fits"] and row["note"] == "stopped: interrupted"


def test_cli_benchmark_first_sigint_stops_everything_writes_rows_and_exits_130(monkeypatch, capsys, tmp_path) -> None:
    import os
    import signal
    import time

    import placer.benchmark as benchmark_module
    from placer.cli.main import main

    def sigint(problem, graph, captured, budget, seed, op_to_group):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the CLI's handler interrupts this at once
        return MethodOutcome(None, "not interrupted")

    register_method("test_sigint", sigint)
    monkeypatch.setattr(benchmark_module, "prepare_cases", lambda *a, **k: [_case(), _case()])
    code = main(["benchmark", "--models", "rnnlm", "--clusters", "4xK40", "--methods", "single,test_sigint,heft",
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted by SIGINT" in err and "Traceback" not in err
    assert list(pd.read_csv(tmp_path / "b" / "results.csv")["method"]) == ["single", "test_sigint"]
