"""benchmarks/gpu_check.py: its pure parts, the H200 preset it writes, and its dry run on this CPU.

The check itself is meant for a GPU machine (issue 19); the dry run (``--device cpu``) walks
every stage here — machine figures, probes, profiles, the roofline comparison, measured and
simulated placements with calibration, the summary, ``--to-preset`` — so the one prepared run
on a GPU is known to work before a GPU is lent.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gc = _load()


# --------------------------------------------------------------------------- pure parts


def _op(cls: str, fwd: float, flops: float = 0.0, moved: float = 0.0, bwd: float | None = None) -> dict:
    return {"class": cls, "fwd": fwd, "bwd": 2 * fwd if bwd is None else bwd, "flops": flops, "bytes_moved": moved}


def test_op_classes_follow_work_against_launch_overhead_then_the_op():
    matmul = {"op": "call_module", "module_type": "Linear", "flops": 1e9, "bytes_moved": 1e6}
    assert gc.classify_op(matmul, "", work_s=1e-3, launch_s=4e-6) == gc.MATMUL
    assert gc.classify_op(matmul, "", work_s=1e-6, launch_s=4e-6) == gc.LAUNCH
    relu = {"op": "call_function", "flops": 1e6, "bytes_moved": 8e6}
    assert gc.classify_op(relu, "relu", work_s=1e-4, launch_s=4e-6) == gc.ELEMENTWISE
    assert gc.classify_op(relu, "bmm", work_s=1e-4, launch_s=4e-6) == gc.MATMUL
    view = {"op": "call_method", "flops": 0, "bytes_moved": 0}
    assert gc.classify_op(view, "view", work_s=0.0, launch_s=4e-6) == gc.NO_WORK


def test_ratio_stats_sum_and_per_op_figures():
    st = gc.ratio_stats([2.0, 4.0, 0.0], [1.0, 1.0, 1.0])
    assert st["n"] == 3 and st["sum_ratio"] == pytest.approx(2.0)
    assert st["median_ratio"] == pytest.approx(3.0)  # the zero measurement is left out per op
    assert st["geo_mean_ratio"] == pytest.approx(np.sqrt(8.0))
    assert st["mape"] == pytest.approx((0.5 + 0.75) / 2)


def test_class_constants_recover_the_efficiency_bandwidth_and_launch_they_were_made_with():
    peak, bw, eff, frac, launch = 50e12, 4e12, 0.6, 0.7, 8e-6
    ops = [_op(gc.LAUNCH, launch * k) for k in (0.9, 1.0, 1.1)]
    ops += [_op(gc.MATMUL, f / (peak * eff) + launch, flops=f, bwd=3 * (f / (peak * eff) + launch))
            for f in (1e9, 4e10, 3e11)]
    ops += [_op(gc.ELEMENTWISE, b / (bw * frac) + launch, moved=b) for b in (1e7, 5e8)]
    fit = gc.fit_class_constants(ops, peak, bw)
    assert fit["launch_overhead_s"] == pytest.approx(launch)
    assert fit["matmul_efficiency"] == pytest.approx(eff)
    assert fit["elementwise_bandwidth_fraction"] == pytest.approx(frac)
    assert fit["backward_factor"][gc.MATMUL] == pytest.approx(3.0)
    assert fit["backward_factor"][gc.NO_WORK] is None and fit["ops"][gc.LAUNCH] == 3


def test_a_tf32_convolution_counts_as_fewer_fp32_flops_so_the_fitted_efficiency_is_not_inflated():
    """The reference roofline runs an fp32 convolution at the H100's TF32 rate; a fit against the
    fp32 peak that took its FLOPs as counted would grant that rate twice in the preset it writes."""
    import networkx as nx

    from envs.hardware.loading import load_cluster
    from envs.sim.cost_model import DEFAULT_ROOFLINE, TF32_CONV_RATE

    device = load_cluster("8xH100").devices[0]
    peak, eff = device.peak_flops, 0.6
    graph = nx.DiGraph()
    for name, conv, flops in (("mm", False, 1e12), ("conv", True, 1e12 * TF32_CONV_RATE["H100"])):
        t = 1e12 / (peak * eff)  # the same time: the conv did its FLOPs at the TF32 rate
        graph.add_node(name, op="call_function", target="torch.mm" if not conv else "torch.conv2d", flops=flops,
                       bytes_moved=1e6, dtype="torch.float32", convolution=conv, fwd_time={"cuda": t},
                       bwd_time={"cuda": 2 * t})
    ops = gc.op_records("m", graph, "cuda", device, DEFAULT_ROOFLINE[device.kind], None)
    assert [op["class"] for op in ops] == [gc.MATMUL, gc.MATMUL]
    assert ops[1]["flops_fp32"] == pytest.approx(1e12)
    assert gc.fit_class_constants(ops, peak, 1e12)["matmul_efficiency"] == pytest.approx(eff)


def test_one_efficiency_roofline_fit_beats_wrong_constants_on_ops_it_came_from():
    peak, bw = 50e12, 4e12
    ops = [_op(gc.MATMUL, f / (peak * 0.5) + 5e-6, flops=f, moved=f / 100) for f in (1e8, 1e10, 1e11, 1e12)]
    ops += [_op(gc.LAUNCH, 5e-6, flops=10.0, moved=100.0) for _ in range(3)]
    fit = gc.fit_roofline(ops, peak, bw)
    assert fit is not None and fit["efficiency"] == pytest.approx(0.5, rel=0.05)
    assert gc.roofline_mape(ops, peak, bw, fit["efficiency"], fit["launch_overhead_s"]) < 0.05
    assert gc.roofline_mape(ops, peak, bw, 0.9, 1e-6) > 0.3


def test_random_rows_move_more_groups_to_the_host_row_by_row():
    rows = gc.random_rows(400, 2, 5, np.random.default_rng(0), host=0)
    shares = [float(np.mean(r == 0)) for r in rows]
    assert shares == sorted(shares) and shares[0] < 0.15 and shares[-1] > 0.7


def test_fit_and_held_out_halves_split_every_placement_once():
    fit, held = gc.split_fit_held(9, seed=3)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(9)) and len(fit) == 4


def test_diagnosis_blames_the_transfer_rule_when_errors_grow_with_cut_edges():
    recs = [{"measured_s": 1.0, "predicted_s": 1.0 + 0.1 * k, "cut_edges": k, "devices_used": 2} for k in range(1, 7)]
    recs.append({"measured_s": 1.0, "predicted_s": 1.02, "cut_edges": 0, "devices_used": 1})
    notes = " ".join(gc.error_diagnosis(recs))
    assert "transfer rule" in notes and "single-device placements: calibrated error +2%" in notes


def test_the_check_imports_nothing_the_gpu_machine_lacks_beyond_the_carried_wheels():
    # On the GPU machine only gymnasium and farama-notifications (carried as wheels) are
    # missing among placer's dependencies; stable-baselines3 and sb3-contrib are not there.
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("stable_baselines3", "sb3_contrib", "pymetis"):
                    raise ImportError("not on the GPU machine: " + name)
                return None
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ROOT)!r})
        import importlib.util
        spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
        m = importlib.util.module_from_spec(spec); sys.modules["gpu_check"] = m; spec.loader.exec_module(m)
        m.preflight()
        wheels = open({str(ROOT / "benchmarks" / "gpu_check_wheels.sh")!r}).read()
        assert "gymnasium==" in wheels and "farama-notifications==" in wheels
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# --------------------------------------------------------------------------- preset


def _results(dry: bool = False) -> dict:
    return {
        "command": "python benchmarks/gpu_check.py --device cuda:0 --out x", "started": "2026-12-05T00:00:00Z",
        "dry_run": dry,
        "stages": {"machine": {"info": {"gpu_name": "NVIDIA H200", "torch": "2.11.0"}, "figures": {
            "devices": [
                {"name": "cpu", "kind": "cpu", "memory_bytes": 128 * 2**30, "peak_flops": 1.1e11, "mem_bandwidth": 1.2e10},
                {"name": "cuda:0", "kind": "cuda", "memory_bytes": 140 * 2**30, "peak_flops": 5.1e13,
                 "mem_bandwidth": 4.1e12}],
            "links": [{"src": "cpu", "dst": "cuda:0", "latency_s": 9e-6, "bandwidth_Bps": 5.0e10},
                      {"src": "cuda:0", "dst": "cpu", "latency_s": 11e-6, "bandwidth_Bps": 4.5e10}]}}},
        "fitted_constants": {"roofline": {"efficiency": 0.62, "launch_overhead_s": 7.5e-6},
                             "launch_overhead_s": 9e-6, "matmul_efficiency": 0.71,
                             "elementwise_bandwidth_fraction": 0.55, "backward_factor": {gc.MATMUL: 2.1},
                             "ops": {gc.MATMUL: 10}, "forward_mape": {"preset": 0.8, "fitted": 0.3}},
    }


def test_preset_has_the_measured_figures_under_the_h200_kind_and_loads(tmp_path):
    from envs.hardware.loading import load_cluster

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "results.json").write_text(json.dumps(_results()))
    yaml_path, side = gc.write_preset(rd, tmp_path / "H200.yaml", "H200")
    cluster = load_cluster(str(yaml_path))
    assert cluster.name == "H200" and cluster.device_names == ["cpu", "gpu0"]
    gpu = cluster.device("gpu0")
    assert gpu.kind == "H200" and gpu.peak_flops == pytest.approx(5.1e13) and gpu.mem_bandwidth == pytest.approx(4.1e12)
    assert cluster.link("cpu", "gpu0").bandwidth_Bps == pytest.approx(5.0e10)
    assert cluster.link("gpu0", "cpu").latency_s == pytest.approx(11e-6)
    constants = json.loads(side.read_text())
    # Without a host-issue probe the launch cost is the least-squares fit's.
    assert constants["roofline"] == {"efficiency": 0.71, "launch_overhead_s": 7.5e-6}
    assert constants["least_squares_fit"] == {"efficiency": 0.62, "launch_overhead_s": 7.5e-6}
    assert "matmul/conv efficiency 0.71" in yaml_path.read_text()


def test_preset_constants_cost_an_unprofiled_h200_op_by_the_roofline(tmp_path):
    from envs.sim.cost_model import DEFAULT_ROOFLINE, CostModel, Roofline, roofline_times

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "results.json").write_text(json.dumps(_results()))
    yaml_path, side = gc.write_preset(rd, tmp_path / "H200.yaml", "H200")
    from envs.hardware.loading import load_cluster

    gpu = load_cluster(str(yaml_path)).device("gpu0")
    attrs = {"op": "call_module", "flops": 2e12, "bytes_moved": 1e9}
    measured = Roofline(**json.loads(side.read_text())["roofline"])
    fwd, _ = CostModel(roofline={"H200": measured}).node_cost(attrs, gpu)
    assert fwd == pytest.approx(roofline_times(attrs, gpu, measured)[0])
    assert fwd == pytest.approx(2e12 / (5.1e13 * 0.71) + 7.5e-6)
    assert "H200" in DEFAULT_ROOFLINE  # a preset of this kind compiles with the default cost model too


def test_roofline_constants_take_the_matmul_efficiency_and_the_host_issue_cost():
    fitted = {"roofline": {"efficiency": 0.4, "launch_overhead_s": 2e-5}, "matmul_efficiency": 0.8}
    chosen, why = gc.roofline_constants(fitted, 5e-6)
    assert chosen == {"efficiency": 0.8, "launch_overhead_s": 5e-6} and "probe" in why["launch_overhead_s"]
    assert gc.roofline_constants({**fitted, "matmul_efficiency": 1.3}, None)[0] == {"efficiency": 1.0,
                                                                                     "launch_overhead_s": 2e-5}
    chosen, why = gc.roofline_constants({**fitted, "matmul_efficiency": None}, None)
    assert chosen["efficiency"] == 0.4 and "least squares" in why["efficiency"]
    with pytest.raises(gc.CheckError):
        gc.roofline_constants({"matmul_efficiency": None}, None)


def test_to_preset_refuses_a_folder_without_results_with_one_line(tmp_path, capsys):
    assert gc.main(["--to-preset", str(tmp_path), str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results.json" in err and err.count("\n") == 1


def test_to_preset_refuses_results_without_fitted_constants(tmp_path):
    res = _results()
    del res["fitted_constants"]
    with pytest.raises(gc.CheckError, match="no fitted roofline constants"):
        gc.preset_from_results(res, "H200", "H200")
    with pytest.raises(gc.CheckError, match="not one of"):
        gc.preset_from_results(_results(), "H200", "B200")


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert gc.main(["--device", "tpu", "--out", str(tmp_path)]) == 2
    assert gc.main(["--device", "cpu", "--out", str(tmp_path), "--models", "alexnet"]) == 2
    assert gc.main(["--device", "cpu", "--out", str(tmp_path), "--placements", "2"]) == 2
    assert gc.main(["--device", "cpu"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)


# --------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("gpu-check-dry")
    rc = gc.main(["--device", "cpu", "--out", str(out), "--models", "rnnlm", "--placements", "5"])
    return rc, out


def test_dry_run_finishes_every_stage_and_writes_results_and_summary(dry_run):
    rc, out = dry_run
    res = json.loads((out / "results.json").read_text())
    assert rc == 0, {k: v.get("error") for k, v in res["stages"].items()}
    assert res["dry_run"] and all(s["status"] == "done" for s in res["stages"].values())
    assert {"machine", "probes", "roofline", "placements rnnlm"} <= set(res["stages"])
    probes = res["stages"]["probes"]
    assert probes["forward_issue_s_per_op"] > 0 and probes["graphmodule_issue_s_per_op"] > 0
    assert probes["backward_s_per_node"] > 0 and probes["backward_on_calling_thread"] == {"cpu": True}
    pipeline = res["stages"]["pipeline"]  # the GPU's rank path is cpu:0's here: the same run
    assert pipeline["agree"] and len(pipeline["runs"]["cpu:0"]["losses"]) == 3
    assert res["stages"]["eval mode"]["agree"] and res["stages"]["factories"]["agree"]
    rates = res["stages"]["machine"]["half_rates"]
    assert set(rates) == {"torch.float16", "torch.bfloat16"} and all(r > 0 for r in rates.values())
    summary = (out / "summary.md").read_text()
    assert "Half-precision matmul (the fp32 one's size): float16 " in summary
    for heading in ("## Machine", "## Runtime probes", "## The pipeline runtime on the device", "## Profiles",
                    "## Tensors made in forward",
                    "## Profiled vs roofline",
                    "## Constants fitted", "## Placements over cpu"):
        assert heading in summary


def test_dry_run_profiles_compares_with_the_roofline_and_fits_constants(dry_run):
    res = json.loads((dry_run[1] / "results.json").read_text())
    labels = [p["label"] for p in res["profiles"]]
    assert labels == ["gpt2-paper", "rnnlm"]
    assert all(p["sum_of_op_times_s"]["cpu"]["forward"] > 0 for p in res["profiles"])
    assert res["ops"] and {op["model"] for op in res["ops"]} == {"gpt2-paper", "rnnlm"}
    assert gc.LAUNCH in res["roofline"]["all"] and "optimizer update" in res["roofline"]["all"]
    fitted = res["fitted_constants"]
    assert fitted["launch_overhead_s"] > 0 and fitted["roofline"]["efficiency"] > 0


def test_dry_run_measures_simulates_and_calibrates_each_placement(dry_run):
    res = json.loads((dry_run[1] / "results.json").read_text())
    [agree] = res["placements"]
    assert agree["model"] == "rnnlm" and agree["measured"] == 5 and agree["valid"] == 5
    hows = [p["how"] for p in agree["placements"]]
    assert hows[:2] == ["single:cpu", "single:cpu1"] and len(set(hows)) == len(hows)
    for p in agree["placements"]:
        assert p["measured_s"] > 0 and p["simulated_s"] > 0 and p["predicted_s"] > 0 and len(p["times_s"]) == 2
    for key in ("raw", "calibrated_held_out", "calibrated_all"):
        assert set(agree[key]) >= {"spearman", "mape"}
    assert res["placement_summary"]["placements_measured"] == 5


def test_dry_run_results_become_a_preset_that_loads(dry_run, tmp_path):
    from envs.hardware.loading import load_cluster

    assert gc.main(["--to-preset", str(dry_run[1]), str(tmp_path / "dry.yaml")]) == 0
    cluster = load_cluster(str(tmp_path / "dry.yaml"))
    assert [d.kind for d in cluster.devices] == ["cpu", "H200"]
    assert "DRY RUN" in (tmp_path / "dry.yaml").read_text()


def test_gpu_results_make_a_summary_with_the_gpu_figures_and_probes(dry_run):
    res = json.loads((dry_run[1] / "results.json").read_text())
    machine = res["stages"]["machine"]
    machine["info"].update({"gpu_name": "NVIDIA H200", "gpu_memory_bytes": 143 * 2**30, "cuda": "13.0",
                            "tf32_matmul": False})
    res["stages"]["probes"].update({"h2d_pageable_host_s": 0.048, "h2d_pinned_host_s": 9e-6, "gpu_busy_s": 0.05,
                                    "d2h_after_busy_host_s": 0.051,
                                    "backward_on_calling_thread": {"cpu": True, "cuda:0": False}})
    text = gc.summary_markdown(res)
    assert "NVIDIA H200 (143 GiB, CUDA 13.0, TF32 matmul off)" in text
    assert "holds the host 48.00 ms (pageable) vs 9.0 µs (pinned)" in text
    assert "Each device alone" in text and "| rnnlm | single:cpu |" in text


def test_a_gpu_is_compared_with_the_h100_preset_and_a_real_machine_makes_a_real_cluster():
    dev, roof = gc.reference_device("cuda")
    assert dev.kind == "H100" and roof.launch_overhead_s == pytest.approx(4e-6)
    figures = _results()["stages"]["machine"]["figures"]
    cluster = gc.cluster_from_figures(figures)
    assert not cluster.simulated and cluster.device_names == ["cpu", "cuda:0"]
    assert cluster.real_device_map() == {"cpu": "cpu", "cuda:0": "cuda:0"}
    assert cluster.link("cuda:0", "cpu").latency_s == pytest.approx(11e-6)


def test_the_gpu_run_profiles_every_model_and_places_24_per_small_model_in_300_s(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = gc.settings_from_args(gc.parse_args(["--out", str(tmp_path)]))
    assert settings.device == "cuda:0" and settings.small == gc.SMALL_MODELS
    assert [label for label, _, _ in settings.paper] == ["gpt2-paper", "nmt2-paper"]
    assert settings.paper[1][2] == {"size": "paper", "layers": 2}
    assert (settings.placements, settings.warmup, settings.repeats, settings.budget_s) == (24, 3, 7, 300.0)
    run_script = (ROOT / "benchmarks" / "gpu_check_run.sh").read_text()
    assert "--device cuda:0" in run_script and "--to-preset" in run_script
    assert 'run(command="bash benchmarks/gpu_check_run.sh", carry=[".whl"], timeout_s=420)' in gc.__doc__
