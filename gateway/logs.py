"""Where log events go, in which shape, and which are written: `[log]` level, format and the
transfer log.

Every line starts as a `twisted.logger` event with named fields (`event`, `client`, `session`,
...). This module only decides what becomes of them:

- The main log (twistd's `--logfile`, `--syslog` or standard output) is written by one observer
  that filters by `[log] level` and drops Twisted's per-listener noise below debug, as text or
  as one JSON object per line. twistd asks the application for its `ILogObserver` component
  before it builds its own, so `install_main_observer` puts this observer there, made for the
  destination twistd's own options name.
- The transfer log (`[log] transfer_log`) is the `transfer_finished` and `transfer_aborted`
  events written as xferlog(5) lines: the per-transfer log line and the transfer log are one
  record, so they cannot disagree.
- SIGUSR1 reopens both files, so logrotate can rename them (see etc/examples/logrotate).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from gateway.config import Config, ConfigError
from gateway.events import Event
from gateway.logtext import escape_lines

_log = Logger(namespace="gateway.logs")

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

#: Lines Twisted writes for every listening port it opens and closes (legacy `log.msg`, always
#: at info): one pair per passive data connection, and `GatewayFactory starting on 2121` for
#: each listener, which the start-up line (`Listening on ...: reverse mode, ...`) says better.
#: Debug detail, not operations news.
_NOISE = (
    re.compile(r"\S+ starting on \S+"),
    re.compile(r"\((TCP|UDP) Port \S+ Closed\)"),
    re.compile(r"(Starting|Stopping) factory .*"),
)
#: The same from factories logging through `twisted.logger` (Factory.doStart/doStop).
_NOISE_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


#: Severity order of the levels, for a comparison cheaper than Twisted's own.
_PRIORITY = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}


class SessionLogger(Logger):
    """A `Logger` whose every event carries the session's short id in the `session` field, so
    the lines of one session can be picked out of a busy log (`grep`, `jq`).

    `level` is the main log's `[log] level`. An event below it that has no `event` field is
    dropped before it is built: the main log would filter it out, and the other observers (the
    metrics, the transfer log) only read events by their `event` field. A session traces every
    command and reply at debug level, so at the default level this saves building, escaping
    and filtering a dozen events per session set-up. `tracing` tells callers whether such
    detail is written at all, so they can skip preparing its fields too."""

    def __init__(
        self, session: str, namespace: str, source: object = None, *, level: str = "debug"
    ) -> None:
        super().__init__(namespace=namespace, source=source)
        self.session = session
        self._floor = _PRIORITY[_LEVELS[level]]
        self.tracing = self._floor == 0

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if "event" not in kwargs and _PRIORITY.get(level, 0) < self._floor:
            return
        kwargs.setdefault("session", self.session)
        super().emit(level, format, **kwargs)


def _noise_filter(level: str) -> Callable[[LogEvent], PredicateResult]:
    def predicate(event: LogEvent) -> PredicateResult:
        if level == "debug":
            return PredicateResult.maybe
        if event.get("log_format") in _NOISE_FORMATS:
            return PredicateResult.no
        if event.get("log_namespace") != "log_legacy":
            return PredicateResult.maybe
        text = formatEvent(event)
        if any(pattern.fullmatch(text) for pattern in _NOISE):
            return PredicateResult.no
        return PredicateResult.maybe

    return predicate


@functools.lru_cache(maxsize=2)
def _second_as_text(second: int) -> str:
    return formatTime(second)


def _time_as_text(when: float | None) -> str:
    """Twisted's `formatTime` (whole seconds), worked out once per second rather than for
    every line: it builds a time zone and calls strftime each time."""
    return "-" if when is None else _second_as_text(int(when))


def format_text(event: LogEvent) -> str | None:
    """Twisted's classic line, with the session id in brackets before the message:
    `2026-11-28T08:52:03+0000 [gateway.session#info] [9ce0f6ca] Session started: ...`, so
    `grep '#warn]'` and `grep 9ce0f6ca` both work."""
    text = formatEventAsClassicLogText(event, formatTime=_time_as_text)
    if text is not None and "log_failure" in event:
        text = escape_lines(text)
    session = event.get("session")
    if text is None or session is None:
        return text
    head, sep, message = text.partition("] ")
    return f"{head}{sep}[{session}] {message}" if sep else text


def format_json(event: LogEvent) -> str:
    """One JSON object per line: time (UTC, ISO 8601), level, namespace, the formatted message,
    and the event's own named fields. Twisted's `eventAsJSON` keeps its internal keys (logger,
    source, class identifiers) so events can be read back into Twisted; log collectors want
    the flat fields instead, so only those are kept, with anything not JSON-native as text."""
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", time.time()), UTC).isoformat(),
        "level": level.name,
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("message", "format", "system"):
            continue
        if key in ("isError", "why", "failure"):
            continue
        record[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = escape_lines(failure.getTraceback())
    return json.dumps(record, ensure_ascii=False) + "\n"


class MainLog:
    """The main log's observer and the file (if any) it writes, reopened on SIGUSR1."""

    def __init__(self, config: Config, twistd_options: Any) -> None:
        self.file: LogFile | None = None
        base: ILogObserver
        options = twistd_options if twistd_options is not None else {}
        if options.get("syslog"):
            from twisted.python.syslog import SyslogObserver

            base = LegacyLogObserverWrapper(SyslogObserver(options.get("prefix", "")).emit)
        else:
            out: IO[str] | LogFile
            name = options.get("logfile") or ""
            if name == "-" or (not name and options.get("nodaemon", True)):
                out = sys.stdout
            else:
                self.file = out = LogFile.fromFullPath(name or "twistd.log")
            formatter = format_json if config.log.format == "json" else format_text
            base = FileLogObserver(out, formatter)  # type: ignore[arg-type]
        self.observer = FilteringLogObserver(
            base,
            [
                LogLevelFilterPredicate(defaultLogLevel=_LEVELS[config.log.level]),
                _noise_filter(config.log.level),
            ],
        )

    def reopen(self) -> None:
        if self.file is not None:
            self.file.reopen()


