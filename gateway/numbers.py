"""Numbers a peer writes: ASCII decimal digits, nothing else.

`str.isdigit()` and `int()` accept the digits of every script (Arabic-Indic U+0663, Devanagari,
full-width U+FF13), and `isdigit()` superscripts too. The numbers of FTP's grammar (RFC 959
section 5.3.2, <decimal-integer> and <number>) are written in ASCII: a number the gateway reads
one way and the upstream another, or a port it checks as one value and connects to as another,
is a hole. Every number parsed from a client, an upstream or the configuration goes through
`ascii_number` or `is_ascii_number`.
"""

from __future__ import annotations

import re

_ASCII_DIGITS = re.compile(r"[0-9]+")


def is_ascii_number(text: str) -> bool:
    """Whether `text` is one or more ASCII digits and nothing else (no sign, no space)."""
    return _ASCII_DIGITS.fullmatch(text) is not None


def ascii_number(text: str, *, max_digits: int | None = None) -> int | None:
    """The value of `text` written in ASCII decimal digits, or None for anything else.

    `max_digits` bounds the length before conversion, so a peer cannot make the gateway
    convert a number of a million digits.
    """
    if not is_ascii_number(text) or (max_digits is not None and len(text) > max_digits):
        return None
    return int(text)
