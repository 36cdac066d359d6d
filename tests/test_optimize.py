"""End to end: capture → search → apply → train step, through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import placer
from graphs.errors import PlacerError
from placer.cli.main import main
from tests.helpers.model_files import BRANCHING_NET

BUDGET = "300"  # placements: seconds of search, enough to exercise every stage


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(BRANCHING_NET)
    return path


@pytest.fixture(scope="module")
def result(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return placer.optimize(str(model_file), cluster="4xK40", budget=BUDGET, out_dir=out, progress=False,
                           baselines=("single", "round_robin", "m_etf"), verbose=0)


def test_optimize_writes_every_result_file(result):
    files = {p.name for p in result_dir(result).iterdir()}
    assert {"placement.json", "best_placement.json", "comparison.csv", "report.md",
            "placed_graph.png", "memory.png", "schedule.png"} <= files
    report = (result_dir(result) / "report.md").read_text()
    assert "simulated" in report and "## Comparison" in report and "single" in report


def test_the_stage_timings_name_every_long_stage_the_pipeline_search_included(result):
    """-v prints result.seconds: the pipeline search, as long as the placement search with a
    placement budget, was missing from it."""
    assert {"prepare", "baselines", "search", "pipelines", "check"} <= set(result.seconds)
    assert all(v >= 0.0 for v in result.seconds.values())


def result_dir(result):
    return result.search.best_path.parent


def test_the_winner_is_at_least_as_fast_as_every_baseline(result):
    table = result.compare()
    fitting = table[table["fits"]]
    assert result.step_time == pytest.approx(fitting["step_time"].min())
    assert set(table["method"]) >= {"single", "round_robin", "m_etf", "placer (moves)"}
    assert result.source == "simulated"


def test_the_applied_winner_trains_exactly_like_the_original(result):
    assert result.check is not None and result.check.ok, result.check.describe()
    spec = result.prepared.spec
    reference = __import__("copy").deepcopy(spec.model)
    placed = result.apply()
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt_placed = torch.optim.SGD(placed.parameters(), lr=0.1)
    (x,) = spec.example_inputs
    for _ in range(3):
        for module, opt in ((reference, opt_ref), (placed, opt_placed)):
            opt.zero_grad()
            module(x).pow(2).mean().backward()
            opt.step()
    torch.testing.assert_close(placed(x), reference(x), rtol=1e-5, atol=1e-6)
    ref_params = dict(reference.named_parameters())
    for name, p in placed.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6)


def test_a_saved_placement_loads_and_applies_in_user_code(result, model_file):
    spec = result.prepared.spec
    path = result_dir(result) / "placement.json"
    placement = placer.load(path, model=spec.model, example_inputs=spec.example_inputs)
    assert placement.assignment == result.placement.assignment
    placed = placer.apply(spec.model, placement, example_inputs=spec.example_inputs)
    torch.testing.assert_close(placed(*spec.example_inputs), spec.model(*spec.example_inputs))


def test_a_placement_for_another_model_is_refused(result):
    other = torch.nn.Sequential(torch.nn.Linear(32, 10))
    with pytest.raises(PlacerError, match="fingerprint|another model|not for"):
        placer.load(result_dir(result) / "placement.json", model=other, example_inputs=(torch.randn(2, 32),))


def test_a_placement_on_devices_the_given_cluster_lacks_is_a_placement_file_error(result):
    """placer.load's documented error for unknown devices (a PlacerError, so either catch works)."""
    from placer.placement_file import PlacementFileError

    spec = result.prepared.spec
    lone = {"name": "lone", "devices": [{"name": "z", "kind": "cpu", "memory": "1GiB", "peak_flops": "1T",
                                          "mem_bandwidth": "10GB/s"}]}
    with pytest.raises(PlacementFileError, match="does not define"):
        placer.load(result_dir(result) / "placement.json", model=spec.model, example_inputs=spec.example_inputs,
                    cluster=lone)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "soon"], "cannot read budget"),
        (["--cluster", "9xTPU"], "9xTPU"),
        (["--baselines", "single,telepathy"], "unknown baseline 'telepathy'"),
        (["--reward", "measured", "--cluster", "4xK40"], "needs real devices"),
        (["--memory", "gpu9=1GiB", "--cluster", "4xK40"], "unknown device"),
        (["--devices", "cpu,cuda:7"], "not present"),
    ],
)
def test_bad_options_fail_fast_with_one_clear_message(model_file, tmp_path, capsys, argv, message):
    code = main(["optimize", str(model_file), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_an_unwritable_output_directory_is_refused(model_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["optimize", str(model_file), "--out", str(blocker / "sub")])
    assert code == 2
    assert "cannot write to output directory" in capsys.readouterr().err


def test_an_output_directory_that_cannot_be_created_is_refused_before_any_work(model_file, capsys, monkeypatch):
    """/proc passes os.access for root (mode bits) but no folder can be made there: the run
    used to capture, profile and search before finding out."""
    import placer.optimizing.stages as stages

    monkeypatch.setattr(stages, "resolve_cluster", lambda *a, **k: pytest.fail("the run started"))
    code = main(["optimize", str(model_file), "--out", "/proc/placer-no-such-dir/out"])
    assert code == 2
    assert "cannot write to output directory '/proc/placer-no-such-dir/out'" in capsys.readouterr().err


def test_cli_optimize_then_apply_then_show(model_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", BUDGET, "--out", str(out),
                 "--baselines", "single,m_etf", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "simulated" in printed
    saved = json.loads((out / "placement.json").read_text())
    assert saved["fingerprint"] and saved["metadata"]["cluster"] == "4xK40"

    assert main(["apply", str(model_file), str(out / "placement.json"), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "step time: median" in printed and "losses" in printed

    assert main(["show", str(out / "placement.json"), "--model", str(model_file), "--out", str(tmp_path / "pics")]) == 0
    printed = capsys.readouterr().out
    assert "simulated on 4xK40" in printed
    assert (tmp_path / "pics" / "placed_graph.png").exists()


def test_resume_starts_from_the_saved_placement_and_never_gets_worse(result, model_file):
    out = result_dir(result)
    again = placer.optimize(str(model_file), cluster="4xK40", budget="50", out_dir=out, resume=True,
                            progress=False, baselines=("round_robin",), verbose=0)
    assert again.step_time <= result.step_time * (1 + 1e-9)


TINY_MODEL = """
import torch


def get_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def get_example_inputs():
    return (torch.randn(4, 8),)
"""


def test_a_graph_with_fewer_groups_than_devices_is_still_searched(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    result = placer.optimize(str(path), cluster="4xK40", budget="100", out_dir=tmp_path / "out",
                             progress=False, baselines=("single",), verbose=0)
    assert result.problem.num_nodes < result.problem.num_devices
    assert result.check.ok and (tmp_path / "out" / "placement.json").exists()


def test_measured_rows_decide_the_winner_when_there_are_any():
    import pandas as pd

    from placer.optimizing.winner import pick_winner

    table = pd.DataFrame({
        "method": ["critical_path", "m_etf", "single"],
        "step_time": [0.0031, 0.0063, 0.0099],
        "source": ["simulated", "measured", "measured"],
    })
    assert pick_winner(table)["method"] == "m_etf"
    assert pick_winner(table.assign(source="simulated"))["method"] == "critical_path"


def test_resume_starts_from_a_faster_best_placement_beside_an_older_placement_json(tmp_path):
    """A resumed run that was killed leaves a better best_placement.json beside the older
    placement.json; the next --resume read placement.json alone and its search lost the better one."""
    from placer import write_failure
    from placer.placement_file import Placement, save_placement

    out = tmp_path / "out"
    first = placer.optimize("zoo:nmt", cluster="4xK40", budget="300", out_dir=out, progress=False,
                            baselines=("single",), verbose=0, check=False)
    problem, grouping = first.problem, first.prepared.grouping
    node = {n: i for i, n in enumerate(problem.node_names)}
    best = {op: problem.device_names[int(first.search.best_row[node[g]])] for op, g in grouping.op_to_group.items()}
    meta = {"model": "nmt", "cluster": "4xK40", "model_args": {"size": "small"}, "source": "simulated"}
    save_placement(Placement(best, first.placement.fingerprint, list(first.placement.devices),
                             {**meta, "step_time": first.search.best_step_time}), out / "best_placement.json")
    older = {op: "gpu0" for op in best}  # what the run before the killed one had kept
    save_placement(Placement(older, first.placement.fingerprint, list(first.placement.devices), meta),
                   out / "placement.json")
    write_failure._WRITTEN_HERE.clear()  # the resumed run is another process
    again = placer.optimize("zoo:nmt", cluster="4xK40", budget="5", out_dir=out, resume=True, progress=False,
                            baselines=("single",), verbose=0, check=False)
    table = again.compare().set_index("method")
    assert table.loc["placer (moves)", "step_time"] <= first.search.best_step_time * (1 + 1e-9)


def test_placer_apply_of_a_pipelined_placement_says_it_runs_un_pipelined(caplog):
    """The README's training-script example loads the worked example's placement.json, a
    pipeline: placer.apply ran its stages one after the other in this process, saying nothing
    (`placer apply` notes it; placer.place logs it)."""
    import logging

    from envs.sim.pipeline_layout import Pipeline
    from placer.placement_file import Placement

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(4, 8)
    found = placer.optimize(model, (x,), cluster="4xK40", budget="20", progress=False, verbose=0,
                            baselines=("single",), check=False)
    nodes = list(found.prepared.captured.gm.graph.nodes)
    half = len(nodes) // 2
    stages = (tuple(n.name for n in nodes[:half]), tuple(n.name for n in nodes[half:]))
    assignment = {n: "gpu0" for n in stages[0]} | {n: "gpu1" for n in stages[1]}
    piped = Placement(assignment, found.placement.fingerprint, list(found.placement.devices),
                      {"cluster": "4xK40"}, pipeline=Pipeline(stages, ("gpu0", "gpu1"), 1, "gpipe"))
    with caplog.at_level(logging.WARNING, logger="placer"):
        placed = placer.apply(model, piped, example_inputs=(x,))
    torch.testing.assert_close(placed(x), model(x))
    assert "pipelined (2 stages, gpipe, M=1); placer.apply runs its stages' assignment un-pipelined" in caplog.text


def test_resume_in_the_same_process_keeps_the_pipeline_best_placement_json_held(tmp_path):
    """The search's first improvement replaced best_placement.json (this process had written it),
    and the pipeline search read it afterwards: the resumed pipelines started without the
    earlier run's best (2.052 ms where 1.925 ms had been on disk, zoo:nmt)."""
    from placer.placement_file import load_placement, save_placement

    out = tmp_path / "out"
    first = placer.optimize("zoo:nmt", cluster="4xK40", budget="300", out_dir=out, progress=False,
                            baselines=("single",), verbose=0, check=False)
    assert first.placement.pipeline is not None  # the small NMT's winner is a pipeline
    older = load_placement(out / "placement.json")  # as if the run before had kept an un-pipelined one
    save_placement(type(older)({op: "gpu0" for op in older.assignment}, older.fingerprint, list(older.devices),
                               {k: v for k, v in older.metadata.items() if k != "step_time"}), out / "placement.json")
    again = placer.optimize("zoo:nmt", cluster="4xK40", budget="5", out_dir=out, resume=True, progress=False,
                            baselines=("single",), verbose=0, check=False)
    table = again.compare().set_index("method")
    assert table.loc["placer (pipeline search)", "step_time"] <= first.step_time * (1 + 1e-9)
