"""The session's upstream control connection: the Twisted shell's side of it.

`UpstreamControl` frames the upstream's replies for the session (and, for a backend the
balancer is still trying, holds its greeting until it is chosen). `UpstreamSide` opens that
connection (to an address the session approved, or through the balancer in reverse mode),
writes the session's commands to it, and reports it made or gone.
"""

from __future__ import annotations

import typing
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IAddress, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import proxyproto
from gateway.addresses import HostPort
from gateway.backends import Backend
from gateway.codec import MAX_REPLY_LINE, Command, Reply, ReplyReader
from gateway.config import Config
from gateway.effects import ConnectBackend, Effect, RetryBackend, Side
from gateway.errors import RemoteProtocolError
from gateway.events import Event
from gateway.flow import ControlFlow
from gateway.logs import SessionLogger
from gateway.session import Session
from gateway.sockets import hostport, no_delay, reason_of, tls_handle, write_now


class ControlOwner(typing.Protocol):
    """What the upstream side uses of the client's `gateway.control.ClientControl`."""

    factory: Any
    transport: Any
    peer: HostPort
    session: Session
    log: SessionLogger
    flow: ControlFlow
    upstream_side: UpstreamSide

    @property
    def upstream(self) -> UpstreamControl | None: ...

    def run(self, effects: list[Effect]) -> None: ...


@implementer(IHandshakeListener)
class UpstreamControl(Protocol):
    """The gateway's control connection to the upstream server: frames replies for the session.

    `tls_options` is set once TLS starts (explicit AUTH TLS or implicit); upstream data
    connections resume this connection's session through it.

    A backend connection (`gateway.balancer`) starts `held`: its greeting fires `greeting`
    and waits, unseen by the session, until the balancer has accepted it and `release` hands
    the connection and the greeting over.
    """

    def __init__(self, owner: ControlOwner, tls_options: Any = None, *, held: bool = False) -> None:
        self.owner = owner
        self.tls_options = tls_options
        self.handshake_done = False
        self.local: HostPort | None = None
        self.reader = self._new_reader()
        self.held = held
        self.greeting: Deferred[Reply] = Deferred()
        self._greeted: list[Reply] = []

    def release(self) -> None:
        """The balancer accepted this backend: the session takes the connection over."""
        self.held = False
        self.owner.upstream_side.made(self)
        if self.transport is not None and self.owner.upstream is self:
            self.owner.run(self.owner.session.upstream_replies(self._greeted))
        self._greeted = []

    def _held_replies(self, data: bytes) -> None:
        """Before `release`: keep what the backend says until its first final reply, which
        fires `greeting` (preliminary 120 lines are not shown: the 220 follows)."""
        try:
            replies = self.reader.feed(data)
        except RemoteProtocolError as e:
            if not self.greeting.called:
                self.greeting.errback(e)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if self.greeting.called:
            self._greeted.extend(replies)
            return
        for index, answer in enumerate(replies):
            if answer.final:
                self._greeted.append(answer)
                rest = replies[index + 1 :]
                self.greeting.callback(answer)  # may release this connection at once
                if self.held:
                    self._greeted.extend(rest)
                elif rest and self.owner.upstream is self:
                    self.owner.run(self.owner.session.upstream_replies(rest))
                return

    def _new_reader(self) -> ReplyReader:
        config = self.owner.factory.config
        return ReplyReader(
            max_line=max(config.limits.max_line, MAX_REPLY_LINE),
            max_lines=config.limits.max_reply_lines,
            max_bytes=config.limits.max_reply_bytes,
        )

    def connectionMade(self) -> None:
        no_delay(self.transport)
        version = self.owner.factory.config.upstream_proxy_protocol
        if version != "off":
            # First on the connection, before the server's greeting is even read (haproxy's
            # doc/proxy-protocol.txt, section 2): the client's real address for its logs.
            local = hostport(self.owner.transport.getHost())  # type: ignore[union-attr]
            self.transport.write(proxyproto.header(version, self.owner.peer, local))  # type: ignore[union-attr]
        if not self.held:
            self.owner.upstream_side.made(self)

    def start_tls(self, options: Any) -> None:
        self.tls_options = options
        self.reader = self._new_reader()
        self.transport.startTLS(options)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        # The certificate was verified during the handshake (`tls.UpstreamTLS`).
        self.handshake_done = True
        if not self.held and not self.owner.session.closed:
            self.owner.run(self.owner.session.upstream_tls_ready())

    def dataReceived(self, data: bytes) -> None:
        if self.held:
            self._held_replies(data)
            return
        try:
            replies = self.reader.feed(data)
        except RemoteProtocolError as e:
            self.owner.run(self.owner.session.upstream_failed(e))
            return
        # The session drops what followed a 234 in the same read (RFC 4217 section 4).
        self.owner.run(self.owner.session.upstream_replies(replies))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.held:
            if not self.greeting.called:
                if self.tls_options is not None and not self.handshake_done:
                    text = self.tls_options.describe(reason, tls_handle(self.transport))
                    self.greeting.errback(ConnectionError(text))
                else:
                    self.greeting.errback(reason)
            return
        if self.tls_options is not None and not self.handshake_done:
            reason_text = self.tls_options.describe(reason, tls_handle(self.transport))
            self.owner.run(self.owner.session.upstream_tls_failed(reason_text))
        self.owner.upstream_side.gone(self)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, owner: ControlOwner, tls_options: Any) -> None:
        self.owner = owner
        self.tls_options = tls_options

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return UpstreamControl(self.owner, self.tls_options)


