"""Numbers from peers and configuration: ASCII decimal digits only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, build
from gateway.numbers import ascii_number, is_ascii_number
from gateway.policy import Rule


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("65535", 65535),
        ("007", 7),
        ("\u0661\u0662", None),  # Arabic-Indic: str.isdigit() and int() accept these
        ("\u0967", None),  # Devanagari one
        ("\uff11", None),  # full-width one
        ("\u00b9", None),  # superscript one: isdigit() but not int()
        ("1\u0661", None),
        ("+1", None),
        ("-1", None),
        (" 1", None),
        ("1_000", None),  # int() accepts underscores
        ("", None),
    ],
)
def test_ascii_number_table(text: str, value: int | None) -> None:
    assert ascii_number(text) == value
    assert is_ascii_number(text) is (value is not None)


@given(st.text(max_size=12))
def test_ascii_number_accepts_exactly_ascii_digit_strings(text: str) -> None:
    ascii_digits = text != "" and all(c in "0123456789" for c in text)
    assert is_ascii_number(text) is ascii_digits
    assert ascii_number(text) == (int(text) if ascii_digits else None)


def test_max_digits_bounds_the_length() -> None:
    assert ascii_number("123456", max_digits=5) is None
    assert ascii_number("12345", max_digits=5) == 12345


@pytest.mark.parametrize("ports", ["2\u0661", "\uff12\uff11", "21-\u0662\u0662"])
def test_rule_port_ranges_take_ascii_digits_only(ports: str) -> None:
    with pytest.raises(ValueError, match="list of ports"):
        Rule.build("allow", ports=ports)


@pytest.mark.parametrize(
    ("key", "value"), [("data.passive_ports", "\u0663\u0660\u0660\u0660\u0660-30010")]
)
def test_config_numbers_take_ascii_digits_only(key: str, value: str) -> None:
    with pytest.raises(ConfigError):
        build({key: value})