def install_main_observer(application: Any, main: MainLog) -> None:
    """Make `main` the application's log observer; twistd uses it instead of building its own
    (twisted.application.app.AppLogger.start)."""
    if hasattr(application, "setComponent"):
        application.setComponent(ILogObserver, main.observer)


#: xferlog(5) transfer-type: our session's "a" or "b"; direction: o(utgoing) to the client.
_DIRECTIONS = {"download": "o", "upload": "i"}
#: Only files: listings (LIST, NLST, MLSD) are not what an xferlog reader counts.
_FILE_COMMANDS = frozenset({"RETR", "STOR", "STOU", "APPE"})
_ANONYMOUS = frozenset({"anonymous", "ftp"})


def _field(text: object) -> str:
    """One whitespace-free xferlog field; a path with spaces keeps its place in the line."""
    cleaned = re.sub(r"[\s\x00-\x1f\x7f]", "_", str(text))
    return cleaned or "*"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _client_host(client: str) -> str:
    host = client.rsplit(":", 1)[0] if client.count(":") == 1 or client.startswith("[") else client
    return host.strip("[]")


def xferlog_line(event: LogEvent) -> str | None:
    """The xferlog(5) line for a transfer event, or None for other events:

    current-time transfer-time remote-host file-size filename transfer-type special-action-flag
    direction access-mode username service-name authentication-method authenticated-user-id
    completion-status
    """
    kind = event.get("event")
    if kind not in (Event.TRANSFER_FINISHED, Event.TRANSFER_ABORTED):
        return None
    if event.get("verb") not in _FILE_COMMANDS:
        return None
    code = event.get("code")
    complete = kind == Event.TRANSFER_FINISHED and isinstance(code, int) and 200 <= code < 300
    # The user the gateway authenticated, where it did (proxy login): the upstream's own
    # xferlog already names its account, but only the gateway knows who stood behind it.
    user = event.get("proxy_user") or event.get("user") or "*"
    when = time.localtime(event.get("log_time", time.time()))
    fields = [
        time.strftime("%a %b %d %H:%M:%S %Y", when),
        str(max(1, round(_number(event.get("seconds"))))),
        _field(_client_host(str(event.get("client", "*")))),
        str(int(_number(event.get("bytes")))),
        _field(event.get("path", "")),
        "a" if event.get("type") == "a" else "b",
        "_",
        _DIRECTIONS.get(str(event.get("direction")), "o"),
        "a" if str(user).lower() in _ANONYMOUS else "r",
        _field(user),
        "ftp",
        "0",
        "*",
        "c" if complete else "i",
    ]
    return " ".join(fields) + "\n"