class UpstreamSide:
    """The upstream control connection of one client session, as the shell keeps it: the
    connection (once made), the attempt under way, the lines the session sent before it was
    made, and in reverse mode the backend it belongs to."""

    def __init__(self, owner: ControlOwner) -> None:
        self._owner = owner
        self.control: UpstreamControl | None = None
        self._connecting: Deferred[Any] | None = None
        self._pending: list[bytes] = []
        #: Reverse mode: the backend this session was sent to (`gateway.balancer`).
        self.backend: Backend | None = None
        #: Reverse mode: what the session asked for, and the backends it could not use.
        self._request: ConnectBackend | None = None
        self._tried: set[str] = set()

    def send(self, command: Command) -> None:
        """Send `command` upstream, or keep it until the connection is made."""
        if self._owner.log.tracing:
            self._owner.log.debug("To upstream: {command}", command=str(command))
        line = command.encode()
        control = self.control
        if control is not None and control.transport is not None:
            write_now(control.transport, line)
        else:
            self._pending.append(line)

    def start_tls(self, name: str) -> None:
        """AUTH TLS was accepted: the handshake starts, verifying the upstream as `name`."""
        owner = self._owner
        assert self.control is not None
        self.control.start_tls(owner.factory.upstream_tls_options(name, owner.session.config))

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self.control is not None and self.control.transport is not None:
            self._owner.flow.close(Side.UPSTREAM, self.control.transport)

    def release_backend(self) -> None:
        """The client left: the backend has one session fewer (`Balancer.release`)."""
        if self.backend is not None:
            self._owner.factory.balancer.release(self.backend)
            self.backend = None

    def connect(self, host: str, port: int, implicit_tls: str | None) -> None:
        """Open the upstream control connection; with `implicit_tls` (the name to verify),
        TLS starts with the first byte (port 990 style)."""
        owner, factory = self._owner, self._owner.factory
        if factory.is_self(host, port):
            owner.log.warn(
                "Refused a connection loop to {host}:{port}",
                host=host,
                port=port,
                event=Event.UPSTREAM_LOOP_REFUSED,
            )
            owner.run(
                owner.session.upstream_connect_failed("that is this gateway (a connection loop)")
            )
            return
        endpoint = factory.client_endpoint(host, port)
        tls = None
        if implicit_tls is not None:
            tls = factory.upstream_tls_options(implicit_tls)
            endpoint = wrapClientTLS(tls, endpoint)
        started = factory.reactor.seconds()
        d = endpoint.connect(_UpstreamFactory(owner, tls))
        self._connecting = d

        def connected(_: object) -> None:
            self._connecting = None
            owner.log.debug(
                "Upstream {host}:{port} connected",
                host=host,
                port=port,
                seconds=factory.reactor.seconds() - started,
                event=Event.UPSTREAM_CONNECTED,
            )

        def failed(failure: Failure) -> None:
            self._connecting = None
            if not failure.check(error.ConnectingCancelledError):
                owner.run(owner.session.upstream_connect_failed(reason_of(failure)))

        d.addCallbacks(connected, failed)

    def connect_backend(self, effect: ConnectBackend, retry: RetryBackend | None = None) -> None:
        """Reverse mode: have the balancer connect a backend, failing over until one greets
        with 220; the session learns of it only then (or of the last failure, for its 421).
        With `retry`, the backends this session tried already are left out (with none left,
        the session ends with the reason the first could not be used, `Upstream._unusable`)."""
        owner = self._owner
        self._request = effect

        def make(backend: Backend, config: Config, tls: Any) -> UpstreamControl:
            return UpstreamControl(owner, tls, held=True)

        d = owner.factory.balancer.connect(
            make,
            client=owner.peer.host,
            user=effect.user,
            names=effect.names,
            exclude=frozenset(self._tried),
            **({"last": retry.reason} if retry is not None else {}),
        )
        self._connecting = d

        def connected(result: tuple[Backend, Config, UpstreamControl]) -> None:
            self._connecting = None
            backend, config, upstream = result
            if owner.session.closed:
                owner.factory.balancer.release(backend)
                upstream.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.backend = backend
            owner.session.backend_connected(config, backend.name)
            upstream.release()

        def failed(failure: Failure) -> None:
            self._connecting = None
            if failure.check(CancelledError, error.ConnectingCancelledError):
                return
            owner.run(owner.session.upstream_connect_failed(failure.getErrorMessage()))

        d.addCallbacks(connected, failed)

    def retry_backend(self, effect: RetryBackend) -> None:
        """The session cannot use the backend it was given (`RetryBackend`): drop the
        connection without telling the session, mark the backend failed, try the next."""
        owner = self._owner
        control, backend = self.control, self.backend
        self.control = None  # its close is not the session's
        if control is not None:
            owner.flow.detach(Side.UPSTREAM)
            if control.transport is not None:
                control.transport.abortConnection()
        if backend is not None:
            owner.factory.balancer.failed(backend, effect.reason)
            owner.factory.balancer.release(backend)
            self._tried.add(backend.name)
            self.backend = None
        self.connect_backend(self._request or ConnectBackend(), effect)

    def made(self, upstream: UpstreamControl) -> None:
        owner = self._owner
        if owner.session.closed:
            upstream.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.control = upstream
        transport = upstream.transport
        upstream.local = hostport(transport.getHost())  # type: ignore[union-attr]
        owner.factory.outbound[upstream.local] = hostport(transport.getPeer())  # type: ignore[union-attr]
        owner.flow.attach(Side.UPSTREAM, transport)
        owner.run(
            owner.session.upstream_connected(
                upstream.local,
                hostport(transport.getPeer()),  # type: ignore[union-attr]
            )
        )
        for line in self._pending:
            transport.write(line)  # type: ignore[union-attr]
        self._pending.clear()

    def gone(self, upstream: UpstreamControl) -> None:
        owner = self._owner
        if upstream.local is not None:
            owner.factory.outbound.pop(upstream.local, None)
        if upstream is self.control:
            owner.flow.detach(Side.UPSTREAM)
            self.control = None
            owner.run(owner.session.upstream_lost())
