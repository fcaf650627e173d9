"""Prometheus metrics, counted from the gateway's own log events.

Every event worth counting is already logged, with an `event` field naming what happened (a
`gateway.events.Event`: `session_started`, `transfer_finished`, ...). `MetricsObserver` is a
`twisted.logger` observer that turns those events into counters, so logs and metrics cannot
disagree and no other module knows metrics exist. `MetricsService` registers the observer and,
with `metrics.listen` set, serves `/metrics` (prometheus-client's text format) on that Twisted
endpoint.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.twisted import MetricsResource
from twisted.application.service import MultiService
from twisted.copyright import version as twisted_version
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from gateway import __version__
from gateway.events import Event
from gateway.startup import Listener

#: Label values known in advance, so each series exists (at zero) before its first event:
#: a dashboard or an alert on rate() sees 0, not "no data".
_REFUSAL_REASONS = (
    "loop",
    "client_policy",
    "max_sessions",
    "max_sessions_per_ip",
    "not_redirected",
    "proxy_header",
)
_TRANSFER_VERBS = ("RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD")
_TRANSFER_OUTCOMES = ("complete", "failed", "aborted")
_DIRECTIONS = ("download", "upload")
_REFUSED_KINDS = ("upstream", "data_target", "command", "login_throttle", "route")
_RELOAD_RESULTS = ("ok", "failed")
#: Seconds: loopback and LAN connects are sub-millisecond, a distant server 100 ms or more.
_CONNECT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds: transfers run from a small file's milliseconds to hours.
_TRANSFER_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


@implementer(ILogObserver)
class MetricsObserver:
    """Counts log events that carry an `event` field; ignores all others."""

    def __init__(self, registry: CollectorRegistry) -> None:
        Info(
            "ftp_gateway_build", "ftp-gateway's version and what it runs on.", registry=registry
        ).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "twisted": twisted_version,
            }
        )
        ProcessCollector(registry=registry)
        self.sessions = Gauge(
            "ftp_gateway_sessions", "Client sessions open now.", registry=registry
        )
        self.transfers_in_flight = Gauge(
            "ftp_gateway_transfers_in_flight",
            "Data transfers relaying bytes now.",
            registry=registry,
        )
        self.sessions_started = Counter(
            "ftp_gateway_sessions_started", "Client sessions accepted.", registry=registry
        )
        self.sessions_refused = Counter(
            "ftp_gateway_sessions_refused",
            "Client connections refused before a session started, by reason.",
            ["reason"],
            registry=registry,
        )
        self.transfers = Counter(
            "ftp_gateway_transfers",
            "Data transfers by command and outcome (complete: 2xx sent to the client).",
            ["command", "outcome"],
            registry=registry,
        )
        self.transfer_bytes = Counter(
            "ftp_gateway_transfer_bytes",
            "Bytes relayed on data connections, by direction.",
            ["direction"],
            registry=registry,
        )
        self.transfer_seconds = Histogram(
            "ftp_gateway_transfer_duration_seconds",
            "Time from both data connections open to the relay's end, by direction.",
            ["direction"],
            buckets=_TRANSFER_BUCKETS,
            registry=registry,
        )
        self.connect_seconds = Histogram(
            "ftp_gateway_upstream_connect_seconds",
            "Time to open an upstream control connection (TCP, and TLS for implicit FTPS).",
            buckets=_CONNECT_BUCKETS,
            registry=registry,
        )
        self.logins_failed = Counter(
            "ftp_gateway_proxy_logins_failed",
            "Proxy authentication failures.",
            registry=registry,
        )
        self.upstream_logins_failed = Counter(
            "ftp_gateway_upstream_logins_failed",
            "Logins the upstream refused (530 to USER, PASS or ACCT).",
            registry=registry,
        )
        self.upstream_failures = Counter(
            "ftp_gateway_upstream_connect_failures",
            "Upstream control connections that could not be made.",
            registry=registry,
        )
        self.refused = Counter(
            "ftp_gateway_refused",
            "Requests refused by policy, by kind (upstream, data_target, command).",
            ["kind"],
            registry=registry,
        )
        self.reloads = Counter(
            "ftp_gateway_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            registry=registry,
        )
        self.backend_up = Gauge(
            "ftp_gateway_backend_up",
            "Reverse mode: 1 while a backend takes sessions, 0 while it is marked down.",
            ["backend"],
            registry=registry,
        )
        self.backend_sessions = Gauge(
            "ftp_gateway_backend_sessions",
            "Reverse mode: sessions on each backend now.",
            ["backend"],
            registry=registry,
        )
        for reason in _REFUSAL_REASONS:
            self.sessions_refused.labels(reason=reason)
        for verb in _TRANSFER_VERBS:
            for outcome in _TRANSFER_OUTCOMES:
                self.transfers.labels(command=verb, outcome=outcome)
        for direction in _DIRECTIONS:
            self.transfer_bytes.labels(direction=direction)
            self.transfer_seconds.labels(direction=direction)
        for kind in _REFUSED_KINDS:
            self.refused.labels(kind=kind)
        for result in _RELOAD_RESULTS:
            self.reloads.labels(result=result)

        #: What each counted event does to the metrics; events not listed are not counted.
        self.counts: dict[Event, Callable[[LogEvent], None]] = {
            Event.SESSION_STARTED: self._session_started,
            Event.SESSION_ENDED: lambda event: self.sessions.dec(),
            Event.SESSION_REFUSED: self._session_refused,
            Event.TRANSFER_FINISHED: self._transfer_finished,
            Event.TRANSFER_ABORTED: self._transfer_aborted,
            Event.RELAY_STARTED: lambda event: self.transfers_in_flight.inc(),
            Event.RELAY_FINISHED: self._relay_finished,
            Event.UPSTREAM_CONNECTED: self._upstream_connected,
            Event.PROXY_LOGIN_FAILED: lambda event: self.logins_failed.inc(),
            Event.UPSTREAM_LOGIN_FAILED: lambda event: self.upstream_logins_failed.inc(),
            Event.UPSTREAM_CONNECT_FAILED: lambda event: self.upstream_failures.inc(),
            Event.REFUSED: self._refused,
            Event.CONFIG_RELOADED: self._config_reloaded,
            # Reverse mode's backends (`gateway.balancer`).
            Event.BACKEND_CONFIGURED: self._backend_configured,
            Event.BACKEND_REMOVED: self._backend_removed,
            Event.BACKEND_UP: lambda event: self._backend_up(event, 1),
            Event.BACKEND_DOWN: lambda event: self._backend_up(event, 0),
            Event.BACKEND_SESSION_STARTED: lambda event: self._backend_sessions(event).inc(),
            Event.BACKEND_SESSION_ENDED: lambda event: self._backend_sessions(event).dec(),
        }

    def __call__(self, event: LogEvent) -> None:
        kind = event.get("event")
        # Event members hash and compare as their values, so a plain string finds its entry.
        count = self.counts.get(kind) if isinstance(kind, str) else None
        if count is not None:
            count(event)

    def _session_started(self, event: LogEvent) -> None:
        self.sessions_started.inc()
        self.sessions.inc()

    def _session_refused(self, event: LogEvent) -> None:
        self.sessions_refused.labels(reason=event.get("reason_key", "other")).inc()

    def _transfer_finished(self, event: LogEvent) -> None:
        code = int(event.get("code", 0))
        outcome = "complete" if 200 <= code < 300 else "failed"
        self.transfers.labels(command=event.get("verb", "?"), outcome=outcome).inc()

    def _transfer_aborted(self, event: LogEvent) -> None:
        self.transfers.labels(command=event.get("verb", "?"), outcome="aborted").inc()

    def _relay_finished(self, event: LogEvent) -> None:
        self.transfers_in_flight.dec()
        direction = event.get("direction", "?")
        self.transfer_bytes.labels(direction=direction).inc(int(event.get("bytes", 0)))
        if "seconds" in event:
            self.transfer_seconds.labels(direction=direction).observe(float(event["seconds"]))

    def _upstream_connected(self, event: LogEvent) -> None:
        self.connect_seconds.observe(float(event.get("seconds", 0.0)))

    def _refused(self, event: LogEvent) -> None:
        self.refused.labels(kind=event.get("refused", "other")).inc()

    def _config_reloaded(self, event: LogEvent) -> None:
        self.reloads.labels(result=event.get("result", "ok")).inc()

    def _backend_configured(self, event: LogEvent) -> None:
        backend = str(event.get("backend", "?"))
        self.backend_up.labels(backend=backend).set(1 if event.get("up", True) else 0)
        self.backend_sessions.labels(backend=backend).set(int(event.get("sessions", 0)))

    def _backend_up(self, event: LogEvent, up: int) -> None:
        self.backend_up.labels(backend=str(event.get("backend", "?"))).set(up)

    def _backend_sessions(self, event: LogEvent) -> Any:
        return self.backend_sessions.labels(backend=str(event.get("backend", "?")))

    def _backend_removed(self, event: LogEvent) -> None:
        backend = str(event.get("backend", "?"))
        for gauge in (self.backend_up, self.backend_sessions):
            with contextlib.suppress(KeyError):
                gauge.remove(backend)


class _ScrapeSite(Site):
    """The metrics site: a scraper asks every few seconds, so a request is not worth a log
    line (Twisted's `Site` writes an access-log line per request to the main log)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class MetricsService(MultiService):
    """Counts events while running; serves them on `endpoint` when one is given."""

    def __init__(self, endpoint: str | None, reactor: Any) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        self.observer = MetricsObserver(self.registry)
        if endpoint:
            root = Resource()
            root.putChild(b"metrics", MetricsResource(registry=self.registry))
            site = _ScrapeSite(root)
            Listener(
                "metrics.listen", endpoint, site, reactor, "Prometheus metrics at /metrics"
            ).setServiceParent(self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.observer)
        super().startService()

    def stopService(self) -> Any:
        globalLogPublisher.removeObserver(self.observer)
        return super().stopService()
