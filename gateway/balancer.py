"""The Twisted side of reverse mode's backends: connecting a session to one, with failover.

`gateway.backends.Pool` decides which backend to try; `Balancer` carries it out. A session's
connection counts only once the backend has greeted with 220 within `health.timeout`: a backend
that refuses, times out, resets, fails its implicit TLS handshake or greets with anything else
is marked down, and the next one is tried, before the client sees a byte. The protocol given to
`connect` stays connected and holds the greeting for the session to take over. The health-check
service (`gateway.health`) probes backends the same way.

Every state change is logged with an `event` field (`backend_down`, `backend_up`,
`backend_configured`, `backend_removed`, `backend_session_started`, `backend_session_ended`),
from which `gateway.metrics` derives `ftp_gateway_backend_up` and
`ftp_gateway_backend_sessions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IAddress, ITransport
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger

from gateway.addresses import HostPort, is_ip_literal
from gateway.backends import Backend, Change, Pool
from gateway.codec import Reply
from gateway.config import Config
from gateway.events import Event
from gateway.tls import client_options

_log = Logger(namespace="gateway.backends")


class NoBackend(Exception):
    """No backend could take the session; the message says why (for the client's 421)."""


class BadGreeting(Exception):
    """A backend answered its connection with something other than 220."""


class Greeted(Protocol):
    """What `Balancer.connect` needs of the protocol it connects: a Deferred firing with the
    first final reply (failing if the connection ends first), and its transport."""

    greeting: Deferred[Reply]
    transport: ITransport | None


P = TypeVar("P", bound=Greeted)


def tls_options(config: Config) -> Any:
    """Upstream TLS client options for a backend's effective configuration."""
    assert config.tls.upstream_name is not None
    return client_options(
        config.tls.upstream_name,
        ca_file=config.tls.upstream_ca_file,
        pin=config.tls.upstream_fingerprint,
        min_version=config.tls.min_version,
    )


class _Prepared(Factory):
    noisy = False

    def __init__(self, protocol: TwistedProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress) -> TwistedProtocol:
        return self._protocol


class Balancer:
    """The pool of a running gateway, with its configuration; rebuilt state-preserving on
    reload (`reconfigure`)."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.reactor = reactor
        self.config = config
        self.pool = Pool(
            config.pool_backends, config.balance, config.health.fall, config.health.rise
        )
        #: Set by the factory: whether host:port is this gateway's own listener.
        self.is_self: Callable[[str, int], bool] = lambda host, port: False

    def announce(self) -> None:
        """Log every backend once (at start, when the metrics observer listens)."""
        self._announce(())

    def reconfigure(self, config: Config) -> None:
        old = self.pool.backends
        self.pool = self.pool.renewed(
            config.pool_backends, config.balance, config.health.fall, config.health.rise
        )
        self.config = config
        self._announce(old)

    def _announce(self, old: tuple[Backend, ...]) -> None:
        for backend in self.pool.backends:
            if backend in old:
                continue
            _log.info(
                "Backend {backend} at {address}, weight {weight}",
                backend=backend.name,
                address=backend.address,
                weight=backend.weight,
                up=self.pool.is_up(backend.name),
                sessions=self.pool.sessions(backend.name),
                event=Event.BACKEND_CONFIGURED,
            )
        names = {backend.name for backend in self.pool.backends}
        for backend in old:
            if backend.name not in names:
                _log.info(
                    "Backend {backend} removed", backend=backend.name, event=Event.BACKEND_REMOVED
                )

    # ----------------------------------------------------------------------- sessions

    def connect(
        self,
        make: Callable[[Backend, Config, Any], P],
        *,
        client: str,
        user: str | None = None,
        names: frozenset[str] | None = None,
        exclude: frozenset[str] = frozenset(),
        last: str = "no backend is configured for this login",
    ) -> Deferred[tuple[Backend, Config, P]]:
        """Connect a session from `client` (logging in as `user`, among backends `names`) to
        the first backend the policy chooses that greets with 220, failing over to the next.
        `make(backend, config, tls)` builds the protocol, given the backend's effective
        configuration and its implicit-TLS options (or None). Fails with NoBackend naming the
        last reason when every candidate failed (`last`, when none is left to try: the
        session already tried those in `exclude`). Cancelling stops the attempt."""

        async def attempt() -> tuple[Backend, Config, P]:
            tried: set[str] = set(exclude)
            nonlocal last
            while True:
                backend = self.pool.choose(
                    client=client, user=user, names=names, exclude=frozenset(tried)
                )
                if backend is None:
                    raise NoBackend(last)
                tried.add(backend.name)
                self.pool.acquire(backend.name)  # counts while connecting (least_connections)
                config = self.config.for_backend(backend)
                try:
                    protocol = await self._open(backend, config, make, session=True)
                except (CancelledError, internet_error.ConnectingCancelledError):
                    # The session ended while connecting: no fault of the backend.
                    self.pool.release(backend.name)
                    raise
                except Exception as e:
                    self.pool.release(backend.name)
                    reason = failure_reason(e)
                    self.failed(backend, reason)
                    last = f"backend {backend.name}: {reason}"
                    continue
                _log_change(self.pool.served(backend.name))
                # At debug: the session's own line ("Connected to upstream ..., backend ...")
                # says it with the session's id, and one line less per session is written
                # before the client sees its greeting.
                _log.debug(
                    "Session from {client} sent to backend {backend}",
                    client=client,
                    backend=backend.name,
                    event=Event.BACKEND_SESSION_STARTED,
                )
                return backend, config, protocol

        return Deferred.fromCoroutine(attempt())

    def _current(self, backend: Backend) -> bool:
        """Whether `backend` is still in the pool as it was (a reload that moved it to another
        address started its state over, as `Pool.renewed` does)."""
        now = self.pool.get(backend.name)
        return now is not None and now.address == backend.address

    def release(self, backend: Backend) -> None:
        """A session that `connect` gave `backend` ended."""
        if not self._current(backend):
            return
        self.pool.release(backend.name)
        _log.debug(
            "Session left backend {backend}",
            backend=backend.name,
            event=Event.BACKEND_SESSION_ENDED,
        )

    def failed(self, backend: Backend, reason: str) -> None:
        """A session could not use `backend`: out at once (`Pool.failed`)."""
        _log.warn(
            "Backend {backend} ({address}) failed a session: {reason}",
            backend=backend.name,
            address=backend.address,
            reason=reason,
            event=Event.BACKEND_FAILED,
        )
        if self._current(backend):
            _log_change(self.pool.failed(backend.name, reason))

    def checked(self, backend: Backend, ok: bool, reason: str = "") -> None:
        """A health check of `backend` ended (`gateway.health`)."""
        _log.debug(
            "Health check of backend {backend}: {result}",
            backend=backend.name,
            result="ok" if ok else reason,
        )
        if self._current(backend):  # not moved by a reload meanwhile
            _log_change(self.pool.checked(backend.name, ok, reason))

    # --------------------------------------------------------------------- connecting

    def connect_one(
        self, backend: Backend, make: Callable[[Backend, Config, Any], P]
    ) -> Deferred[P]:
        """Connect to `backend` alone and wait for its 220 (a health check)."""
        config = self.config.for_backend(backend)
        return Deferred.fromCoroutine(self._open(backend, config, make))

    async def _open(
        self,
        backend: Backend,
        config: Config,
        make: Callable[[Backend, Config, Any], P],
        *,
        session: bool = False,
    ) -> P:
        """Connect to `backend` and wait for its 220; the protocol, still connected. For a
        `session`, the connect time is logged (`ftp_gateway_upstream_connect_seconds`)."""
        if self.is_self(backend.host, backend.port):
            raise NoBackend("that is this gateway (a connection loop)")
        timeout = config.health.timeout
        endpoint: Any = _endpoint(self.reactor, backend, timeout, config.data.source_address)
        tls = None
        if config.tls.upstream == "implicit":
            tls = tls_options(config)
            endpoint = wrapClientTLS(tls, endpoint)
        protocol = make(backend, config, tls)
        started = self.reactor.seconds()
        connecting: Deferred[Any] = endpoint.connect(_Prepared(protocol))  # type: ignore[arg-type]
        await connecting
        if session:
            _log.debug(
                "Upstream {host}:{port} connected",
                host=backend.host,
                port=backend.port,
                seconds=self.reactor.seconds() - started,
                event=Event.UPSTREAM_CONNECTED,
            )
        try:
            greeting = await protocol.greeting.addTimeout(timeout, self.reactor)
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
            raise
        if greeting.code != 220:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            raise BadGreeting(f"greeted with {greeting.code} {greeting.lines[0]}")
        return protocol


def _endpoint(reactor: Any, backend: Backend, timeout: float, source: str | None) -> Any:
    bind = (source, 0) if source else None
    host, port = backend.host, backend.port
    if not is_ip_literal(host):
        return HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    kind = TCP6ClientEndpoint if HostPort.of(host, port).family == 6 else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout, bindAddress=bind)


def _log_change(change: Change | None) -> None:
    if change is None:
        return
    backend = change.backend
    if change.up:
        _log.info(
            "Backend {backend} ({address}) is up: {reason}",
            backend=backend.name,
            address=backend.address,
            reason=change.reason,
            event=Event.BACKEND_UP,
        )
    else:
        _log.warn(
            "Backend {backend} ({address}) is down: {reason}",
            backend=backend.name,
            address=backend.address,
            reason=change.reason,
            event=Event.BACKEND_DOWN,
        )


def failure_reason(error: BaseException) -> str:
    if isinstance(error, defer.TimeoutError):
        return "no greeting within health.timeout"
    if isinstance(error, internet_error.TimeoutError):
        return "no connection within health.timeout"
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(".")
