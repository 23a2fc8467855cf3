"""Memory-size and duration parsing: what users type on the command line."""

import pytest

from orchestrator.sizes import gib, parse_duration, parse_size, vram_flag


@pytest.mark.parametrize(("text", "expected"), [
    ("12GB", 12 * 2**30), ("12gb", 12 * 2**30), ("12GiB", 12 * 2**30), ("12G", 12 * 2**30),
    ("11.5GB", int(11.5 * 2**30)), ("800MB", 800 * 2**20), ("800MiB", 800 * 2**20), ("800M", 800 * 2**20),
    (" 4 GB ", 4 * 2**30), ("1073741824", 2**30), ("1e9", 10**9), ("1.5e1GB", 15 * 2**30),
])  # fmt: skip
def test_parse_size_accepts_common_forms(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12XB", "twelve", "-3GB", "0GB", "12 GB GB", "1e-9"])
def test_parse_size_rejects_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="12GB"):
        parse_size(text)


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("1h") == 3600
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_vram_flag_rounds_up_and_gib_prints_one_decimal() -> None:
    assert vram_flag(3 * 2**30) == "3GB"
    assert vram_flag(3.31 * 2**30) == "3.4GB"
    assert gib(12 * 2**30) == "12.0 GiB"
