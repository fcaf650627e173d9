"""The Twisted shell around `gateway.session`: control-connection protocols and the factory.

`ClientControl` feeds client bytes through the codec into its `Session` and carries out the
effects the session returns. It owns the session's upstream control connection and its data
connections; none of the decisions are made here.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorCore,
    IReactorTCP,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import proxyproto, splice
from gateway.addresses import HostPort, is_ip_literal
from gateway.backends import Backend
from gateway.balancer import Balancer
from gateway.checkers import TextChecker, UserStoreUnavailable, make_checker
from gateway.codec import MAX_REPLY_LINE, CommandReader, Reply, ReplyReader
from gateway.config import Config
from gateway.data import DataConnection, DataTLS, PassiveListener, RelayResult
from gateway.effects import (
    Authenticate,
    CloseClient,
    CloseData,
    CloseUpstream,
    ConnectBackend,
    ConnectData,
    ConnectUpstream,
    Effect,
    ListenData,
    Log,
    ResolveUpstream,
    Side,
    StartClientTLS,
    StartRelay,
    StartUpstreamTLS,
    ToClient,
    ToUpstream,
)
from gateway.errors import RemoteProtocolError
from gateway.events import Event
from gateway.flow import ControlFlow
from gateway.listeners import interface_addresses, listener_addresses
from gateway.logs import SessionLogger
from gateway.policy import LoginThrottle, UpstreamPolicy, check_client, is_own_address
from gateway.rates import Direction, RateLimits
from gateway.session import Session
from gateway.tls import (
    ResumingClientCreator,
    client_options,
    server_options,
)

_log = Logger(namespace="gateway.session")


def _hostport(address: IAddress) -> HostPort:
    return HostPort.of(address.host, address.port)  # type: ignore[attr-defined]


@implementer(IHandshakeListener)
class UpstreamControl(Protocol):
    """The gateway's control connection to the upstream server: frames replies for the session.

    `tls_options` is set once TLS starts (explicit AUTH TLS or implicit); upstream data
    connections resume this connection's session through it.

    A backend connection (`gateway.balancer`) starts `held`: its greeting fires `greeting`
    and waits, unseen by the session, until the balancer has accepted it and `release` hands
    the connection and the greeting over.
    """

    def __init__(
        self, owner: ClientControl, tls_options: Any = None, *, held: bool = False
    ) -> None:
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
        self.owner.upstream_made(self)
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
        _no_delay(self.transport)
        version = self.owner.factory.config.upstream_proxy_protocol
        if version != "off":
            # First on the connection, before the server's greeting is even read (haproxy's
            # doc/proxy-protocol.txt, section 2): the client's real address for its logs.
            local = _hostport(self.owner.transport.getHost())  # type: ignore[union-attr]
            self.transport.write(proxyproto.header(version, self.owner.peer, local))  # type: ignore[union-attr]
        if not self.held:
            self.owner.upstream_made(self)

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
                    text = self.tls_options.describe(reason, _tls_handle(self.transport))
                    self.greeting.errback(ConnectionError(text))
                else:
                    self.greeting.errback(reason)
            return
        if self.tls_options is not None and not self.handshake_done:
            reason_text = self.tls_options.describe(reason, _tls_handle(self.transport))
            self.owner.run(self.owner.session.upstream_tls_failed(reason_text))
        self.owner.upstream_gone(self)


class _DataChannels:
    """The data listeners and connections of one session's current transfer."""

    def __init__(self) -> None:
        self.listeners: dict[Side, PassiveListener] = {}
        self.connections: dict[Side, DataConnection] = {}
        self.pending: list[Deferred[Any]] = []
        self.relay: Deferred[RelayResult] | None = None

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        for pending in self.pending:
            if not pending.called:
                pending.cancel()
        for connection in self.connections.values():
            connection.abort()


