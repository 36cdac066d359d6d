"""benchmarks/rank_wake.py: the two-process ping-pong that measures late wake-ups (rule R3's evidence)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rank_wake  # noqa: E402


def test_a_pipe_ping_pong_measures_each_message_once_per_direction_with_a_delay_and_a_sleep():
    res = rank_wake.measure("pipe", [0.0, 200e-6], rounds=6)
    rows = res["rows"]
    assert len(rows) == 2 * 2 * 6  # two work times, both directions, 6 counted rounds each
    for work, delay, slept, run_delay, steal in rows:
        assert work in (0.0, 200e-6)
        assert 0 < delay < 5.0 and 0 <= slept < 5.0 and run_delay >= 0 and steal >= 0
    summary = rank_wake.summarise(res)
    assert [s["work_us"] for s in summary] == pytest.approx([0.0, 200.0])
    assert all(s["n"] == 12 and 0 <= s["late_share"] <= 1 for s in summary)
    assert all(s["delay_median_us"] <= s["delay_p90_us"] <= s["delay_p99_us"] for s in summary)


def test_a_bad_variant_is_refused_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        rank_wake.main(["--variants", "gloo:spin"])
    assert exc.value.code == 2
    assert "expected gloo or pipe" in capsys.readouterr().err
