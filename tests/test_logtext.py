"""Peer text in log lines: escaped so that no peer can forge, split or hide a line."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from gateway.logs import format_json, format_text
from gateway.logtext import escape_event, escape_text


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain/path name.txt", "plain/path name.txt"),
        ("\u00e9t\u00e9 \u65e5\u672c", "\u00e9t\u00e9 \u65e5\u672c"),  # letters stay letters
        ("a\r\nfake line", "a\\x0d\\x0afake line"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),  # ANSI erase screen, colour
        ("a\x85b", "a\\x85b"),  # NEL
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("x\u202egnp.exe", "x\\u202egnp.exe"),  # right-to-left override
        ("nul\x00 del\x7f tab\t", "nul\\x00 del\\x7f tab\\x09"),
        ("bad byte \udcff", "bad byte \\udcff"),  # surrogateescape of a non-UTF-8 byte
    ],
)
def test_escape_text_table(text: str, escaped: str) -> None:
    assert escape_text(text) == escaped


@given(st.text())
def test_escaped_text_has_no_control_or_separator_characters(text: str) -> None:
    escaped = escape_text(text)
    assert not any(
        unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") or c in "\u202e\u2066" for c in escaped
    )
    assert escape_text(escaped) == escaped  # escaping twice changes nothing


def test_escape_event_escapes_every_peer_field_and_keeps_numbers() -> None:
    class Peer:
        def __str__(self) -> str:
            return "evil\nline"

    event = {
        "log_format": "Transfer {verb} {path} by {who}: {code} {text}",
        "verb": "RETR",
        "path": "a\r\n2026-01-01 [gateway] forged",
        "who": Peer(),
        "code": 550,
        "text": "\x1b[2Kgone",
        "message": ("legacy\u2028text",),
    }
    escape_event(event)
    line = formatEvent(event)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line == (
        "Transfer RETR a\\x0d\\x0a2026-01-01 [gateway] forged by evil\\x0aline: 550 \\x1b[2Kgone"
    )
    assert event["code"] == 550 and event["message"] == ("legacy\\u2028text",)


def test_a_traceback_keeps_its_lines_but_not_the_peer_text_in_its_message() -> None:
    # An exception whose message holds peer text: a terminal escape, a CR and a line that
    # would look like one of the gateway's own.
    try:
        raise ValueError("bad \x1b[2J\r\n2026-01-01T00:00:00+0000 [gateway.session#info] forged")
    except ValueError:
        failure = Failure()
    event = {
        "log_format": "Unhandled error",
        "log_failure": failure,
        "log_time": 0.0,
        "log_level": LogLevel.error,
        "log_namespace": "gateway.session",
    }
    text = format_text(event)
    assert text is not None
    lines = text.splitlines()
    assert lines[0].endswith("Unhandled error") and len(lines) > 3
    assert all(line.startswith("\t") for line in lines[1:])  # nothing starts a line of its own
    assert "\x1b" not in text and "\r" not in text and "\\x1b[2J\\x0d" in text
    record = json.loads(format_json(event))
    assert "\x1b" not in record["traceback"] and "Traceback" in record["traceback"]
