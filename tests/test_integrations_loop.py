"""placer.place: the placed model trains like the original; the second call reuses the cached placement."""

from __future__ import annotations

import copy

import pytest
import torch

import placer
from graphs.capture import capture
from graphs.errors import PlacerError
from placer.integrations import loop
from tests.helpers.keyword_models import Masked
from tests.helpers.model_files import FUNCTION_MODEL


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(32, 128), torch.nn.ReLU()]
    for _ in range(4):
        layers += [torch.nn.Linear(128, 128), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(128, 10))


def _train(model: torch.nn.Module, steps: int = 5) -> list[float]:
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_place_trains_like_the_model_and_caches(tmp_path, monkeypatch):
    import placer.optimizing.run as optimizing

    calls = []
    real_optimize = optimizing.optimize

    def counting_optimize(*args, **kwargs):
        calls.append(kwargs.get("budget"))
        return real_optimize(*args, **kwargs)

    monkeypatch.setattr(optimizing, "optimize", counting_optimize)
    model = _model()
    reference = copy.deepcopy(model)
    x = torch.randn(16, 32)

    placed = placer.place(model, (x,), cluster="4xK40", budget="300", cache_dir=tmp_path)
    info = placed.placer_place_info
    assert not info.cache_hit and calls == ["300"] and info.cache_path.exists()
    assert info.simulated and info.source == "simulated" and info.step_time > 0
    assert _train(placed) == pytest.approx(_train(reference), rel=1e-5)

    again = placer.place(model, x, cluster="4xK40", budget="300", cache_dir=tmp_path)
    assert again.placer_place_info.cache_hit and len(calls) == 1  # no second search
    assert again.placer_place_info.placement.assignment == info.placement.assignment

    # Another device list is another cache entry; the environment variable moves the default cache.
    monkeypatch.setenv("PLACER_CACHE_DIR", str(tmp_path / "env"))
    assert loop.default_cache_dir() == tmp_path / "env" / "placements"


def test_cache_key_depends_on_devices():
    from envs.hardware.loading import load_cluster

    a = loop.cache_key("abc", load_cluster("4xK40"))
    b = loop.cache_key("abc", load_cluster("8xK40"))
    assert a.startswith("abc-") and a != b


def test_damaged_cache_entry_is_ignored(tmp_path):
    from envs.hardware.loading import load_cluster
    from graphs.capture import capture

    model, x = _model(), torch.randn(16, 32)
    cluster = load_cluster("4xK40")
    path = tmp_path / f"{loop.cache_key(capture(model, (x,)).fingerprint, cluster)}.json"
    path.write_text("{not json")
    assert loop._read_cache(path, capture(model, (x,)), cluster) is None


def test_place_bad_input():
    with pytest.raises(PlacerError, match="nn.Module"):
        placer.place("model.py", (torch.randn(2),), cluster="4xK40")
    with pytest.raises(PlacerError, match="example batch"):
        placer.place(_model(), None, cluster="4xK40")


def test_placing_a_model_leaves_the_callers_random_states_as_they_were(tmp_path):
    """A job that seeded itself trains the same with or without placer: profiling, the search's
    seeding and the numeric check draw from their own state (graphs.random_state)."""
    import random

    import numpy as np

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.3), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    placer.place(model, (x,), cluster="4xK40", budget=200, cache_dir=str(tmp_path))
    after = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]


