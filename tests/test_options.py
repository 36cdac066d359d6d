"""User-typed options parse to the right values and malformed ones are refused clearly."""

import pytest

from placer.options import (
    OptionError,
    parse_device_list,
    parse_memory_limits,
    parse_model_args,
)


def test_memory_limits_parse_per_device():
    assert parse_memory_limits("cuda:0=20GiB, cpu=1GB") == {"cuda:0": 20 * 2**30, "cpu": 10**9}
    assert parse_memory_limits({"cpu": "2GiB"}) == {"cpu": 2 * 2**30}
    assert parse_memory_limits(None) == {}
    with pytest.raises(OptionError, match="DEVICE=SIZE"):
        parse_memory_limits("cuda:0:20GiB")
    with pytest.raises(OptionError, match="memory limit for cpu: cannot read memory size 'lots'"):
        parse_memory_limits("cpu=lots")


def test_device_lists_are_checked():
    assert parse_device_list("cpu, cuda:0,cuda:1") == ["cpu", "cuda:0", "cuda:1"]
    with pytest.raises(OptionError, match="unknown device 'gpu0'"):
        parse_device_list("cpu,gpu0")
    with pytest.raises(OptionError, match="twice"):
        parse_device_list("cpu,cpu")
    with pytest.raises(OptionError, match="no devices"):
        parse_device_list(" , ")


def test_device_list_accepts_distributed_ranks():
    assert parse_device_list("cpu:0,cpu:1") == ["cpu:0", "cpu:1"]
    assert parse_device_list("node-1:cpu:0,10.0.0.2:cuda:1") == ["node-1:cpu:0", "10.0.0.2:cuda:1"]
    with pytest.raises(OptionError, match="HOST:cpu:N"):
        parse_device_list("node1:tpu:0")
    with pytest.raises(OptionError, match="HOST:cpu:N"):
        parse_device_list("node1:cpu")


def test_model_args_read_numbers_and_booleans():
    assert parse_model_args(["layers=4", "dropout=0.1", "tie=true", "name=x"], size="paper") == {
        "layers": 4, "dropout": 0.1, "tie": True, "name": "x", "size": "paper"}
    with pytest.raises(OptionError, match="KEY=VALUE"):
        parse_model_args(["layers"])


def test_a_model_argument_given_twice_with_two_values_is_refused_not_last_one_wins():
    with pytest.raises(OptionError, match="'layers' is given twice"):
        parse_model_args(["layers=2", "layers=4"])
    with pytest.raises(OptionError, match="--size small and --model-arg size=paper disagree"):
        parse_model_args(["size=paper"], size="small")
    assert parse_model_args(["layers=2", "layers=2", "size=paper"], size="paper") == {"layers": 2, "size": "paper"}


@pytest.mark.parametrize("option, value, named", [
    ("cluster", 5, "cluster must be a preset name"),
    ("devices", 3, "devices must be a string"),
    ("groups", "4", "groups must be an integer"),
    ("groups", True, "groups must be an integer"),
    ("measure_timeout", -1, "measure_timeout must be a number of seconds above 0"),
    ("measure_timeout", float("nan"), "measure_timeout must be a number of seconds above 0"),
    ("agent", None, "agent must be an agent's name"),
    ("check", "no", "check must be True or False"),
    ("batch_dim", "1", "batch_dim must be the inputs' batch dimension, an integer >= 0"),
    ("batch_dim", -1, "batch_dim must be the inputs' batch dimension, an integer >= 0"),
])
def test_an_api_option_of_the_wrong_kind_is_refused_naming_it_before_the_run(option, value, named) -> None:
    """Through the Python API (the CLI's parsers cannot produce these): ``cluster=5`` stopped in
    ``os.fspath`` and ``groups="4"`` in a comparison with a TypeError traceback, a negative
    ``measure_timeout`` was accepted, ``check="no"`` read as true."""
    from placer.optimizing.config import OptimizeConfig

    options = {"cluster": "4xK40", option: value}
    if option == "devices":
        options.pop("cluster")
    with pytest.raises(OptionError, match=named):
        OptimizeConfig("zoo:rnnlm", **options)


def test_a_batch_dimension_given_to_optimize_must_agree_with_the_model_files(tmp_path) -> None:
    from placer.optimizing.run import optimize

    path = tmp_path / "seq.py"
    path.write_text("import torch\nmodel = torch.nn.GRU(3, 4)\nexample_inputs = (torch.randn(7, 5, 3),)\n"
                    "batch_dim = 1\n")
    with pytest.raises(OptionError, match=r"batch_dim=0 was given, but .*seq.py says batch_dim = 1; expected one "
                                          "batch dimension: set it in the file only"):
        optimize(str(path), cluster="4xK40", batch_dim=0, progress=False)
