"""Log event names: one `Event` enum, every counted event real, every member logged somewhere.

A misspelt event name used to be a metric that silently stayed at zero. These tests read the
gateway's own source, so a name spelt out as a string, an event nobody logs or a counter for an
event that does not exist fails here rather than on a dashboard.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.events import Event
from gateway.metrics import MetricsObserver

SOURCES = sorted((Path(__file__).resolve().parent.parent / "gateway").glob("*.py"))


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.startswith("process_")
    }


def test_metrics_count_only_event_members() -> None:
    observer = MetricsObserver(CollectorRegistry())
    assert observer.counts, "metrics count no event at all"
    assert all(isinstance(kind, Event) for kind in observer.counts)


@pytest.mark.parametrize("kind", list(MetricsObserver(CollectorRegistry()).counts))
def test_each_counted_event_changes_a_metric(kind: Event) -> None:
    """Fed as a plain string, as a log line carries it, each counted event moves a metric."""
    registry = CollectorRegistry()
    observer = MetricsObserver(registry)
    if kind is Event.BACKEND_REMOVED:
        observer({"event": Event.BACKEND_CONFIGURED.value, "backend": "b"})  # one to remove
    before = _samples(registry)
    fields = {"code": 226, "verb": "RETR", "bytes": 10, "seconds": 0.5, "backend": "b"}
    observer({"event": kind.value, **fields})
    assert _samples(registry) != before


def test_uncounted_and_unknown_events_change_nothing() -> None:
    registry = CollectorRegistry()
    observer = MetricsObserver(registry)
    before = _samples(registry)
    for kind in [*(set(Event) - set(observer.counts)), "session_startd", None]:
        observer({"event": kind})
    observer({"log_format": "no event field"})
    assert _samples(registry) == before


def _emitted_names() -> dict[str, set[str]]:
    """Every `Event.NAME` the gateway's modules refer to, by module (events.py aside)."""
    used: dict[str, set[str]] = {}
    for path in SOURCES:
        if path.name == "events.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Event"
            ):
                used.setdefault(node.attr, set()).add(path.name)
    return used


def test_every_event_is_logged_by_some_module() -> None:
    used = _emitted_names()
    unknown = set(used) - {member.name for member in Event}
    assert not unknown, f"Event has no members {sorted(unknown)}"
    for member in Event:
        loggers = used.get(member.name, set()) - {"metrics.py"}
        assert loggers, f"Event.{member.name} is never logged (metrics.py only counts)"


def test_no_event_name_is_spelt_out_as_a_string() -> None:
    """`event="..."` or `{"event": "..."}` with a literal would bypass the enum."""
    literal: list[str] = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "event":
                value = node.value
            elif isinstance(node, ast.Dict):
                pairs = zip(node.keys, node.values, strict=True)
                value = next(
                    (v for k, v in pairs if isinstance(k, ast.Constant) and k.value == "event"),
                    None,
                )
            else:
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                literal.append(f"{path.name}:{node.lineno}: {value.value!r}")  # type: ignore[attr-defined]
    assert literal == []


def test_event_values_are_their_names_in_lower_case() -> None:
    # The values are what logs and dashboards see; they follow the members' names.
    assert all(member.value == member.name.lower() for member in Event)


def _unnamed_log_lines(source: Path) -> list[str]:
    """Log calls at info or above (a logger's info/warn/error/critical/failure, or the core's
    `Log` effect) whose fields carry no `event`."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        if isinstance(node.func, ast.Attribute) and node.func.attr in (
            "info",
            "warn",
            "error",
            "critical",
            "failure",
        ):
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            keywords = {keyword.arg for keyword in node.keywords}
            if "event" not in keywords and None not in keywords:
                found.append(f"{source.name}:{node.lineno} {first.value[:60]!r}")
        elif isinstance(node.func, ast.Name) and node.func.id == "Log":
            level = first.value if isinstance(first, ast.Constant) else None
            fields = node.args[2] if len(node.args) > 2 else None
            if level == "debug" or not isinstance(fields, ast.Dict | type(None)):
                continue  # fields built elsewhere: checked where they are built
            keys = [
                key.value
                for key in (fields.keys if fields else [])
                if isinstance(key, ast.Constant)
            ]
            if "event" not in keys and not (fields and None in fields.keys):
                found.append(f"{source.name}:{node.lineno}")
    return found


def test_every_log_line_above_debug_names_its_event() -> None:
    """Operators search and count lines by their `event` field (JSON logs, metrics): a line
    at info or above without one can be found only by its wording, which may change."""
    unnamed = [line for source in SOURCES for line in _unnamed_log_lines(source)]
    assert unnamed == []
