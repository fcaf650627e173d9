"""Log lines a person can trust: text a peer sent is escaped before it reaches any log.

A client chooses its user names and paths, an upstream its reply text; both end up in log
lines. Raw, a CR or LF (or NEL, U+2028, U+2029, which some viewers also break lines on) lets a
peer start a line of its own that looks like the gateway's, and an ANSI escape sequence (ESC,
or the C1 CSI) can recolour, move the cursor over or erase what a terminal shows. So every
control character (C0, DEL, C1), the Unicode line and paragraph separators, the bidirectional
overrides that reorder what is displayed, and the lone surrogates that stand for bytes that
were not UTF-8 (`surrogateescape`) are written as Python escapes (``\\x1b``, ``\\u2028``).

`escape_event` is a twisted.logger observer added ahead of the log files (`gateway.tap`), so
every event is escaped in one place, whichever module logged it and whichever fields it has;
nothing here imports Twisted. A traceback (`log_failure`) is escaped as it is written
(`escape_lines`, from `gateway.logs`), keeping its lines.
"""

from __future__ import annotations

import functools
import re
from string import Formatter
from typing import Any

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)

#: Event keys that twisted.logger itself sets or that hold no peer text.
_OWN_KEYS = frozenset({"log_format", "log_level", "log_namespace", "log_source", "log_time"})


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """`text` with every character that could break, forge or hide a log line escaped."""
    return _UNSAFE.sub(_escape_char, text)


def escape_lines(text: str) -> str:
    """`text` of several lines (a traceback, whose last line holds an exception's message,
    which may be peer text) with every unsafe character escaped but the line ends and the tab
    that starts each continuation line."""
    return "\n".join(
        "\t" + escape_text(line[1:]) if line.startswith("\t") else escape_text(line)
        for line in text.split("\n")
    )


@functools.lru_cache(maxsize=256)
def _format_fields(log_format: str) -> frozenset[str]:
    """The top-level field names a PEP 3101 format string refers to. Cached: the formats are
    the few literals in the code, and parsing one costs more than escaping the event."""
    names: set[str] = set()
    try:
        for _, field, _, _ in Formatter().parse(log_format):
            if field:
                names.add(re.split(r"[.\[]", field, maxsplit=1)[0])
    except ValueError:
        pass
    return frozenset(names)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, bytes | bytearray):
        return escape_text(bytes(value).decode("utf-8", "backslashreplace"))
    if isinstance(value, tuple | list):
        return type(value)(_escaped(item) for item in value)
    return value


def escape_event(event: dict[str, Any]) -> None:
    """Escape, in place, the text fields of a twisted.logger event (legacy `message` too).

    Objects a format refers to are turned into their escaped text here, since their `str()`
    may hold peer text too; numbers and other fields keep their type, for observers that
    count them.
    """
    referenced = _format_fields(event.get("log_format") or "")
    for key, value in list(event.items()):
        if key in _OWN_KEYS or key == "log_failure":
            continue
        if key in referenced and not isinstance(value, str | int | float | bool | type(None)):
            event[key] = escape_text(str(value))
        else:
            event[key] = _escaped(value)
