"""The data connections of one client session: the Twisted shell's side of the data channel.

`DataSide` carries out the session's `ListenData`, `ConnectData`, `StartRelay` and `CloseData`
effects and reports back what happened (a listener bound, a connection made or failed, the
relay's outcome). It knows nothing of FTP: which connection to make, and what a failure means
for the client, is the session's to decide.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.python.failure import Failure

from gateway import proxyproto, splice
from gateway.addresses import HostPort
from gateway.data import DataConnection, DataTLS, PassiveListener, RelayResult
from gateway.effects import Effect, Side
from gateway.events import Event
from gateway.logs import SessionLogger
from gateway.rates import Direction, SessionRates
from gateway.session import Session
from gateway.sockets import hostport, one_shot, reason_of
from gateway.tls import ResumingClientCreator
from gateway.upstreamside import UpstreamControl


class DataOwner(Protocol):
    """What the data side uses of the client's `gateway.control.ClientControl`."""

    factory: Any
    transport: Any
    session: Session
    log: SessionLogger
    rates: SessionRates

    @property
    def upstream(self) -> UpstreamControl | None: ...

    def run(self, effects: list[Effect]) -> None: ...


class DataChannels:
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


class DataSide:
    """The data connections of one session: carries out `ListenData`, `ConnectData`,
    `StartRelay` and `CloseData`, and reports what happened to the session. Connections of a
    transfer that was closed meanwhile (stale channels) are aborted, never reported."""

    def __init__(self, owner: DataOwner) -> None:
        self._owner = owner
        self.channels = DataChannels()
        #: The current transfer's relay: when it started and the bytes it moved, for the
        #: transfer's log record (and so the transfer log).
        self._relay_started: float | None = None
        self._relay_bytes = 0

    def close(self) -> None:
        self.channels.close()
        self.channels = DataChannels()

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
        local = hostport(control.getHost())
        peer = hostport(control.getPeer())
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
        bind = (hostport(control.getHost()).host, 0)
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
        d = endpoint.connect(one_shot(connection))
        channels.pending.append(d)

        def failed(failure: Failure) -> None:
            if not failure.check(error.ConnectingCancelledError):
                self._failed(channels, side, reason_of(failure))

        d.addCallbacks(lambda conn: self._watch(channels, side, conn), failed)

    def _watch(self, channels: DataChannels, side: Side, connection: DataConnection) -> None:
        """A data connection exists; it counts once `ready` fires (after any TLS)."""
        if channels is not self.channels:  # a stale connection from a closed transfer
            connection.abort()
            return
        channels.connections[side] = connection
        self._owner.run(self._owner.session.data_opened(side))
        connection.ready.addCallbacks(
            lambda conn: self._made(channels, side, conn),
            lambda failure: self._failed(channels, side, reason_of(failure)),
        )

    def _made(self, channels: DataChannels, side: Side, connection: DataConnection) -> None:
        if channels is not self.channels:
            connection.abort()
            return
        connection.on_lost = lambda conn, reason: self._early_loss(channels, side, reason)
        self._owner.run(self._owner.session.data_connected(side))

    def _early_loss(self, channels: DataChannels, side: Side, reason: Failure) -> None:
        # Lost before the relay took it over: a paused connection only notices a close once
        # the relay resumes it, so this is mostly a reset seen while writing.
        if channels is self.channels and channels.relay is None:
            self._failed(channels, side, reason_of(reason))

    def _failed(self, channels: DataChannels, side: Side, reason: str) -> None:
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