def test_place_returns_what_one_process_can_run_when_the_fastest_placement_is_a_pipeline(tmp_path):
    """A pipeline needs one process per stage; in this process its stages would run one after
    the other, so place() takes the fastest un-pipelined placement, with that placement's step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                                *[m for _ in range(4) for m in (torch.nn.Linear(256, 256), torch.nn.ReLU())],
                                torch.nn.Linear(256, 10))
    x = torch.randn(64, 32)
    result = placer.optimize(model, (x,), cluster="4xK40", budget="2k", progress=False, verbose=0, check=False)
    assert result.placement.pipeline is not None, "precondition: the fastest placement is a pipeline"
    info = placer.place(model, (x,), cluster="4xK40", budget="2k", cache_dir=str(tmp_path)).placer_place_info
    assert info.placement.pipeline is None
    rows = result.table.set_index("method")
    assert rows.loc[info.method, "kind"] == "placement", info.method
    assert info.step_time == pytest.approx(float(rows.loc[info.method, "step_time"]), rel=1e-9)
    assert info.step_time == min(float(t) for t, k, f in zip(rows["step_time"], rows["kind"], rows["fits"])
                                 if k == "placement" and f)


def test_the_one_process_placement_place_applies_instead_of_a_pipeline_is_checked(tmp_path, monkeypatch):
    """optimize checks its winner, the pipeline's assignment; place() applies (and caches)
    another one, which must be checked too."""
    from envs.runtime import check as check_module

    checked: list[dict[str, str]] = []
    real_check = check_module.check_placement

    def recording(spec, captured, assignment, *args, **kwargs):
        checked.append(dict(assignment))
        return real_check(spec, captured, assignment, *args, **kwargs)

    monkeypatch.setattr(check_module, "check_placement", recording)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                                *[m for _ in range(4) for m in (torch.nn.Linear(256, 256), torch.nn.ReLU())],
                                torch.nn.Linear(256, 10))
    info = placer.place(model, (torch.randn(64, 32),), cluster="4xK40", budget="2k",
                        cache_dir=str(tmp_path)).placer_place_info
    assert info.placement.pipeline is None and not info.cache_hit
    assert info.placement.assignment in checked


def test_inputs_the_model_cannot_take_are_named_in_one_error_without_torch_log_dumps(capfd):
    from graphs.errors import ModelFileError

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(ModelFileError, match=r"the example inputs do not fit the model in Sequential: RuntimeError: "
                                             r"mat1 and mat2 shapes cannot be multiplied \(6x5 and 8x8\)"):
        placer.place(model, (torch.randn(6, 5),), cluster="4xK40", budget=100, use_cache=False)
    assert "Traceback" not in capfd.readouterr().err


def test_ctrl_c_during_the_search_of_place_reaches_the_training_script_and_caches_nothing(tmp_path, monkeypatch):
    """optimize stops its search on Ctrl-C to keep what it found; place() returned that half-searched
    placement, cached it as finished, and the script trained on, exiting 0 (walkthrough)."""
    import types

    import placer.optimizing.run as run

    real = run.optimize

    def interrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        return types.SimpleNamespace(**{**vars(result), "search": types.SimpleNamespace(stop_reason="interrupted")})

    monkeypatch.setattr(run, "optimize", interrupted)
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        loop.place(model, torch.randn(8, 32), cluster="4xK40", budget="20", cache_dir=tmp_path, check=False)
    assert not list(tmp_path.iterdir())


def test_a_script_that_placed_a_model_still_dies_by_sigint_on_an_uncaught_ctrl_c(tmp_path):
    """A training script stopped by an uncaught KeyboardInterrupt after place() exited 1, not by
    SIGINT (130 in a shell): torch's at-exit compile-time report imported tabulate at shutdown, and
    that import's eval() cleared CPython 3.11's "unhandled KeyboardInterrupt" mark (walkthrough)."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, torch, placer
        before = signal.getsignal(signal.SIGINT)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        placer.place(model, torch.randn(4, 8), cluster="4xK40", budget="20", cache_dir={str(tmp_path)!r},
                     check=False)
        assert signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGINT)
        raise KeyboardInterrupt
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGINT, done.stderr[-2000:]


def test_place_on_real_devices_with_the_simulated_reward_says_its_step_times_are_simulated(tmp_path, caplog):
    """place(devices="cpu:0,cpu:1") searches with the simulated reward, but its log said "step times
    measured on real devices": only the ops' costs were profiled there (walkthrough)."""
    import logging

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with caplog.at_level(logging.DEBUG, logger="placer"):
        placed = placer.place(model, torch.randn(4, 8), devices="cpu:0,cpu:1", budget="20", cache_dir=tmp_path,
                              check=False)
    info = placed.placer_place_info
    assert not info.simulated and info.source == "simulated"
    text = caplog.text
    assert "measured on real devices" not in text
    assert "step times simulated from op costs profiled on the real devices" in text
    # The module runs in this process: the workers' step is not what it runs at, and the log says so.
    assert ("cpu:0,cpu:1 are worker processes, and the module place() returns runs in this one process" in text
            and "placer apply" in text)


def test_an_unwritable_placement_cache_is_refused_before_the_search(tmp_path, monkeypatch):
    """cache_dir under a file: place() searched for the whole budget (two minutes by default),
    then refused to write the cache and threw the placement away."""
    import placer.optimizing.run as optimizing
    from placer.options import OptionError

    def no_search(*_args, **_kwargs):
        raise AssertionError("searched before finding that the cache cannot be written")

    monkeypatch.setattr(optimizing, "optimize", no_search)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OptionError, match="placement cache.*use_cache=False"):
        placer.place(_model(), (torch.randn(16, 32),), cluster="4xK40", budget="300", cache_dir=blocker / "cache")