class _DataSide:
    """The data connections of one session: carries out `ListenData`, `ConnectData`,
    `StartRelay` and `CloseData`, and reports what happened to the session. Connections of a
    transfer that was closed meanwhile (stale channels) are aborted, never reported."""

    def __init__(self, owner: ClientControl) -> None:
        self._owner = owner
        self.channels = _DataChannels()
        #: The current transfer's relay: when it started and the bytes it moved, for the
        #: transfer's log record (and so the transfer log).
        self._relay_started: float | None = None
        self._relay_bytes = 0

    def close(self) -> None:
        self.channels.close()
        self.channels = _DataChannels()

    def _control_transport(self, side: Side) -> Any:
        return self._owner.transport if side is Side.CLIENT else self._owner.upstream.transport  # type: ignore[union-attr]

    def _tls(self, side: Side, tls: bool) -> DataTLS | None:
        if not tls:
            return None
        if side is Side.CLIENT:
            return DataTLS(
                self._owner.factory.server_tls,
                server=True,
                require_reuse=self._owner.factory.config.tls.require_data_session_reuse,
            )
        assert self._owner.upstream is not None and self._owner.upstream.tls_options is not None
        control = self._owner.upstream.transport.getHandle()  # type: ignore[union-attr]
        creator = ResumingClientCreator(self._owner.upstream.tls_options, control)
        return DataTLS(creator, server=False, describe=creator.describe)

    def listen(self, side: Side, tls: bool) -> None:
        config = self._owner.factory.config
        control = self._control_transport(side)
        local = _hostport(control.getHost())
        peer = _hostport(control.getPeer())
        channels = self.channels
        try:
            listener = PassiveListener(
                self._owner.factory.reactor,
                self._owner.factory.reactor,
                bind_host=local.host,
                peer_host=peer.host,
                timeout=config.timeouts.data_connect,
                port_range=config.data.passive_ports,
                tls=self._tls(side, tls),
                on_failure=lambda reason: self._failed(channels, side, reason),
                balancer=proxyproto.balancer_of(control) if side is Side.CLIENT else None,
                log=self._owner.log,
            )
        except error.CannotListenError as e:
            # A range with no free port, or an address that cannot be bound: the session
            # answers the command with 425 and goes on.
            reason = str(e.socketError)
            self._owner.log.error(
                "Cannot open a passive listener: {error}",
                error=reason,
                event=Event.PASSIVE_LISTEN_FAILED,
            )
            self._owner.run(self._owner.session.data_failed(side, reason))
            return
        channels.listeners[side] = listener
        listener.accepted.addCallback(lambda conn: self._watch(channels, side, conn))
        self._owner.run(self._owner.session.data_listening(side, listener.address))

    def connect(self, side: Side, target: HostPort, tls: bool) -> None:
        if self._owner.factory.is_self(target.host, target.port):
            # Whichever peer named it: the gateway never opens a data connection to itself.
            self._owner.log.warn(
                "Refused a data connection to {target}: this gateway itself",
                target=str(target),
                event=Event.REFUSED,
                refused="data_target",
            )
            self._owner.run(
                self._owner.session.data_failed(side, "the data address is this gateway itself")
            )
            return
        config = self._owner.factory.config
        control = self._control_transport(side)
        # Data connections leave from the same local address as their control connection, so
        # the peer sees one IP for the whole session (servers check this; RFC 2577 section 5).
        bind = (_hostport(control.getHost()).host, 0)
        reactor = self._owner.factory.reactor
        endpoint_type = TCP4ClientEndpoint if target.family == 4 else TCP6ClientEndpoint
        endpoint = endpoint_type(
            reactor,
            target.host,
            target.port,
            timeout=config.timeouts.data_connect,
            bindAddress=bind,
        )
        channels = self.channels
        connection = DataConnection(
            self._tls(side, tls),
            clock=reactor,
            handshake_timeout=config.timeouts.data_connect,
        )
        d = endpoint.connect(_one_shot(connection))
        channels.pending.append(d)

        def failed(failure: Failure) -> None:
            if not failure.check(error.ConnectingCancelledError):
                self._failed(channels, side, _reason(failure))

        d.addCallbacks(lambda conn: self._watch(channels, side, conn), failed)

    def _watch(self, channels: _DataChannels, side: Side, connection: DataConnection) -> None:
        """A data connection exists; it counts once `ready` fires (after any TLS)."""
        if channels is not self.channels:  # a stale connection from a closed transfer
            connection.abort()
            return
        channels.connections[side] = connection
        self._owner.run(self._owner.session.data_opened(side))
        connection.ready.addCallbacks(
            lambda conn: self._made(channels, side, conn),
            lambda failure: self._failed(channels, side, _reason(failure)),
        )

    def _made(self, channels: _DataChannels, side: Side, connection: DataConnection) -> None:
        if channels is not self.channels:
            connection.abort()
            return
        connection.on_lost = lambda conn, reason: self._early_loss(channels, side, reason)
        self._owner.run(self._owner.session.data_connected(side))

    def _early_loss(self, channels: _DataChannels, side: Side, reason: Failure) -> None:
        # Lost before the relay took it over: a paused connection only notices a close once
        # the relay resumes it, so this is mostly a reset seen while writing.
        if channels is self.channels and channels.relay is None:
            self._failed(channels, side, _reason(reason))

    def _failed(self, channels: _DataChannels, side: Side, reason: str) -> None:
        if channels is self.channels:
            self._owner.run(self._owner.session.data_failed(side, reason))

    def _count_relayed(self, source: DataConnection) -> None:
        """Count the bytes the relay takes from `source` as they pass, so a transfer cut short
        (ABOR, shutdown) is recorded with what it moved before its relay reports."""
        deliver = source.receiver
        if deliver is None:
            return

        def counted(data: bytes) -> None:
            self._relay_bytes += len(data)
            deliver(data)

        source.receiver = counted

    def transfer_measures(self) -> dict[str, float | int]:
        """Bytes the finished transfer's relay moved and for how many seconds."""
        started, self._relay_started = self._relay_started, None
        moved, self._relay_bytes = self._relay_bytes, 0
        seconds = 0.0 if started is None else self._owner.factory.reactor.seconds() - started
        return {"bytes": moved, "seconds": round(seconds, 3)}

    def start_relay(self, source: Side) -> None:
        channels = self.channels
        sink = Side.CLIENT if source is Side.UPSTREAM else Side.UPSTREAM
        reactor = self._owner.factory.reactor
        config = self._owner.factory.config
        direction: Direction = "download" if source is Side.UPSTREAM else "upload"
        d = splice.relay(
            channels.connections[source],
            channels.connections[sink],
            reactor,
            config.timeouts.stall,
            config.data.relay,
            log=self._owner.log,
            draw=self._owner.rates.draw(direction, self._owner.session.login_name),
        )
        channels.relay = d
        started = reactor.seconds()
        self._owner.log.debug(
            "Transfer {direction} started", direction=direction, event=Event.RELAY_STARTED
        )
        self._relay_started = started
        self._relay_bytes = 0
        self._count_relayed(channels.connections[source])

        def finished(result: RelayResult) -> None:
            self._owner.log.info(
                "Transfer {direction} {outcome}: {detail} ({relay})",
                direction=direction,
                outcome="complete" if result.ok else "failed",
                detail=result.detail,
                bytes=result.bytes,
                seconds=reactor.seconds() - started,
                relay=result.path,
                event=Event.RELAY_FINISHED,
            )
            if channels is self.channels:
                self._relay_bytes = max(self._relay_bytes, result.bytes)
                self._owner.run(self._owner.session.relay_finished(result.ok, result.detail))

        d.addCallback(finished)


