"""Prometheus metrics, counted from the gateway's own log events.

Every event worth counting is already logged, with an `event` field naming what happened
(`session_started`, `transfer_finished`, ...). `MetricsObserver` is a `twisted.logger` observer
that turns those events into counters, so logs and metrics cannot disagree and no other module
knows metrics exist. `MetricsService` registers the observer and, with `metrics.listen` set,
serves `/metrics` (prometheus-client's text format) on that Twisted endpoint.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.twisted import MetricsResource
from twisted.application.service import MultiService
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from gateway.startup import Listener


@implementer(ILogObserver)
class MetricsObserver:
    """Counts log events that carry an `event` field; ignores all others."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions = Gauge(
            "ftp_gateway_sessions", "Client sessions open now.", registry=registry
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
        self.logins_failed = Counter(
            "ftp_gateway_proxy_logins_failed",
            "Proxy authentication failures.",
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

    def __call__(self, event: LogEvent) -> None:
        kind = event.get("event")
        if kind is None:
            return
        if kind == "session_started":
            self.sessions_started.inc()
            self.sessions.inc()
        elif kind == "session_ended":
            self.sessions.dec()
        elif kind == "session_refused":
            self.sessions_refused.labels(reason=event.get("reason_key", "other")).inc()
        elif kind == "transfer_finished":
            code = int(event.get("code", 0))
            outcome = "complete" if 200 <= code < 300 else "failed"
            self.transfers.labels(command=event.get("verb", "?"), outcome=outcome).inc()
        elif kind == "transfer_aborted":
            self.transfers.labels(command=event.get("verb", "?"), outcome="aborted").inc()
        elif kind == "relay_finished":
            direction = event.get("direction", "?")
            self.transfer_bytes.labels(direction=direction).inc(int(event.get("bytes", 0)))
        elif kind == "proxy_login_failed":
            self.logins_failed.inc()
        elif kind == "upstream_connect_failed":
            self.upstream_failures.inc()
        elif kind == "refused":
            self.refused.labels(kind=event.get("refused", "other")).inc()
        elif kind == "config_reloaded":
            self.reloads.labels(result=event.get("result", "ok")).inc()


class MetricsService(MultiService):
    """Counts events while running; serves them on `endpoint` when one is given."""

    def __init__(self, endpoint: str | None, reactor: Any) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        self.observer = MetricsObserver(self.registry)
        if endpoint:
            root = Resource()
            root.putChild(b"metrics", MetricsResource(registry=self.registry))
            site = Site(root)
            site.noisy = False
            Listener("metrics.listen", endpoint, site, reactor, "").setServiceParent(self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.observer)
        super().startService()

    def stopService(self) -> Any:
        globalLogPublisher.removeObserver(self.observer)
        return super().stopService()
