"""One byte grammar for cluster specs and memory caps: accelerate's units, ambiguous forms refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from envs.hardware.cluster import ClusterSpecError, cluster_from_spec
from envs.hardware.units import BYTE_UNITS, UnitError, format_bytes, parse_bytes
from placer.options import OptionError, parse_memory_limits

DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}
BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
PREFIXES = "KMGTP"

units = st.sampled_from(sorted({**DECIMAL, **BINARY}))
counts = st.integers(min_value=1, max_value=1000)  # 1000 PiB still fits int64


def _prefix_case(unit: str, lower: bool) -> str:
    return (unit[0].lower() if lower else unit[0]) + unit[1:]


def _spec(memory: object) -> dict:
    return {"name": "t", "devices": [
        {"name": "g0", "kind": "K40", "memory": memory, "reserved": 0, "peak_flops": "4.29T", "mem_bandwidth": "288GB/s"}]}


def test_16G_is_refused_in_a_spec_and_in_a_memory_cap_with_the_same_advice():
    with pytest.raises(ClusterSpecError, match=r"ambiguous size '16G': write '16GB' .* or '16GiB'"):
        cluster_from_spec(_spec("16G"))
    with pytest.raises(OptionError, match=r"cuda:0: ambiguous size '16G': write '16GB' .* or '16GiB'"):
        parse_memory_limits("cuda:0=16G")


def test_16GB_and_16GiB_mean_the_same_bytes_in_a_spec_and_in_a_memory_cap():
    assert cluster_from_spec(_spec("16GB")).devices[0].memory_bytes == 16_000_000_000
    assert cluster_from_spec(_spec("16GiB")).devices[0].memory_bytes == 17_179_869_184
    assert parse_memory_limits("cuda:0=16GB,cuda:1=16GiB") == {"cuda:0": 16_000_000_000, "cuda:1": 17_179_869_184}


@given(counts, units, st.booleans(), st.sampled_from(["", " ", "  "]))
def test_a_count_and_unit_is_count_times_the_unit_whatever_the_prefix_case_and_spacing(n, unit, lower, space):
    text = f"{n}{space}{_prefix_case(unit, lower)}"
    assert parse_bytes(text) == n * {**DECIMAL, **BINARY}[unit]


@given(counts, units)
def test_memory_caps_read_sizes_exactly_as_cluster_specs_do(n, unit):
    text = f"{n}{unit}"
    assert parse_memory_limits(f"d={text}") == {"d": parse_bytes(text)}
    assert parse_memory_limits({"d": text}) == {"d": parse_bytes(text)}
    assert cluster_from_spec(_spec(text)).devices[0].memory_bytes == parse_bytes(text)


@given(st.integers(min_value=1, max_value=10**18))
def test_a_plain_number_is_bytes(n):
    assert parse_bytes(n) == n
    assert parse_bytes(str(n)) == n
    assert parse_bytes(f"{n}B") == n and parse_bytes(f"{n} bytes") == n


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=999), units)
def test_fractions_are_exact_and_fractional_bytes_are_dropped(whole, thousandths, unit):
    factor = {**DECIMAL, **BINARY}[unit]
    expected = (whole * 1000 + thousandths) * factor // 1000
    text = f"{whole}.{thousandths:03d}{unit}"
    if expected < 1:
        with pytest.raises(UnitError, match="at least one byte"):
            parse_bytes(text)
    else:
        assert parse_bytes(text) == expected


def test_decimal_fractions_do_not_pick_up_float_error():
    assert parse_bytes("1.1GB") == 1_100_000_000
    assert parse_bytes("0.29KB") == 290
    assert parse_bytes("1.5KiB") == 1536


@given(counts, st.sampled_from(PREFIXES), st.booleans(), st.booleans())
def test_a_bare_prefix_is_refused_as_ambiguous(n, prefix, lower, binary):
    unit = (prefix.lower() if lower else prefix) + ("i" if binary else "")
    with pytest.raises(UnitError, match=rf"ambiguous size '{n}{unit}': write '{n}{prefix}B' .* or '{n}{prefix}iB'"):
        parse_bytes(f"{n}{unit}")


@given(counts, st.sampled_from(PREFIXES), st.booleans())
def test_a_lowercase_b_after_a_decimal_prefix_is_refused_as_bits(n, prefix, lower):
    unit = (prefix.lower() if lower else prefix) + "b"
    with pytest.raises(UnitError, match="lowercase 'b' reads as bits"):
        parse_bytes(f"{n}{unit}")
    # The binary forms have no bit reading in accelerate, so any case is bytes there.
    assert parse_bytes(f"{n}{prefix.lower()}ib") == n * BINARY[f"{prefix}iB"]


@pytest.mark.parametrize("zero", [0, 0.0, "0", "0GB", "0GiB", "0.0001KB", "0.5"])
def test_zero_and_sub_byte_sizes_are_refused_by_specs_and_memory_caps_alike(zero):
    with pytest.raises(UnitError, match="at least one byte"):
        parse_bytes(zero)
    with pytest.raises(OptionError, match="at least one byte"):
        parse_memory_limits({"cuda:0": zero})
    with pytest.raises(ClusterSpecError, match="at least one byte"):
        cluster_from_spec(_spec(zero))


@pytest.mark.parametrize("bad", [-1, -1.5, "-3GB", "lots", "12 parsecs", "GB", "", True, None, float("inf"),
                                 float("nan"), "1e400GB", 2**63, "1e999999999PiB", [16]])
def test_malformed_or_out_of_range_sizes_are_refused_in_one_line(bad):
    with pytest.raises(UnitError) as info:
        parse_bytes(bad)
    assert "\n" not in str(info.value)


def test_the_unit_table_keys_are_the_upper_cased_units():
    assert set(BYTE_UNITS) == {"", "B", "BYTES"} | {u.upper() for u in {**DECIMAL, **BINARY}}


@given(st.integers(min_value=1, max_value=2**62))
def test_a_formatted_size_reads_back_to_within_its_three_digits(n):
    text = format_bytes(n)
    assert abs(parse_bytes(text) - n) <= 0.005 * n + 1