def test_place_and_the_tuner_keep_the_leaf_modules_they_are_given(tmp_path):
    file: dict = {}
    exec(FUNCTION_MODEL, file)  # the model file's classes: Scaled calls a custom autograd Function
    model = file["get_model"]()
    reference = copy.deepcopy(model)
    (x,) = file["get_example_inputs"]()
    with pytest.raises(PlacerError, match="autograd Function Halve.*leaf_modules"):
        placer.place(model, (x,), cluster="4xK40", budget="50", cache_dir=tmp_path)
    placed = placer.place(model, (x,), cluster="4xK40", budget="50", cache_dir=tmp_path,
                          leaf_modules=[file["Scaled"]])
    assert isinstance(dict(placed.named_modules())["1"], file["Scaled"])  # the leaf, called whole

    def losses(net: torch.nn.Module) -> list[float]:
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        out = []
        for _ in range(3):
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            opt.step()
            out.append(float(loss.detach()))
        return out

    assert losses(placed) == pytest.approx(losses(reference), rel=1e-5)
    tuner = placer.PlacementTuner(model, (x,), cluster="4xK40", budget="50", candidates=2, trials=2,
                                  leaf_modules=["1"])
    assert set(tuner.captured.graph.nodes) == set(placed.placer_place_info.placement.assignment)


def test_a_batch_given_as_a_dict_by_parameter_name_is_placed_as_the_model_takes_it(tmp_path):
    """A Hugging Face batch (model(**batch)): bound to forward()'s parameters, the one between at
    its default; the placed graph (fx, which keeps the names) takes the same dict."""
    torch.manual_seed(0)
    model = Masked()
    batch = {"mask": torch.ones(4, 16), "x": torch.randn(4, 8)}
    placed = placer.place(model, batch, cluster="4xK40", budget="200", cache_dir=tmp_path)
    torch.testing.assert_close(placed(**batch), model(**batch))


def test_place_takes_the_batch_dimension_of_sequence_first_inputs_and_refuses_one_they_lack(tmp_path):
    torch.manual_seed(0)
    model, x = torch.nn.GRU(8, 8), torch.randn(5, 3, 8)  # (time, batch, features)
    placed = placer.place(model, (x,), cluster="4xK40", budget="100", cache_dir=tmp_path, batch_dim=1)
    torch.testing.assert_close(placed(x)[0], model(x)[0])
    with pytest.raises(PlacerError, match=r"batch_dim is 3, but the first input tensor has shape \(5, 3, 8\)"):
        placer.place(model, (x,), cluster="4xK40", budget="100", cache_dir=tmp_path, batch_dim=3)


class _MaskedExported(Masked):
    """torch.export captures it (a loop over the batch's rows)."""

    def forward(self, x, past=None, mask=None):
        return self.b(torch.stack([torch.relu(r) for r in self.a(x)]) * mask)


def test_the_graph_torch_export_captured_takes_the_dict_batch_too(tmp_path):
    """Its forward takes inputs by position only; the dict is put in place by the model's own
    signature, in the placed model, its copies and pickles alike."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = _MaskedExported()
    batch = {"mask": torch.ones(4, 16), "x": torch.randn(4, 8)}
    placed = placer.place(model, batch, cluster="4xK40", budget="200", cache_dir=tmp_path)
    assert capture(model, (batch["x"], None, batch["mask"])).method == "export"
    for run in (placed, copy.deepcopy(placed), pickle.loads(pickle.dumps(placed))):
        torch.testing.assert_close(run(**batch), model(**batch))
    with pytest.raises(PlacerError, match="called without 'x', a parameter of forward"):
        placed(mask=batch["mask"])


def test_freezing_layers_is_another_cache_entry_not_the_placement_found_for_the_trained_model(tmp_path):
    """A placement searched with every layer trained holds less than the same model unfrozen
    would, and the other way round: the fingerprint (nodes, shapes) is the same for both."""
    model, x = _model(), torch.randn(16, 32)
    placer.place(model, (x,), cluster="4xK40", budget="100", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    placer.place(model, (x,), cluster="4xK40", budget="100", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1  # read back
    next(model.parameters()).requires_grad_(False)
    placer.place(model, (x,), cluster="4xK40", budget="100", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_batch_that_ends_with_the_losss_targets_is_placed_as_placer_optimize_takes_it(tmp_path):
    """With a loss_fn, the values forward() does not take are its targets (loss_fn(output, *batch)),
    as placer.optimize and a model file's get_loss take them; place() refused them ("forward()
    takes 2 positional arguments but 3 were given"), in a tuple and in a dict alike."""
    model = _model()
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))

    def loss_fn(out, x, y):
        return torch.nn.functional.cross_entropy(out, y)

    placed = placer.place(model, (x, y), cluster="4xK40", budget="200", cache_dir=tmp_path, loss_fn=loss_fn)
    torch.testing.assert_close(placed(x), model(x))
    torch.testing.assert_close(loss_fn(placed(x, y), x, y), loss_fn(model(x), x, y))
    assert placed.state_dict().keys() == model.state_dict().keys()
    by_name = placer.place(model, {"input": x, "labels": y}, cluster="4xK40", budget="200", cache_dir=tmp_path,
                           loss_fn=loss_fn)
    torch.testing.assert_close(by_name(x), model(x))
