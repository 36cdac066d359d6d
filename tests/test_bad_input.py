"""Bad input, all of it: every loader answers a bad file with one clean line, never a traceback.

Property tests generate files for each loader — the placement file, the cluster spec, the
profile cache, the model options — and assert exactly one of two outcomes: a valid
result, or a :class:`~graphs.errors.PlacerError` subclass whose message is one non-empty
line. Example tests run the named cases of issue 18 through the CLI: exit status 2, one
line on stderr, no traceback.
"""

from __future__ import annotations

import json
import logging
import math
import string
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from graphs.errors import PlacerError
from graphs.profile.cache import SCHEMA, ProfileCache
from placer.cli.main import main
from placer.options import parse_device_list, parse_memory_limits, parse_model_args
from placer.placement_file import Placement, load_placement, save_placement
from placer.search.budget import parse_budget

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DEEP = 200_000


def _clean_refusal(call):
    """Run ``call``: a value, or a PlacerError with a one-line message; anything else fails the test."""
    try:
        return call()
    except PlacerError as exc:
        message = str(exc)
        assert message.strip(), f"{type(exc).__name__} without a message"
        assert "\n" not in message, f"a multi-line message: {message!r}"
        return exc


# --------------------------------------------------------------------------- strategies

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)

#: Bytes that are not UTF-8 (a stray Latin-1 byte, a truncated sequence, UTF-16).
not_utf8 = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: not _is_utf8(b)),
    st.just(b'{"schema_version": 1, "fingerprint": "caf\xe9"}'),
    st.just('{"name": "x"}'.encode("utf-16")),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _deep(n: int, opener: str = "[", closer: str = "]") -> str:
    return opener * n + closer * n


nested = st.one_of(st.integers(60, 3_000).map(_deep), st.integers(60, 3_000).map(lambda n: '{"a":' * n + "1" + "}" * n))


def _text_file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return path


# --------------------------------------------------------------------------- placement files

VALID_PLACEMENT = {
    "schema_version": 1, "fingerprint": "fp", "devices": ["gpu0", "gpu1"],
    "assignment": {"a": "gpu0", "b": "gpu1"},
    "metadata": {"model": "m", "cluster": "4xK40", "step_time": 0.01, "source": "simulated"},
}

placement_docs = st.one_of(
    json_values,
    st.fixed_dictionaries({
        "schema_version": st.one_of(st.just(1), json_scalars),
        "fingerprint": st.one_of(st.just("fp"), json_values),
        "devices": st.one_of(st.just(["gpu0", "gpu1"]), json_values),
        "assignment": st.one_of(st.just({"a": "gpu0"}), json_values),
        "metadata": st.one_of(
            st.dictionaries(st.sampled_from(["model", "cluster", "step_time", "source", "method", "real_devices",
                                             "simulated_cluster", "phase", "reward", "mine"]), json_values, max_size=4),
            json_values),
    }),
)


def _placement_is_valid(p: Placement) -> None:
    assert isinstance(p.fingerprint, str) and all(isinstance(d, str) for d in p.devices)
    assert set(p.assignment.values()) <= set(p.devices)
    step = p.metadata.get("step_time")
    assert step is None or (isinstance(step, (int, float)) and math.isfinite(step) and step >= 0)
    assert isinstance(p.metadata.get("cluster", ""), str)