def check_transfer_log(path: str | None) -> None:
    """Raise ConfigError, naming the setting, when the transfer log could not be appended to:
    at start (and --check-config), a one-line reason instead of a traceback once the service
    starts. Nothing is created: checking has no side effects."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        if os.path.isdir(path) or not os.access(path, os.W_OK):
            raise ConfigError(f"log.transfer_log: cannot write to {path}")
    elif not os.path.isdir(directory):
        raise ConfigError(f"log.transfer_log: cannot open {path}: No such directory {directory}")
    elif not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"log.transfer_log: cannot create {path}: {directory} is not writable")


@implementer(ILogObserver)
class TransferLog:
    """Appends one xferlog(5) line per file transfer to `path`; `reopen` after a rename."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = self._open()

    def _open(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", errors="replace", buffering=1)

    def __call__(self, event: LogEvent) -> None:
        line = xferlog_line(event)
        if line is not None:
            self._file.write(line)

    def reopen(self) -> None:
        fresh = self._open()
        self._file.close()
        self._file = fresh

    def close(self) -> None:
        self._file.close()


class LogService(Service):
    """The transfer log while running, and SIGUSR1 reopening the log files."""

    def __init__(self, main: MainLog, transfer_log: str | None, reactor: Any) -> None:
        self.main = main
        self.transfer_log_path = transfer_log
        self.transfer_log: TransferLog | None = None
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if self.transfer_log_path is not None:
            self.transfer_log = TransferLog(self.transfer_log_path)
            globalLogPublisher.addObserver(self.transfer_log)
        self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
        if self.transfer_log is not None:
            globalLogPublisher.removeObserver(self.transfer_log)
            self.transfer_log.close()
            self.transfer_log = None
        return super().stopService()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes; do the work in the reactor's own turn.
        self.reactor.callFromThread(self.reopen)

    def reopen(self) -> None:
        self.main.reopen()
        if self.transfer_log is not None:
            try:
                self.transfer_log.reopen()
            except OSError as e:
                _log.error(
                    "Cannot reopen the transfer log {path}: {error}",
                    path=self.transfer_log.path,
                    error=e.strerror,
                    event=Event.TRANSFER_LOG_FAILED,
                )
                return
        _log.info("Log files reopened", event=Event.LOGS_REOPENED)


class StdlibToTwisted(logging.Handler):
    """Forwards a stdlib `logging` logger (pyftpdlib's, for `--demo`) to `twisted.logger` at
    the record's own level, instead of its lines reaching the log as `[stderr#error]`. Records
    may come from another thread: they are emitted in the reactor's."""

    _BY_LEVEL = (
        (logging.ERROR, LogLevel.error),
        (logging.WARNING, LogLevel.warn),
        (logging.INFO, LogLevel.info),
    )

    def __init__(self, log: Logger, reactor: Any) -> None:
        super().__init__(logging.DEBUG)
        self.log = log
        self.reactor = reactor

    def emit(self, record: logging.LogRecord) -> None:
        level = next((lv for no, lv in self._BY_LEVEL if record.levelno >= no), LogLevel.debug)
        message = record.getMessage()
        self.reactor.callFromThread(self.log.emit, level, "{message}", message=message)


def forward_stdlib_logger(name: str, log: Logger, reactor: Any) -> None:
    """Send the stdlib logger `name`'s records to `log`, and only there."""
    logger = logging.getLogger(name)
    logger.handlers[:] = [StdlibToTwisted(log, reactor)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
