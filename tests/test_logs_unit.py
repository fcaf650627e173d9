"""The transfer log's xferlog(5) lines and the JSON log lines, from log events alone."""

from __future__ import annotations

import json
import time

from twisted.logger import LogEvent, LogLevel, LogPublisher

from gateway.logs import SessionLogger, format_json, format_text, xferlog_line


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "log_time": time.mktime((2026, 11, 28, 8, 48, 51, 0, 0, -1)),
        "log_level": LogLevel.info,
        "log_namespace": "gateway.session",
        "log_format": "Transfer {command} via {upstream}: {code} {text}",
        "event": "transfer_finished",
        "command": "RETR pub/a file.bin",
        "verb": "RETR",
        "path": "pub/a file.bin",
        "upstream": "203.0.113.5:21",
        "code": 226,
        "text": "Transfer complete.",
        "client": "192.0.2.10:40000",
        "user": "alice",
        "type": "b",
        "direction": "download",
        "bytes": 1048576,
        "seconds": 2.6,
        "session": "0a1b2c3d",
    }
    base.update(fields)
    return base


def test_complete_download_line() -> None:
    assert xferlog_line(event()) == (
        "Sat Nov 28 08:48:51 2026 3 192.0.2.10 1048576 pub/a_file.bin b _ o r alice ftp 0 * c\n"
    )


def test_the_proxy_user_is_the_user_of_a_proxy_login() -> None:
    # alice logged in to the gateway, then as anonymous to the upstream: the gateway's log
    # names alice, who the upstream's own xferlog cannot know.
    line = xferlog_line(event(user="anonymous", proxy_user="alice"))
    assert line is not None and line.split()[12:14] == ["r", "alice"]


def test_failed_upload_of_anonymous_user_over_ipv6_is_incomplete() -> None:
    fields = xferlog_line(
        event(
            verb="STOR",
            code=426,
            direction="upload",
            user="anonymous",
            client="[2001:db8::7]:40000",
            type="a",
            seconds=0.01,
        )
    )
    assert fields is not None
    parts = fields.split()
    assert parts[5:] == [
        "1", "2001:db8::7", "1048576", "pub/a_file.bin", "a", "_", "i", "a", "anonymous",
        "ftp", "0", "*", "i",
    ]  # fmt: skip


def test_listings_and_other_events_have_no_line() -> None:
    assert xferlog_line(event(verb="LIST")) is None
    assert xferlog_line(event(event="session_started")) is None


def test_a_path_cannot_add_a_line() -> None:
    line = xferlog_line(event(path="x\ny c 0 0"))
    assert line is not None and line.count("\n") == 1 and len(line.split()) == 18


def test_aborted_transfer_is_incomplete() -> None:
    line = xferlog_line(event(event="transfer_aborted", code=None))
    assert line is not None and line.split()[-1] == "i"


def test_json_line_is_flat_with_the_event_fields() -> None:
    record = json.loads(format_json(event(log_source=object())))
    assert record["level"] == "info" and record["namespace"] == "gateway.session"
    assert record["message"] == (
        "Transfer RETR pub/a file.bin via 203.0.113.5:21: 226 Transfer complete."
    )
    assert record["event"] == "transfer_finished" and record["session"] == "0a1b2c3d"
    assert record["bytes"] == 1048576 and record["time"].startswith("2026-11-28T")
    assert not any(key.startswith("log_") for key in record)


def test_text_line_shows_the_session_id() -> None:
    text = format_text(event())
    assert text is not None and "[gateway.session#info] [0a1b2c3d] Transfer RETR" in text


def _seen(level: str) -> tuple[SessionLogger, list[LogEvent]]:
    seen: list[LogEvent] = []
    publisher = LogPublisher(seen.append)
    log = SessionLogger("0a1b2c3d", namespace="gateway.session", level=level)
    log.observer = publisher
    return log, seen


def test_session_logger_drops_unwritten_detail_before_building_it() -> None:
    """Below `[log] level`, a per-line trace event reaches no observer (nothing would write
    it); an event with an `event` field still does, as metrics count those at any level."""
    log, seen = _seen("info")
    assert not log.tracing
    log.debug("To client: {code}", code=220)
    log.debug("Upstream connected", event="upstream_connected", seconds=0.1)
    log.info("Session started", event="session_started")
    log.warn("Something odd")
    assert [(e["log_format"], e["session"]) for e in seen] == [
        ("Upstream connected", "0a1b2c3d"),
        ("Session started", "0a1b2c3d"),
        ("Something odd", "0a1b2c3d"),
    ]


def test_session_logger_at_debug_keeps_every_event() -> None:
    log, seen = _seen("debug")
    assert log.tracing
    log.debug("To client: {code}", code=220)
    assert [e["log_format"] for e in seen] == ["To client: {code}"]
