"""The Twisted shell around `gateway.session`: control-connection protocols and the factory.

`ClientControl` feeds client bytes through the codec into its `Session` and carries out the
effects the session returns. It owns the session's upstream control connection
(`gateway.upstreamside`) and its data connections (`gateway.dataside`); none of the decisions
are made here.
"""

from __future__ import annotations

import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
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

from gateway.addresses import HostPort, is_ip_literal
from gateway.balancer import Balancer
from gateway.checkers import TextChecker, UserStoreUnavailable, make_checker
from gateway.codec import CommandReader, Reply
from gateway.config import Config
from gateway.dataside import DataSide
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
    RetryBackend,
    Side,
    StartClientTLS,
    StartRelay,
    StartUpstreamTLS,
    ToClient,
    ToUpstream,
)
from gateway.events import Event
from gateway.flow import ControlFlow
from gateway.listeners import interface_addresses, listener_addresses
from gateway.logs import SessionLogger
from gateway.policy import LoginThrottle, UpstreamPolicy, check_client, is_own_address
from gateway.rates import RateLimits
from gateway.session import Session
from gateway.sockets import (
    hostport,
    no_delay,
    original_destination,
    urgent_inline,
    write_now,
)
from gateway.tls import (
    client_options,
    server_options,
)
from gateway.upstreamside import UpstreamControl, UpstreamSide

_log = Logger(namespace="gateway.session")


@implementer(IHandshakeListener)
class ClientControl(Protocol):
    """One client session: the client control connection plus everything it owns."""

    factory: GatewayFactory

    def __init__(self) -> None:
        self.session: Session
        self.upstream_side = UpstreamSide(self)
        self._data = DataSide(self)
        self._tls_switched = False
        self._effects: deque[Effect] = deque()
        self._running = False
        self._refused = False
        self._reply_timer: IDelayedCall | None = None
        self._reply_mark: int | None = None
        #: Who the proxy login authenticated as: the checker's avatar ID (a ProxyIdentity,
        #: with directory groups, from the htpasswd: and ldap: checkers), for routing.
        self.proxy_identity: Any = None

    # ------------------------------------------------------------------ client connection

    def connectionMade(self) -> None:
        config = self.factory.config
        peer = hostport(self.transport.getPeer())  # type: ignore[union-attr]
        local = hostport(self.transport.getHost())  # type: ignore[union-attr]
        #: A short id on every line of this session, to pick them out of a busy log.
        self.session_id = secrets.token_hex(4)
        self.log = SessionLogger(
            self.session_id, namespace="gateway.session", source=self, level=config.log.level
        )
        self.peer = peer
        destination = original_destination(self.transport) if config.transparent else None
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
            mode=self.session.config.mode,
            upstream=self._upstream_name(),
            event=Event.SESSION_STARTED,
        )
        urgent_inline(self.transport)
        no_delay(self.transport)
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
        if self._refused or self.session.closed:
            return  # a closing session reads only to see the client close (`gateway.flow`)
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
    def upstream(self) -> UpstreamControl | None:
        """The upstream control connection, once made."""
        return self.upstream_side.control

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
        proxy_user = self.session.proxy_user
        self.log.info(
            "Session ended: client {client}, {mode} mode, upstream {upstream}, user {user}"
            + (", proxy user {proxy_user}" if proxy_user else ""),
            client=str(self.peer),
            mode=self.session.config.mode,
            upstream=self._upstream_name(),
            user=self.session.user or "-",
            proxy_user=proxy_user,
            event=Event.SESSION_ENDED,
        )
        for timer in (self._login_timer, self._idle_timer, self._reply_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.flow.stop()
        self.factory.session_ended(self)
        self.upstream_side.release_backend()
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

    def _start_client_tls(self, effect: StartClientTLS) -> None:
        self.reader.discard()
        self._tls_switched = True
        self.flow.tls_started(Side.CLIENT)
        self.transport.startTLS(self.factory.server_tls)  # type: ignore[union-attr]

    def _close_data(self, effect: CloseData) -> None:
        self._data.close()

    def _log(self, effect: Log) -> None:
        fields = effect.fields
        if fields.get("event") in (Event.TRANSFER_FINISHED, Event.TRANSFER_ABORTED):
            fields = {**fields, **self._data.transfer_measures()}
        getattr(self.log, effect.level)(effect.format, client=str(self.peer), **fields)

    def _write_client(self, answer: Reply) -> None:
        if self.log.tracing:
            self.log.debug("To client: {code}", code=answer.code)
        write_now(self.transport, answer.encode())

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


#: How the shell carries out each effect of the session.
_CARRY_OUT: dict[type[Any], Callable[[ClientControl, Any], None]] = {
    ToClient: lambda control, e: control._write_client(e.reply),
    ToUpstream: lambda control, e: control.upstream_side.send(e.command),
    Authenticate: lambda control, e: control._authenticate(e.user, e.password),
    ResolveUpstream: lambda control, e: control._resolve(e.host, e.port),
    ConnectBackend: lambda control, e: control.upstream_side.connect_backend(e),
    RetryBackend: lambda control, e: control.upstream_side.retry_backend(e),
    ConnectUpstream: lambda control, e: control.upstream_side.connect(
        e.host, e.port, e.tls_name if e.implicit_tls else None
    ),
    StartClientTLS: ClientControl._start_client_tls,
    StartUpstreamTLS: lambda control, e: control.upstream_side.start_tls(e.name),
    ListenData: lambda control, e: control._data.listen(e.side, e.tls),
    ConnectData: lambda control, e: control._data.connect(e.side, e.target, e.tls),
    StartRelay: lambda control, e: control._data.start_relay(e.source),
    CloseData: ClientControl._close_data,
    CloseClient: lambda control, e: control.flow.close(Side.CLIENT, control.transport),
    CloseUpstream: lambda control, e: control.upstream_side.close(),
    Log: ClientControl._log,
}


class _Refuse(Protocol):
    """Answers a refused client with one reply and closes."""

    def __init__(self, answer: Reply) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        self.transport.write(self.answer.encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


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
        peer = hostport(addr)
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
