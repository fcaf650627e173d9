"""Periodic health checks of reverse mode's `[[backends]]`, as a Twisted service.

Every `health.interval` seconds each backend gets one check, as a session would use it:
connect (with implicit TLS if that is its mode), read a 220 greeting within
`health.timeout`, then say QUIT and wait as long again for its answer (or the close): a
server whose accept loop still greets while its workers hang answers no command, and must
not pass. Where the backend's upstream TLS is "required", the check also says AUTH TLS and
completes the handshake, verified as a session's would be (RFC 4217 section 4), before the
QUIT: a backend whose certificate no session would accept (expired, renamed, signed by
another CA) is taken out instead of failing one session in N with 421. Results go to the
pool (`Balancer.checked`), which takes a backend out after `health.fall` failures in a row and
back after `health.rise` successes.
A check still running when the next round starts is not doubled. The one-server `upstream`
shorthand is not checked: with nowhere else to send sessions, a down mark would only refuse
clients the server might still serve.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.backends import Backend
from gateway.balancer import Balancer, failure_reason, tls_options
from gateway.codec import DEFAULT_MAX_LINE, Reply, ReplyReader
from gateway.config import Config
from gateway.errors import RemoteProtocolError
from gateway.proxyproto import local_header


class HungBackend(Exception):
    """A backend greeted a health check, then did not answer its QUIT."""


class TLSRefused(Exception):
    """A backend whose upstream TLS is required did not accept AUTH TLS."""


@implementer(IHandshakeListener)
class GreetingProbe(Protocol):
    """Reads a server's first final reply into `greeting`, then says QUIT; `answered` fires
    at the answer to it (RFC 959 section 4.2: every command gets a reply), or when the server
    closes the connection instead, and the probe closes. With
    `upstream_proxy_protocol` on, it first sends a PROXY header saying no client is relayed
    (a server that expects the header would drop the check otherwise). With `tls` (client
    TLS options), a 220 is answered with AUTH TLS, and `greeting` fires only once the
    handshake has completed and the certificate was verified; QUIT then goes encrypted."""

    def __init__(self, proxy_protocol: str = "off", tls: Any = None) -> None:
        self.greeting: Deferred[Reply] = Deferred()
        self.answered: Deferred[None] = Deferred()
        self._reader = ReplyReader(max_line=DEFAULT_MAX_LINE, max_lines=100, max_bytes=16384)
        self._proxy_protocol = proxy_protocol
        self._tls = tls
        self._greeted: Reply | None = None

    def connectionMade(self) -> None:
        if self._proxy_protocol != "off":
            self.transport.write(local_header(self._proxy_protocol))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        try:
            replies = self._reader.feed(data)
        except RemoteProtocolError as e:
            (self.answered if self.greeting.called else self.greeting).errback(e)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        for answer in replies:
            if not answer.final:
                continue
            if not self.greeting.called:
                if self._tls is not None and answer.code == 220 and self._greeted is None:
                    self._greeted = answer
                    self.transport.write(b"AUTH TLS\r\n")  # type: ignore[union-attr]
                elif self._greeted is not None:
                    self._secure(answer)
                    return
                else:
                    self.transport.write(b"QUIT\r\n")  # type: ignore[union-attr]
                    self.greeting.callback(answer)
            else:
                self.answered.callback(None)
                self.transport.loseConnection()  # type: ignore[union-attr]
                return

    def _secure(self, answer: Reply) -> None:
        """The answer to AUTH TLS: 234 starts the handshake (its end: `handshakeCompleted`)."""
        if answer.code != 234:
            text = f"refused AUTH TLS: {answer.code} {answer.lines[0]}"
            self.greeting.errback(TLSRefused(text))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.transport.startTLS(self._tls)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done and the certificate passed verification."""
        if self.greeting.called or self._greeted is None:
            return
        self.transport.write(b"QUIT\r\n")  # type: ignore[union-attr]
        self.greeting.callback(self._greeted)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.greeting.called:
            self.greeting.errback(reason)
        elif not self.answered.called:
            self.answered.callback(None)  # closed after the greeting or QUIT: it is alive


def _probe(backend: Backend, config: Config, tls: Any) -> GreetingProbe:
    explicit = tls_options(config) if config.tls.upstream == "required" else None
    return GreetingProbe(config.upstream_proxy_protocol, explicit)


class HealthChecks(Service):
    """Checks every backend of `balancer` each `health.interval` seconds (see the module
    docstring); the interval follows reloads at the next round."""

    def __init__(self, balancer: Balancer, reactor: Any) -> None:
        self.balancer = balancer
        self.reactor = reactor
        self._loop: LoopingCall | None = None
        self._interval = 0.0
        self._running: dict[Backend, Deferred[Any]] = {}

    def startService(self) -> None:
        super().startService()
        self.balancer.announce()
        self._schedule()

    def stopService(self) -> Any:
        stopped = super().stopService()  # first: checks cancelled below report nothing
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for check in list(self._running.values()):
            check.cancel()
        return stopped

    def _schedule(self) -> None:
        if not self.running:
            return
        interval = self.balancer.config.health.interval
        if self._loop is not None and interval == self._interval:
            return
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._interval = interval
        self._loop = LoopingCall(self.round)
        self._loop.clock = self.reactor
        self._loop.start(interval, now=True)

    def round(self) -> None:
        """Start one check of each backend not being checked already."""
        if self.balancer.config.health.interval != self._interval:
            self.reactor.callLater(0, self._schedule)
            return
        if not self.balancer.config.backends:
            return
        for backend in self.balancer.pool.backends:
            if backend not in self._running:
                self._check(backend)

    def _check(self, backend: Backend) -> None:
        d = self.balancer.connect_one(backend, _probe)
        d.addCallback(self._answered)
        self._running[backend] = d

        def done(result: object) -> None:
            self._running.pop(backend, None)
            if not self.running:
                return  # cancelled by stopService
            if isinstance(result, Failure):
                self.balancer.checked(backend, False, failure_reason(result.value))
            else:
                self.balancer.checked(backend, True)

        d.addBoth(done)

    def _answered(self, probe: GreetingProbe) -> Deferred[None]:
        """Wait up to health.timeout for the answer to the probe's QUIT."""

        def hung(failure: Failure) -> Failure:
            if probe.transport is not None:
                probe.transport.abortConnection()  # type: ignore[attr-defined]
            if failure.check(TimeoutError):
                raise HungBackend("greeted, then did not answer QUIT within health.timeout")
            return failure

        answered = probe.answered.addTimeout(self.balancer.config.health.timeout, self.reactor)
        return answered.addErrback(hung)