@SETTINGS
@given(doc=placement_docs)
def test_any_json_placement_file_loads_valid_or_is_refused_in_one_line(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("p") / "placement.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = _clean_refusal(lambda: load_placement(path))
    if isinstance(result, Placement):
        _placement_is_valid(result)


@SETTINGS
@given(content=st.one_of(not_utf8, nested, st.text(max_size=200)))
@example(content=_deep(DEEP))
@example(content='{"schema_version": 1, "schema_version": 1, "fingerprint": "fp", "devices": [], "assignment": {}}')
def test_any_bytes_as_a_placement_file_are_read_or_refused_in_one_line(tmp_path_factory, content):
    path = _text_file(tmp_path_factory.mktemp("p"), "placement.json", content)
    result = _clean_refusal(lambda: load_placement(path))
    if isinstance(result, Placement):
        _placement_is_valid(result)


@pytest.mark.parametrize("key, value, expected", [
    ("step_time", "fast", "metadata 'step_time' is 'fast'; expected seconds per step"),
    ("cluster", 123, "metadata 'cluster' is 123; expected a cluster name"),
    ("step_time", -1.0, "metadata 'step_time' is -1.0"),
    ("real_devices", {"gpu0": 0}, "metadata 'real_devices'"),
    # apply and --resume rebuilt the model without them, as if none had been recorded
    ("model_args", ["layers", 4], "metadata 'model_args' is ['layers', 4]; expected a mapping of argument names"),
    ("model_args", "layers=4", "metadata 'model_args' is 'layers=4'; expected a mapping of argument names"),
])
def test_wrong_types_in_placement_metadata_are_refused_by_show(tmp_path, capsys, key, value, expected):
    doc = json.loads(json.dumps(VALID_PLACEMENT))
    doc["metadata"][key] = value
    path = _text_file(tmp_path, "placement.json", json.dumps(doc))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("extra", [["--cluster", "4xV100-nvlink"], ["--out", "pics"], ["--size", "paper"]])
def test_show_options_that_need_the_model_are_refused_without_it_not_ignored(tmp_path, capsys, extra):
    path = _text_file(tmp_path, "placement.json", json.dumps(VALID_PLACEMENT))
    assert main(["show", str(path), *extra]) == 2
    captured = capsys.readouterr()
    assert f"{extra[0]} only apply with --model" in captured.err and captured.out == ""


def test_a_placement_whose_step_time_is_null_is_shown_without_a_traceback(tmp_path, capsys):
    """null is a valid step time for the metadata check; show then crashed on float(None)."""
    doc = json.loads(json.dumps(VALID_PLACEMENT))
    doc["metadata"]["step_time"] = None
    path = _text_file(tmp_path, "placement.json", json.dumps(doc))
    assert main(["show", str(path)]) == 0
    assert "step time: not recorded" in capsys.readouterr().out


def test_a_hand_written_placement_without_method_or_source_says_so_in_show(tmp_path, capsys):
    """show printed "method ?" for a placement written by hand with a step time and no method."""
    doc = json.loads(json.dumps(VALID_PLACEMENT))
    doc["metadata"] = {"step_time": 0.002}
    path = _text_file(tmp_path, "placement.json", json.dumps(doc))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2.000 ms (source not recorded), method not recorded" in out and "?" not in out


@pytest.mark.parametrize("content, expected", [
    (b'{"schema_version": 1, "fingerprint": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 41)"),
    (_deep(DEEP).encode(), "nests 200,000 levels deep"),
])
def test_a_placement_file_that_is_not_utf8_or_nested_200000_deep_is_refused_by_show(tmp_path, capsys, content,
                                                                                      expected):
    path = _text_file(tmp_path, "placement.json", content)
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("\n") == 1


def test_a_binary_file_given_as_the_placement_is_refused_naming_json_only(tmp_path, capsys):
    """It said "expected a JSON or YAML text file", and a YAML placement is refused as not valid JSON."""
    path = _text_file(tmp_path, "memory.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("is not UTF-8 text (byte 0x89 at offset 0); expected a JSON text file\n"), err
    assert "YAML" not in err


# --------------------------------------------------------------------------- cluster specs

DEVICE = {"name": "gpu0", "kind": "K40", "memory": "12GiB", "peak_flops": "4.29T", "mem_bandwidth": "288GB/s"}

spec_docs = st.one_of(
    json_values,
    st.fixed_dictionaries({
        "name": st.one_of(st.just("c"), json_values),
        "devices": st.one_of(
            st.lists(st.fixed_dictionaries({k: st.one_of(st.just(v), json_values) for k, v in DEVICE.items()}),
                     min_size=1, max_size=3),
            json_values),
    }),
)


def _cluster_is_valid(c: Cluster) -> None:
    assert isinstance(c.name, str) and c.name.strip()
    for d in c.devices:
        assert isinstance(d.name, str) and d.name
        assert 1 <= d.memory_bytes < 2**63 and 1e6 <= d.peak_flops <= 1e18 and 1e6 <= d.mem_bandwidth <= 1e15


@SETTINGS
@given(doc=spec_docs, fmt=st.sampled_from(["json", "yaml"]))
def test_any_cluster_spec_loads_valid_or_is_refused_in_one_line(tmp_path_factory, doc, fmt):
    import yaml

    text = json.dumps(doc) if fmt == "json" else yaml.safe_dump(doc)
    path = _text_file(tmp_path_factory.mktemp("c"), f"spec.{fmt}", text)
    result = _clean_refusal(lambda: load_cluster(path))
    if isinstance(result, Cluster):
        _cluster_is_valid(result)


@SETTINGS
@given(content=st.one_of(not_utf8, nested, st.text(max_size=200)), suffix=st.sampled_from([".json", ".yaml"]))
@example(content=_deep(DEEP), suffix=".yaml")
@example(content="- " * 5_000 + "x", suffix=".yaml")
def test_any_bytes_as_a_cluster_spec_are_read_or_refused_in_one_line(tmp_path_factory, content, suffix):
    path = _text_file(tmp_path_factory.mktemp("c"), f"spec{suffix}", content)
    result = _clean_refusal(lambda: load_cluster(path))
    if isinstance(result, Cluster):
        _cluster_is_valid(result)


def _spec(name: str = "name: two", gpu0: str = "memory: 12GiB, peak_flops: 4.29T, mem_bandwidth: 288GB/s") -> str:
    return "\n".join([
        name,
        "devices:",
        f"  - {{name: gpu0, kind: K40, {gpu0}}}",
        "  - {name: gpu1, kind: K40, memory: 12GiB, peak_flops: 4.29T, mem_bandwidth: 288GB/s}",
        "default_link: {latency: 10us, bandwidth: 10GB/s}",
    ]) + "\n"


GPU0 = "memory: 12GiB, peak_flops: 4.29T, mem_bandwidth: 288GB/s"


MODEL = textwrap.dedent("""
    import torch

    def get_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def get_example_inputs():
        return (torch.randn(4, 8),)
    """)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    return path


CUDA_MISSING = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("spec, expected", [
    (_spec(name="name: null"), "'name' must be a non-empty string"),
    (_spec(name="name: [a, b]"), "'name' must be a non-empty string"),
    (_spec(name="name: two\nname: three"), "the key 'name' is given twice"),
    (_spec(gpu0=GPU0.replace("4.29T", "1e-300")), "peak_flops '1e-300' is outside what any device has"),
    (_spec(gpu0=GPU0.replace("12GiB", "1e300")), "is too large"),
    (_spec(gpu0=GPU0 + f", real_device: '{CUDA_MISSING}'"), f"'{CUDA_MISSING}' does not exist"),
    (_spec(gpu0=GPU0 + ", real_device: meta"), "is the meta device"),
    (_deep(DEEP), "nests 200,000 levels deep"),
    ("name: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 9); expected a YAML or JSON text file"),
])
def test_a_bad_cluster_spec_stops_optimize_in_one_line_before_any_work(tmp_path, capsys, model_file, spec,
                                                                       expected):
    path = tmp_path / "spec.yaml"
    path.write_bytes(spec.encode("latin-1") if "\xe9" in spec else spec.encode())
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", str(path), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists(), "a run that fails early leaves no output directory"


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_numpy_or_torch_cannot_take_stops_optimize_in_one_line_before_any_work(tmp_path, capsys, model_file,
                                                                                       seed):
    """numpy refused -1 and torch 2**64 only when the search started, with a traceback."""
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), f"--seed={seed}", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --seed must be an integer from 0 to 2**63 - 1, got {seed}\n"
    assert not out.exists()


def test_an_empty_out_is_refused_in_one_line_instead_of_writing_into_the_current_directory(tmp_path, capsys,
                                                                                             model_file):
    assert main(["optimize", str(model_file), "--out", "", "-q"]) == 2
    assert capsys.readouterr().err == "error: --out is empty; expected a directory to write into\n"


@pytest.mark.parametrize("command", ["optimize", "graph"])
def test_a_cache_dir_that_is_a_file_is_refused_in_one_line_before_any_work(tmp_path, capsys, model_file, command):
    """The profiler found out when it first saved a profile: FileExistsError, a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("")
    out = tmp_path / "out"
    extra = ["--out", str(out)] if command == "optimize" else []
    assert main([command, str(model_file), "--cache-dir", str(afile), *extra]) == 2
    assert capsys.readouterr().err == (f"error: cannot write to cache directory {str(afile)!r}: {str(afile)!r} "
                                       "is not a directory\n")
    assert not out.exists()


def test_benchmark_prepares_a_model_file_without_a_size_argument(model_file):
    """--size is the zoo's preset; its default was passed to every model file too, and a file
    whose get_model() takes no `size` was refused."""
    from placer.benchmark import prepare_cases

    [case] = prepare_cases([str(model_file)], ["4xK40"])
    assert case.problem.num_nodes > 0


# --------------------------------------------------------------------------- profile cache

NODES = ("a", "b")


def _cache_file(cache: ProfileCache, nodes: object) -> Path:
    path = cache.path("fp", "in", "cpu", "cpu0")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "fingerprint": "fp", "inputs": "in", "device_kind": "cpu", "device_name": "cpu0",
           "meta": {}, "nodes": nodes}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


times = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.none(), st.text(max_size=3),
                  st.booleans())


@SETTINGS
@given(nodes=st.one_of(json_values, st.dictionaries(st.sampled_from(NODES), st.lists(times, max_size=4), max_size=2)))
def test_a_profile_cache_file_is_used_only_when_every_time_is_a_real_duration(tmp_path_factory, nodes):
    cache = ProfileCache(tmp_path_factory.mktemp("cache"))
    _cache_file(cache, nodes)
    result = cache.load("fp", "in", "cpu", "cpu0", NODES)  # never raises
    if result is not None:
        for fwd, bwd, opt in result[0].values():
            assert all(math.isfinite(t) and t >= 0 for t in (fwd, bwd) + (() if opt is None else (opt,)))


@SETTINGS
@given(content=st.one_of(not_utf8, nested, st.binary(max_size=100)))
@example(content=_deep(DEEP).encode())
def test_an_unreadable_profile_cache_file_is_ignored(tmp_path_factory, content):
    cache = ProfileCache(tmp_path_factory.mktemp("cache"))
    path = cache.path("fp", "in", "cpu", "cpu0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cache.load("fp", "in", "cpu", "cpu0", NODES) is None


@pytest.mark.parametrize("bad", [float("nan"), -1e-3])
def test_a_profile_cache_holding_nan_or_negative_times_is_re_profiled_and_the_log_says_so(tmp_path, caplog, bad):
    cache = ProfileCache(tmp_path)
    _cache_file(cache, {"a": [1e-3, 2e-3, None], "b": [bad, 1e-3, None]})
    with caplog.at_level(logging.WARNING):
        assert cache.load("fp", "in", "cpu", "cpu0", NODES) is None
    assert "re-profiling" in caplog.text and "'b'" in caplog.text
    cache.store("fp", "in", "cpu", "cpu0", {"a": (1e-3, 2e-3, None), "b": (1e-3, 1e-3, None)})
    assert cache.load("fp", "in", "cpu", "cpu0", NODES)[0]["b"] == (1e-3, 1e-3, None)


# --------------------------------------------------------------------------- model options

option_text = st.text(alphabet=string.printable + "é∞", max_size=30)


@SETTINGS
@given(pairs=st.lists(option_text, max_size=4), size=st.one_of(st.none(), option_text))
def test_model_arguments_parse_or_are_refused_in_one_line(pairs, size):
    result = _clean_refusal(lambda: parse_model_args(pairs, size=size))
    if isinstance(result, dict):
        assert all(isinstance(k, str) and k.isidentifier() for k in result)


@SETTINGS
@given(text=option_text)
@example(text="=5")
@example(text="cuda:0=1e300GiB")
def test_budget_memory_and_device_options_parse_or_are_refused_in_one_line(text):
    for parse in (parse_budget, parse_memory_limits, parse_device_list):
        _clean_refusal(lambda parse=parse: parse(text))
    _clean_refusal(lambda: parse_model_args([text]))


# --------------------------------------------------------------------------- devices and --resume


def test_a_placement_naming_a_device_this_machine_lacks_is_refused_by_apply(tmp_path, capsys, model_file):
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "50", "--out", str(out),
                 "--baselines", "single", "-q"]) == 0
    doc = json.loads((out / "placement.json").read_text())
    doc["metadata"]["real_devices"] = {d: ("meta" if i == 0 else CUDA_MISSING) for i, d in enumerate(doc["devices"])}
    (out / "placement.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["apply", str(model_file), str(out / "placement.json"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot use" in err and "Traceback" not in err and err.count("\n") == 1


def test_resume_uses_the_valid_best_placement_next_to_a_corrupt_placement_json(tmp_path, caplog, model_file):
    import placer

    out = tmp_path / "out"
    first = placer.optimize(str(model_file), cluster="4xK40", budget="50", out_dir=out, progress=False,
                            baselines=("single",), verbose=0)
    save_placement(first.placement, out / "best_placement.json")
    (out / "placement.json").write_bytes(b"\xff\xfe{ corrupt")
    with caplog.at_level(logging.WARNING):
        again = placer.optimize(str(model_file), cluster="4xK40", budget="20", out_dir=out, resume=True,
                                progress=False, baselines=("round_robin",), verbose=0)
    assert "skipping placement.json" in caplog.text and "not UTF-8" in caplog.text
    assert again.step_time <= first.step_time * (1 + 1e-9)
    assert load_placement(out / "placement.json").fingerprint == first.placement.fingerprint


def test_resume_into_another_models_folder_is_one_error_without_skipping_lines_first(tmp_path, caplog, capsys,
                                                                                     model_file):
    out = tmp_path / "out"
    other = tmp_path / "other.py"
    other.write_text(model_file.read_text().replace("torch.nn.Linear(8, 8)", "torch.nn.Linear(8, 16)")
                     .replace("torch.nn.Linear(8, 2)", "torch.nn.Linear(16, 2)"))
    assert main(["optimize", str(other), "--cluster", "4xK40", "--budget", "30", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        code = main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "30", "--out", str(out),
                     "--resume", "-q"])
    assert code == 2
    assert "was made for another model" in capsys.readouterr().err
    assert "skipping" not in caplog.text


def test_devices_that_mix_worker_processes_with_this_process_are_refused_naming_both(capsys):
    from placer.cli.main import main

    assert main(["optimize", "zoo:rnnlm", "--devices", "cpu,cpu:0", "--budget", "10"]) == 2
    err = capsys.readouterr().err
    assert "mix worker processes (cpu:0) with devices of this process (cpu)" in err and err.count("\n") == 1


def test_resume_with_a_policy_file_torch_cannot_read_is_one_line(tmp_path, capsys, model_file):
    """A moves.pt of garbage was a 40-line UnpicklingError traceback."""
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--budget", "50", "--baselines", "single", "--out", str(out),
                 "-q"]) == 0
    (out / "moves.pt").write_text("garbage")
    capsys.readouterr()
    assert main(["optimize", str(model_file), "--budget", "50", "--baselines", "single", "--out", str(out),
                 "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot resume from {out / 'moves.pt'}: it is not a policy file placer saved (torch "
                   "cannot read it); expected the moves.pt or policy.zip of an earlier run, or remove it\n")


def test_resume_with_a_policy_file_torch_cannot_read_is_refused_before_the_model_is_loaded(tmp_path, capsys,
                                                                                            model_file, monkeypatch):
    """The unreadable moves.pt was found only once the search started, after the model had been
    captured and profiled (minutes for a large one)."""
    import placer.optimizing.stages as stages

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the policy file was checked")

    monkeypatch.setattr(stages, "load_source", loaded)
    out = tmp_path / "out"
    out.mkdir()
    (out / "moves.pt").write_text("garbage")
    assert main(["optimize", str(model_file), "--budget", "50", "--out", str(out), "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot resume from {out / 'moves.pt'}: it is not a policy file placer saved (torch "
                   "cannot read it); expected the moves.pt or policy.zip of an earlier run, or remove it\n")


@pytest.mark.parametrize("extra, expected", [
    (["--baselines", ""], "error: --baselines '' names no baseline; expected comma-separated names such as "
                          "single,expert,m_etf (leave it out for the default set)\n"),
    (["--baselines", ","], "error: --baselines ',' names no baseline"),
    (["--agent", "hierarchical", "--groups", "3"],
     "error: --groups 3 is fewer than the cluster's 5 devices; the hierarchical agent needs --groups 5 or more\n"),
    (["--groups", "8"],  # the default agent has no grouper: --groups was accepted and changed nothing
     "error: --groups 8 sets how many groups the grouper of --agent hierarchical or --agent reinforce forms; agent "
     "'moves' has no grouper and would ignore it: add --agent hierarchical or --agent reinforce, or leave --groups "
     "out\n"),
    (["--agent", "flat", "--groups", "8"], "error: --groups 8 sets how many groups the grouper of"),
])
def test_options_that_cannot_work_are_refused_in_one_line_before_the_search(tmp_path, capsys, model_file, extra,
                                                                           expected):
    """--baselines '' ran nothing and then said no baseline fits; --groups below the device count
    was refused once the search ran, naming the internal num_groups; --groups with an agent that
    has no grouper was silently ignored."""
    out = tmp_path / "out"
    assert main(["optimize", str(model_file), "--cluster", "4xK40", "--budget", "50", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["optimize", "", "--budget", "10"], "error: the model is empty; expected a model file path (.py) or 'zoo:<name>'\n"),
    (["optimize", "MODEL", "--cluster", "", "--budget", "10"], "error: the cluster is empty; expected a preset ("),
    (["optimize", "MODEL", "--cluster", "4xK40", "--memory", "gpu0=1GB,gpu0=2GB", "--budget", "10"],
     "error: memory limit for 'gpu0' is given twice; expected one DEVICE=SIZE per device\n"),
    (["optimize", "MODEL", "--cluster", "4xK40", "--memory", "", "--budget", "10"],
     "error: --memory is empty; expected DEVICE=SIZE pairs, e.g. 'cuda:0=20GiB,cpu=64GB'\n"),
    (["benchmark", "--models", "", "--clusters", "4xK40"],
     "error: --models is empty; name zoo models or model files (e.g. rnnlm,gpt2), or leave it out for the whole zoo\n"),
])
def test_empty_or_repeated_values_are_refused_in_one_line_naming_what_was_given(tmp_path, capsys, model_file, argv,
                                                                                expected):
    """An empty model or cluster read as '.' ('is a directory'), a memory cap given twice kept the
    last silently, and an empty --models benchmarked the whole zoo (walkthrough)."""
    argv = [str(model_file) if a == "MODEL" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_a_placement_listing_a_device_twice_is_refused(tmp_path):
    doc = {"schema_version": 1, "fingerprint": "fp", "devices": ["cpu", "gpu0", "gpu0"], "assignment": {"a": "gpu0"}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlacerError, match="device 'gpu0' is listed twice in devices; expected each once"):
        load_placement(path)


def test_a_zoo_argument_error_is_the_zoos_words_without_a_code_location(capsys):
    """It read '... raised ZooArgumentError: ... (at presets.py:40 in resolve: raise ZooArgumentError(' (walkthrough)."""
    assert main(["optimize", "zoo:rnnlm", "--size", "huge", "--budget", "10"]) == 2
    assert capsys.readouterr().err == ("error: get_model() in rnnlm.py: rnnlm: unknown size 'huge'; expected one of "
                                       "'small', 'paper'\n")


def test_a_batch_of_no_samples_is_named_as_why_the_loss_is_nan(tmp_path, capsys):
    path = tmp_path / "empty.py"
    path.write_text("import torch\ndef get_model(): return torch.nn.Linear(4, 4)\n"
                    "def get_example_inputs(): return (torch.randn(0, 4),)\n")
    assert main(["optimize", str(path), "--budget", "10"]) == 2
    assert "they hold 0 samples (dim 0 is empty): expected a batch of at least one" in capsys.readouterr().err


def test_a_loss_that_fails_names_its_line_and_not_placers_call_of_it(tmp_path, capsys):
    path = tmp_path / "badloss.py"
    path.write_text(textwrap.dedent("""
        import torch
        def get_model(): return torch.nn.Linear(4, 3)
        def get_example_inputs(): return (torch.randn(2, 4), torch.randint(0, 3, (2,)))
        def get_loss(out, x, y):
            return torch.nn.functional.cross_entropy(out, x)
        """))
    assert main(["optimize", str(path), "--budget", "10"]) == 2
    err = capsys.readouterr().err
    assert "(at badloss.py:6 in get_loss: return torch.nn.functional.cross_entropy(out, x))" in err

    path.write_text(path.read_text().replace("def get_loss(out, x, y):", "def get_loss(out):"))
    assert main(["optimize", str(path), "--budget", "10"]) == 2
    err = capsys.readouterr().err
    assert "get_loss() takes 1 positional argument but 3 were given;" in err and "trainable.py" not in err
