"""A budget gives at most one time and one number of placements: a repeat is refused, not overridden."""

import pytest

from placer.cli.main import main
from placer.options import OptionError
from placer.search.budget import parse_budget


@pytest.mark.parametrize("text, repeated", [("5m,20k,3", "number of placements"), ("1m,1m", "time"),
                                            ("20k,30k", "number of placements"), ("5m,20k,1h", "time")])
def test_a_budget_with_a_second_time_or_count_is_refused_naming_it_and_the_expected_form(text, repeated):
    with pytest.raises(OptionError) as refused:
        parse_budget(text)
    message = str(refused.value)
    assert f"budget {text!r}" in message
    assert f"more than one {repeated}" in message
    assert "'5m', '20k' or '5m,20k'" in message


@pytest.mark.parametrize("text", ["5m,20k", "20k,5m", "5m, 20k", "90s,2000"])
def test_one_time_and_one_count_in_either_order_stay_valid(text):
    budget = parse_budget(text)
    assert budget.seconds is not None and budget.placements is not None
    assert budget == parse_budget(",".join(reversed(text.split(","))))


def test_optimize_refuses_a_repeated_budget_in_one_line_with_status_2(tmp_path, capsys):
    model = tmp_path / "m.py"
    model.write_text("import torch\nget_model = lambda: torch.nn.Linear(2, 2)\n"
                     "get_example_inputs = lambda: (torch.zeros(4, 2),)\n")
    assert main(["optimize", str(model), "--budget", "5m,20k,3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and "budget '5m,20k,3'" in err, err
    assert not (tmp_path / "o").exists()



@pytest.mark.parametrize("text", ["2M", "5m,2M", "1.5M"])
def test_a_capital_m_is_refused_as_ambiguous_not_read_as_minutes(text):
    """'k' counts placements, so '2M' reads as two million placements; it ran two minutes."""
    with pytest.raises(OptionError, match="is ambiguous; expected .*m' for minutes"):
        parse_budget(text)
    assert parse_budget("2m").seconds == 120 and parse_budget("2K").placements == 2000


@pytest.mark.parametrize("text", ["-5", "-5s", "-2m", "5m,-3k"])
def test_a_negative_budget_is_refused_as_negative_not_as_unreadable(text):
    with pytest.raises(OptionError, match=r"is negative; expected a positive time or number of placements"):
        parse_budget(text)