@implementer(IHandshakeListener)
class ClientControl(Protocol):
    """One client session: the client control connection plus everything it owns."""

    factory: GatewayFactory

    def __init__(self) -> None:
        self.session: Session
        self.upstream: UpstreamControl | None = None
        self._upstream_connecting: Deferred[Any] | None = None
        self._data = _DataSide(self)
        self._pending_upstream: list[bytes] = []
        self._tls_switched = False
        self._effects: deque[Effect] = deque()
        self._running = False
        self._refused = False
        self._reply_timer: IDelayedCall | None = None
        self._reply_mark: int | None = None
        #: Who the proxy login authenticated as: the checker's avatar ID (a ProxyIdentity,
        #: with directory groups, from the htpasswd: and ldap: checkers), for routing.
        self.proxy_identity: Any = None
        #: Reverse mode: the backend this session was sent to (`gateway.balancer`).
        self.backend: Backend | None = None

    # ------------------------------------------------------------------ client connection

    def connectionMade(self) -> None:
        config = self.factory.config
        peer = _hostport(self.transport.getPeer())  # type: ignore[union-attr]
        local = _hostport(self.transport.getHost())  # type: ignore[union-attr]
        #: A short id on every line of this session, to pick them out of a busy log.
        self.session_id = secrets.token_hex(4)
        self.log = SessionLogger(
            self.session_id, namespace="gateway.session", source=self, level=config.log.level
        )
        self.peer = peer
        destination = _original_destination(self.transport) if config.transparent else None
        if self.factory.is_loop(peer, destination or local):
            self._refuse_loop()
            return
        if local not in self.factory.listening:
            self.factory.add_listener(local)
        self.reader = CommandReader(max_line=config.limits.max_line)
        self.session = Session(
            config,
            client_peer=peer,
            client_local=local,
            policy=self.factory.policy,
            implicit_tls=ISSLTransport.providedBy(self.transport),
            destination=destination,
        )
        self.rates = self.factory.rates.session()
        self.log.info(
            "Session started: client {client}, {mode} mode, upstream {upstream}",
            client=str(peer),
            mode=self.session.mode,
            upstream=self._upstream_name(),
            event=Event.SESSION_STARTED,
        )
        _urgent_inline(self.transport)
        _no_delay(self.transport)
        clock = self.factory.reactor
        self.flow = ControlFlow(clock, config.timeouts.control_send, self._not_reading)
        if self.session.client_tls:
            self.flow.tls_started(Side.CLIENT)  # implicit TLS: the handshake comes first
        self.flow.attach(Side.CLIENT, self.transport)
        self._login_timer = clock.callLater(config.timeouts.login, self._timer, "login")
        self._idle_timer = clock.callLater(config.timeouts.idle, self._timer, "idle")
        self.run(self.session.start())

    def _refuse_loop(self) -> None:
        text = "Connection loop: the gateway was asked to connect to itself."
        _log.warn(
            "Refused client {client}: {reason}",
            client=str(self.peer),
            reason=text,
            event=Event.SESSION_REFUSED,
            reason_key="loop",
        )
        self._refused = True
        self.transport.write(Reply.of(421, text).encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _timer(self, what: str) -> None:
        # The session decides whether the timer still counts (a transfer in progress is not
        # idle: its own timeouts bound it); one that did not count starts over.
        self.run(self.session.timed_out(what))
        if what == "idle" and not self.session.closed:
            self._idle_timer = self.factory.reactor.callLater(
                self.factory.config.timeouts.idle, self._timer, "idle"
            )

    def _watch_replies(self) -> None:
        """Keep one `timeouts.reply` timer running while the session waits for the upstream,
        restarted by every reply (the session's mark changes)."""
        mark = self.session.awaiting_reply
        timer = self._reply_timer
        if mark is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._reply_timer = self._reply_mark = None
            return
        if timer is not None and timer.active() and mark == self._reply_mark:
            return
        if timer is not None and timer.active():
            timer.cancel()
        self._reply_mark = mark
        self._reply_timer = self.factory.reactor.callLater(
            self.factory.config.timeouts.reply, self._reply_timed_out, mark
        )

    def _reply_timed_out(self, mark: int) -> None:
        self._reply_timer = None
        self.run(self.session.timed_out("reply", mark))

    def handshakeCompleted(self) -> None:
        self.flow.tls_done(Side.CLIENT)

    def _not_reading(self, side: Side) -> None:
        """`side` left its write buffer full too long: 421, then abort its connection, as a
        clean close would wait for it to read what is buffered."""
        upstream = self.upstream.transport if self.upstream is not None else None
        stuck = self.transport if side is Side.CLIENT else upstream
        self.run(self.session.peer_not_reading(side, self.factory.config.timeouts.control_send))
        if stuck is not None:
            stuck.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._idle_timer.active():
            self._idle_timer.reset(self.factory.config.timeouts.idle)
        for event in self.reader.feed(data):
            if self.session.closed:
                return
            self.run(self.session.client_line(event))
            if self._tls_switched:
                # RFC 4217 section 4: nothing sent in clear text after AUTH may be acted on.
                self._tls_switched = False
                return

    def _upstream_name(self) -> str:
        session = self.session
        if session.upstream_peer is not None:
            return str(session.upstream_peer)
        if session.fixed_upstream is not None:
            host, port = session.fixed_upstream
            return str(HostPort.of(host, port)) if is_ip_literal(host) else f"{host}:{port}"
        backends = session.config.pool_backends
        if len(backends) == 1:  # the `upstream` shorthand, or one [[backends]] entry
            return backends[0].address
        return "not chosen yet"

    @property
    def ended(self) -> bool:
        """Whether this connection has no session left to run (closed, or refused)."""
        return self._refused or self.session.closed

    def shutdown(self, *, immediate: bool) -> None:
        """The gateway is stopping (`gateway.shutdown`)."""
        if not self.ended:
            self.run(self.session.shutdown(immediate=immediate))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._refused:
            self.factory.session_ended(self)
            return
        self.log.info(
            "Session ended: client {client}, {mode} mode, upstream {upstream}, user {user}",
            client=str(self.peer),
            mode=self.session.mode,
            upstream=self._upstream_name(),
            user=self.session.user or "-",
            event=Event.SESSION_ENDED,
        )
        for timer in (self._login_timer, self._idle_timer, self._reply_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.flow.stop()
        self.factory.session_ended(self)
        if self.backend is not None:
            self.factory.balancer.release(self.backend)
            self.backend = None
        self.run(self.session.client_lost())

    # ---------------------------------------------------------------------- effects

    def run(self, effects: list[Effect]) -> None:
        """Carry out `effects` in order. Carrying one out may report back to the session at
        once (a listener bound, a loop refused); the effects of that report are queued behind
        the ones still to run, never run in the middle of them."""
        self._effects.extend(effects)
        if self._running:
            return
        self._running = True
        try:
            while self._effects:
                self._do(self._effects.popleft())
        finally:
            self._running = False
        self._watch_replies()

    def _do(self, effect: Effect) -> None:
        _CARRY_OUT[type(effect)](self, effect)

    def _to_upstream(self, effect: ToUpstream) -> None:
        if self.log.tracing:
            self.log.debug("To upstream: {command}", command=str(effect.command))
        line = effect.command.encode()
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(line)
        else:
            self._pending_upstream.append(line)

    def _start_client_tls(self, effect: StartClientTLS) -> None:
        self.reader.discard()
        self._tls_switched = True
        self.flow.tls_started(Side.CLIENT)
        self.transport.startTLS(self.factory.server_tls)  # type: ignore[union-attr]

    def _start_upstream_tls(self, effect: StartUpstreamTLS) -> None:
        assert self.upstream is not None
        options = self.factory.upstream_tls_options(effect.name, self.session.config)
        self.upstream.start_tls(options)

    def _close_data(self, effect: CloseData) -> None:
        self._data.close()

    def _close_upstream(self, effect: CloseUpstream) -> None:
        if self._upstream_connecting is not None:
            self._upstream_connecting.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.flow.close(Side.UPSTREAM, self.upstream.transport)

    def _log(self, effect: Log) -> None:
        fields = effect.fields
        if fields.get("event") in (Event.TRANSFER_FINISHED, Event.TRANSFER_ABORTED):
            fields = {**fields, **self._data.transfer_measures()}
        getattr(self.log, effect.level)(effect.format, client=str(self.peer), **fields)

    def _write_client(self, answer: Reply) -> None:
        if self.log.tracing:
            self.log.debug("To client: {code}", code=answer.code)
        self.transport.write(answer.encode())  # type: ignore[union-attr]

    # ------------------------------------------------------------------- upstream control

    def _resolve(self, host: str, port: int) -> None:
        # Resolve once; policy judges the addresses and the session connects to exactly the
        # address it approved (no second lookup between check and connect).
        d = self.factory.resolve(host, port)
        d.addCallbacks(
            lambda addresses: self.run(self.session.upstream_resolved(addresses)),
            lambda failure: self.run(self.session.upstream_resolved([], failure.getErrorMessage())),
        )

    def _authenticate(self, user: str, password: str) -> None:
        throttle = self.factory.login_throttle
        now = self.factory.reactor.seconds()
        if throttle.blocked(self.peer.host, now):
            self.run(self.session.proxy_auth_result(False, throttled=True))
            return

        def done(avatar: Any) -> None:
            if avatar is None:
                throttle.failed(self.peer.host, self.factory.reactor.seconds())
            self.proxy_identity = avatar
            groups = frozenset(getattr(avatar, "groups", ()))
            self.run(self.session.proxy_auth_result(avatar is not None, groups=groups))

        def unavailable(failure: Failure) -> None:
            failure.trap(UserStoreUnavailable)
            self.log.error(
                "Proxy login for {user} could not be checked: {reason}",
                client=str(self.peer),
                user=user,
                reason=str(failure.value),
                event=Event.USER_STORE_UNAVAILABLE,
            )
            self.run(self.session.proxy_auth_result(False, unavailable=True))

        self.factory.check_proxy_login(user, password).addCallbacks(done, unavailable)

    def _connect_upstream(self, host: str, port: int, implicit_tls: str | None) -> None:
        """Open the upstream control connection; with `implicit_tls` (the name to verify),
        TLS starts with the first byte (port 990 style)."""
        if self.factory.is_self(host, port):
            self.log.warn(
                "Refused a connection loop to {host}:{port}",
                host=host,
                port=port,
                event=Event.UPSTREAM_LOOP_REFUSED,
            )
            self.run(
                self.session.upstream_connect_failed("that is this gateway (a connection loop)")
            )
            return
        endpoint = self.factory.client_endpoint(host, port)
        tls = None
        if implicit_tls is not None:
            tls = self.factory.upstream_tls_options(implicit_tls)
            endpoint = wrapClientTLS(tls, endpoint)
        started = self.factory.reactor.seconds()
        d = endpoint.connect(_UpstreamFactory(self, tls))
        self._upstream_connecting = d

        def connected(_: object) -> None:
            self._upstream_connecting = None
            self.log.debug(
                "Upstream {host}:{port} connected",
                host=host,
                port=port,
                seconds=self.factory.reactor.seconds() - started,
                event=Event.UPSTREAM_CONNECTED,
            )

        def failed(failure: Failure) -> None:
            self._upstream_connecting = None
            if not failure.check(error.ConnectingCancelledError):
                self.run(self.session.upstream_connect_failed(_reason(failure)))

        d.addCallbacks(connected, failed)

    def _connect_backend(self, effect: ConnectBackend) -> None:
        """Reverse mode: have the balancer connect a backend, failing over until one greets
        with 220; the session learns of it only then (or of the last failure, for its 421)."""

        def make(backend: Backend, config: Config, tls: Any) -> UpstreamControl:
            return UpstreamControl(self, tls, held=True)

        d = self.factory.balancer.connect(
            make, client=self.peer.host, user=effect.user, names=effect.names
        )
        self._upstream_connecting = d

        def connected(result: tuple[Backend, Config, UpstreamControl]) -> None:
            self._upstream_connecting = None
            backend, config, upstream = result
            if self.session.closed:
                self.factory.balancer.release(backend)
                upstream.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.backend = backend
            self.session.backend_connected(config)
            upstream.release()

        def failed(failure: Failure) -> None:
            self._upstream_connecting = None
            if not failure.check(CancelledError, error.ConnectingCancelledError):
                self.run(self.session.upstream_connect_failed(failure.getErrorMessage()))

        d.addCallbacks(connected, failed)

    def upstream_made(self, upstream: UpstreamControl) -> None:
        if self.session.closed:
            upstream.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.upstream = upstream
        transport = upstream.transport
        upstream.local = _hostport(transport.getHost())  # type: ignore[union-attr]
        self.factory.outbound[upstream.local] = _hostport(transport.getPeer())  # type: ignore[union-attr]
        self.flow.attach(Side.UPSTREAM, transport)
        self.run(
            self.session.upstream_connected(
                upstream.local,
                _hostport(transport.getPeer()),  # type: ignore[union-attr]
            )
        )
        for line in self._pending_upstream:
            transport.write(line)  # type: ignore[union-attr]
        self._pending_upstream.clear()

    def upstream_gone(self, upstream: UpstreamControl) -> None:
        if upstream.local is not None:
            self.factory.outbound.pop(upstream.local, None)
        if upstream is self.upstream:
            self.flow.detach(Side.UPSTREAM)
            self.upstream = None
            self.run(self.session.upstream_lost())


#: How the shell carries out each effect of the session.
_CARRY_OUT: dict[type[Any], Callable[[ClientControl, Any], None]] = {
    ToClient: lambda control, e: control._write_client(e.reply),
    ToUpstream: ClientControl._to_upstream,
    Authenticate: lambda control, e: control._authenticate(e.user, e.password),
    ResolveUpstream: lambda control, e: control._resolve(e.host, e.port),
    ConnectBackend: ClientControl._connect_backend,
    ConnectUpstream: lambda control, e: control._connect_upstream(
        e.host, e.port, e.tls_name if e.implicit_tls else None
    ),
    StartClientTLS: ClientControl._start_client_tls,
    StartUpstreamTLS: ClientControl._start_upstream_tls,
    ListenData: lambda control, e: control._data.listen(e.side, e.tls),
    ConnectData: lambda control, e: control._data.connect(e.side, e.target, e.tls),
    StartRelay: lambda control, e: control._data.start_relay(e.source),
    CloseData: ClientControl._close_data,
    CloseClient: lambda control, e: control.flow.close(Side.CLIENT, control.transport),
    CloseUpstream: ClientControl._close_upstream,
    Log: ClientControl._log,
}


def _one_shot(protocol: Protocol) -> Factory:
    """A factory for one prepared protocol: what `endpoints.connectProtocol` builds, but
    quiet, since that one logs "Starting factory" and "Stopping factory" for every data
    connection."""
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return factory


class _Refuse(Protocol):
    """Answers a refused client with one reply and closes."""

    def __init__(self, answer: Reply) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        self.transport.write(self.answer.encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, owner: ClientControl, tls_options: Any) -> None:
        self.owner = owner
        self.tls_options = tls_options

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return UpstreamControl(self.owner, self.tls_options)


def _urgent_inline(transport: Any) -> None:
    """Read TCP urgent data in line. RFC 959 section 4.1.3 has clients send Telnet Synch (IAC
    DM) as urgent data before ABOR, and Python's ftplib sends the whole ABOR line that way;
    without SO_OOBINLINE the kernel keeps the urgent byte out of the stream and the line
    never completes."""
    try:
        handle = transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    except (AttributeError, OSError):
        pass  # not a socket (e.g. a test transport or a UNIX endpoint)


#: getsockopt option for a connection's destination before NAT: SO_ORIGINAL_DST at SOL_IP
#: (<linux/netfilter_ipv4.h>), IP6T_SO_ORIGINAL_DST at SOL_IPV6 (<linux/netfilter_ipv6/
#: ip6_tables.h>); both are 80.
_SO_ORIGINAL_DST = 80


def _original_destination(transport: Any) -> HostPort | None:
    """Where the client connected before netfilter redirected it to the gateway (nftables or
    iptables REDIRECT or DNAT), from the connection tracking entry; None for a connection made
    to the gateway itself, or when that cannot be read."""
    try:
        handle = transport.getHandle()
        if handle.family == socket.AF_INET6:
            raw = handle.getsockopt(socket.SOL_IPV6, _SO_ORIGINAL_DST, 28)  # sockaddr_in6
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = handle.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)  # sockaddr_in
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        destination = HostPort.of(host, int.from_bytes(raw[2:4], "big"))
    except (AttributeError, OSError, ValueError):
        return None
    # Without NAT the tracked destination is the gateway's own address.
    return None if destination == _hostport(transport.getHost()) else destination


def _no_delay(transport: Any) -> None:
    """Send each control line at once (TCP_NODELAY). The gateway writes whole commands and
    replies; with Nagle's algorithm a reply written while the previous one is unacknowledged
    waits for the peer's delayed ACK, 40 ms or more per exchange."""
    with contextlib.suppress(AttributeError, OSError):  # not TCP: a UNIX endpoint, a test double
        transport.setTcpNoDelay(True)


def _tls_handle(transport: Any) -> Any:
    """The OpenSSL connection under a TLS transport, while it is being torn down."""
    try:
        return transport.getHandle()
    except AttributeError:
        return None


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() or failure.type.__name__


class GatewayFactory(Factory):
    """Builds one `ClientControl` per accepted client; holds what sessions share."""

    protocol = ClientControl
    noisy = False

    def __init__(self, config: Config, reactor: Any) -> None:
        self.reactor: IReactorTCP & IReactorTime & IReactorCore = reactor  # type: ignore[valid-type]
        self.sessions: dict[str, int] = {}
        self.active = 0
        #: Every running session, so a shutdown can reach them (`gateway.shutdown`).
        self.protocols: set[ClientControl] = set()
        #: Called after each session ends (the shutdown waits on them).
        self.on_session_ended: Callable[[ClientControl], None] | None = None
        #: The gateway's own upstream control connections, local end to peer: a client
        #: connecting from one of those local ends to that peer is the gateway itself.
        self.outbound: dict[HostPort, HostPort] = {}
        #: Every address the gateway listens on (`add_listener`): never an upstream or a data
        #: target.
        self.listening: set[HostPort] = set()
        self.login_throttle = LoginThrottle(limit=config.limits.max_failed_logins, window=60.0)
        #: Reverse mode's backends, their health and sessions (`gateway.balancer`).
        self.balancer = Balancer(config, reactor)
        self.balancer.is_self = self.is_self
        self.rates = self._rate_limits(config)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Use `config` for sessions from now on (at start, and on reload). Running sessions
        keep the configuration and policy they started with; the login throttle keeps its
        count of failures."""
        server_tls: Any = None
        if config.tls.certificate is not None:
            server_tls = server_options(
                config.tls.certificate, config.tls.private_key, config.tls.min_version
            )
        self.checkers = [
            make_checker(description, config, self.reactor) for description in config.proxy_auth
        ]
        self.policy = UpstreamPolicy(
            rules=config.upstream_policy_rules, own_addresses=frozenset(self.listening)
        )
        self.login_throttle.limit = config.limits.max_failed_logins
        if config is not self.balancer.config:
            self.balancer.reconfigure(config)
        rates = (
            config.limits.rate_per_session,
            config.limits.rate_per_user,
            config.limits.rate_total,
        )
        if not self.rates.same_settings(*rates):
            # Changed limits apply to new sessions; running ones keep their buckets.
            self.rates = self._rate_limits(config)
        self.server_tls = server_tls
        self.config = config

    def _rate_limits(self, config: Config) -> RateLimits:
        return RateLimits(
            per_session=config.limits.rate_per_session,
            per_user=config.limits.rate_per_user,
            total=config.limits.rate_total,
            clock=self.reactor.seconds,
        )

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        peer = _hostport(addr)
        refusal = self._admission(peer)
        if refusal is not None:
            key, text = refusal
            _log.warn(
                "Refused client {client}: {reason}",
                client=str(peer),
                reason=text,
                event=Event.SESSION_REFUSED,
                reason_key=key,
            )
            return _Refuse(Reply.of(421, text))
        self.active += 1
        self.sessions[peer.host] = self.sessions.get(peer.host, 0) + 1
        protocol = super().buildProtocol(addr)
        if isinstance(protocol, ClientControl):
            self.protocols.add(protocol)
        return protocol

    def add_listener(self, address: HostPort) -> None:
        """Learn a bound listener's address (at start-up, before any client uses it); for a
        wildcard one, every local interface address on its port."""
        self.listening |= listener_addresses(address, interface_addresses())
        self.policy = replace(self.policy, own_addresses=frozenset(self.listening))

    def is_loop(self, peer: HostPort, destination: HostPort) -> bool:
        """Whether a client connected from `peer` to `destination` is one of the gateway's own
        upstream connections: both ends must match, so a client whose port happens to equal
        one of the gateway's outbound ports is not mistaken for one."""
        return self.outbound.get(peer) == destination

    def _admission(self, peer: HostPort) -> tuple[str, str] | None:
        """Why a new client may not start a session (a short key and a sentence), or None."""
        decision = check_client(self.config.client_policy_rules, peer.host)
        if not decision.allowed:
            return "client_policy", "Access denied by the gateway's client policy."
        if self.active >= self.config.limits.max_sessions:
            return "max_sessions", "Too many sessions on this gateway; try again later."
        if self.sessions.get(peer.host, 0) >= self.config.limits.max_sessions_per_ip:
            return "max_sessions_per_ip", "Too many sessions from your address; try again later."
        return None

    def is_self(self, host: str, port: int) -> bool:
        """Whether connecting to host:port would reach this gateway's own listener."""
        if not is_ip_literal(host):
            return False
        return is_own_address(frozenset(self.listening), ip_address(host), port)

    def session_ended(self, protocol: ClientControl) -> None:
        self.protocols.discard(protocol)
        if self.on_session_ended is not None:
            self.on_session_ended(protocol)
        self.active -= 1
        left = self.sessions.get(protocol.peer.host, 1) - 1
        if left > 0:
            self.sessions[protocol.peer.host] = left
        else:
            self.sessions.pop(protocol.peer.host, None)

    def check_proxy_login(self, user: str, password: str) -> Deferred[Any]:
        """The avatar ID of the first configured twisted.cred checker that accepts the
        credentials, or None. Fails with UserStoreUnavailable when none accepted and a user
        store could not answer (the client should try later, not count it as a failure)."""
        # Checkers disagree on text or bytes (file: reads bytes, memory: keeps str): offer both,
        # except to user-store checkers, which take text and must see one attempt per login
        # (one slow hash; one bind, which a directory may count towards a lockout).
        text = UsernamePassword(user, password)  # type: ignore[arg-type]
        both = [UsernamePassword(user.encode(), password.encode()), text]

        async def check() -> Any:
            unavailable: UserStoreUnavailable | None = None
            for checker in self.checkers:
                if IUsernamePassword not in checker.credentialInterfaces:
                    continue
                for credentials in [text] if isinstance(checker, TextChecker) else both:
                    try:
                        return await maybeDeferred(checker.requestAvatarId, credentials)
                    except UserStoreUnavailable as e:
                        unavailable = e
                    except Exception:
                        continue
            if unavailable is not None:
                raise unavailable
            return None

        return Deferred.fromCoroutine(check())

    def upstream_tls_options(self, name: str, config: Config | None = None) -> Any:
        """A fresh client context per upstream session: its data connections resume the
        session of its control connection, and only that one. `config`: the session's, which
        carries its backend's TLS settings in reverse mode."""
        config = config or self.config
        return client_options(
            name,
            ca_file=config.tls.upstream_ca_file,
            pin=config.tls.upstream_fingerprint,
            min_version=config.tls.min_version,
        )

    def client_endpoint(self, host: str, port: int) -> Any:
        bind = (self.config.data.source_address, 0) if self.config.data.source_address else None
        if not is_ip_literal(host):
            # Reverse mode names its upstream; HostnameEndpoint tries IPv6 and IPv4 (RFC 8305).
            return HostnameEndpoint(self.reactor, host, port, timeout=30, bindAddress=bind)
        if HostPort.of(host, port).family == 6:
            return TCP6ClientEndpoint(self.reactor, host, port, timeout=30, bindAddress=bind)
        return TCP4ClientEndpoint(self.reactor, host, port, timeout=30, bindAddress=bind)

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        """Every address `host` resolves to, IPv4 and IPv6, in the resolver's order."""

        def lookup() -> list[str]:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return list(dict.fromkeys(str(info[4][0]) for info in infos))

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), lookup)
