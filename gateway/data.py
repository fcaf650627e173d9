"""Data connections: one-shot passive listeners, active connectors and the byte relay.

Every data connection starts paused: bytes stay in the kernel until both sides of a transfer
are connected and the relay starts. The relay pairs the two transports as producer and consumer
(`registerProducer(..., streaming=True)`) so a slow reader pauses a fast writer and memory per
transfer stays bounded by the transports' buffers, whatever the file size.

A data connection the gateway only reads from must stay silent until its peer has finished
sending: many clients close an upload's socket without reading from it, and bytes arriving at a
closed socket make the peer's kernel answer with a reset that throws away whatever the gateway
had not read yet. See `_PostHandshakeHold`.

The relay is the seam for a faster implementation: `relay(source, sink)` takes two connected
`DataConnection`s and returns a Deferred firing with a `RelayResult`; nothing else in the
gateway knows how bytes move.
"""

from __future__ import annotations

import fcntl
import random
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import HostPort
from gateway.events import Event
from gateway.proxyproto import ForwardedData
from gateway.rates import Draw
from gateway.throttle import ThrottledSource
from gateway.transfer import ReceiverClose, download_delivered

_log = Logger(namespace="gateway.data")


@dataclass(frozen=True, slots=True)
class RelayResult:
    ok: bool
    bytes: int
    detail: str
    path: str = "copy"  # how the bytes moved: "copy" (through Python) or "splice" (kernel)


class TLSReuseRequired(Exception):
    """A client data connection did not resume the control connection's TLS session."""


class TLSHandshakeTimeout(Exception):
    """A data connection's TLS handshake did not complete within `timeouts.data_connect`."""


@dataclass(frozen=True, slots=True)
class DataTLS:
    """How to protect one data connection (RFC 4217 PROT P).

    `server` says which TLS role the gateway plays: server towards clients, client towards
    upstreams, whichever side opened the TCP connection. `require_reuse` refuses a client
    whose handshake did not resume the control connection's session. `describe` turns a
    failed handshake into a sentence (why the upstream's certificate was refused).
    """

    options: Any
    server: bool
    require_reuse: bool = False
    describe: Callable[[Failure, Any], str] | None = None


class DataTLSFailed(Exception):
    """A data connection's TLS handshake failed; the message says why."""


class _PostHandshakeHold:
    """Sits between a TLS 1.3 server's record layer and its socket and, once the handshake is
    done, holds what the TLS layer sends on its own until the gateway sends data or closes.

    After the client's Finished a TLS 1.3 server sends NewSessionTicket messages (RFC 8446
    section 4.6.1). On a data connection that only carries an upload (RFC 4217 section 9),
    clients such as lftp (GnuTLS) never read: they write the file, send close_notify and close
    the socket, possibly before the ticket arrives. The client's kernel then answers the ticket
    with a reset, and the gateway loses every byte of the upload still in its receive buffer.
    The RFC lets the server send the ticket at any time after the client's Finished, so it goes
    out with the first data the gateway sends, or with its own close_notify: by then the
    gateway has read everything the client sent. Records keep their order.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def hold(self) -> None:
        self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(b"".join(held))

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._transport.write(data)
        else:
            self._held.append(data)

    def loseConnection(self) -> None:
        self.release()
        self._transport.loseConnection()


@implementer(IHandshakeListener)
class DataConnection(Protocol):
    """One data connection, paused from the moment it is ready until a relay takes it over.

    `ready` fires with the connection once it is usable: at once for plain TCP, after the
    handshake for TLS. Bytes that arrive before the relay starts (a TLS peer may send some with
    its last handshake flight) are kept and handed to the relay first. As a TLS 1.3 server the
    connection stays silent after the handshake until `send` says the gateway writes to it.

    With a `clock`, a TLS handshake that has not completed `handshake_timeout` seconds after
    the TCP connection was made fails `ready` and aborts the connection: a peer that connects
    and never finishes its handshake must not hold the transfer open.
    """

    def __init__(
        self,
        tls: DataTLS | None = None,
        *,
        accepted: bool = False,
        clock: IReactorTime | None = None,
        handshake_timeout: float = 30.0,
    ) -> None:
        self.tls = tls
        self.accepted = accepted
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._handshake_timer: IDelayedCall | None = None
        self.receiver: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[DataConnection, Failure], None] | None = None
        #: Called once before `abort` closes the socket: a relay that took the socket over
        #: from the transport (`gateway.splice`) lets go of it first.
        self.on_abort: Callable[[], None] | None = None
        self.ready: Deferred[DataConnection] = Deferred()
        self.lost = False
        self._early: list[bytes] = []
        self._hold: _PostHandshakeHold | None = None
        self._tls: Any = None  # the OpenSSL connection, once TLS started
        #: How a client's protected data connection ended, seen at the socket (see
        #: `_watch_peer_close`); None until then, and always for upstream connections.
        self.peer_close: ReceiverClose | None = None

    def connectionMade(self) -> None:
        if self.tls is None:
            self._ready()
            return
        # startTLS's `normal` is True when the TLS role follows the TCP role.
        normal = self.accepted == self.tls.server
        if self._clock is not None:
            self._handshake_timer = self._clock.callLater(
                self._handshake_timeout, self._handshake_timed_out
            )
        self.transport.startTLS(self.tls.options, normal)  # type: ignore[union-attr]
        self._tls = self.transport.getHandle()  # type: ignore[union-attr]
        if self.tls.server:
            # startTLS put a TLS layer between the socket and this protocol; its writes to
            # the socket go through the hold from now on.
            layer = self.transport.protocol  # type: ignore[union-attr]
            self._hold = layer.transport = _PostHandshakeHold(layer.transport)
            self._watch_peer_close()

    def _watch_peer_close(self) -> None:
        """Record how the client ends this connection, before the socket is closed.

        The TLS layer reports a peer that closed TCP without close_notify the same way whether
        it closed with FIN or reset the connection, and only after the socket is gone. The
        download rule (`transfer.download_delivered`) needs both, so the TCP transport's own
        `connectionLost` takes the snapshot first.
        """
        tcp = self.transport
        tcp_lost = tcp.connectionLost  # type: ignore[union-attr]

        def lost(reason: Failure) -> None:
            handle = tcp.getHandle()  # type: ignore[union-attr]
            self.peer_close = ReceiverClose(
                orderly=reason.check(error.ConnectionDone) is not None,
                close_notify_sent=bool(handle.get_shutdown() & SSL.SENT_SHUTDOWN),
                unacknowledged=_unacknowledged(tcp),
            )
            tcp_lost(reason)

        tcp.connectionLost = lost  # type: ignore[union-attr]

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if not self.ready.called:
            seconds = f"{self._handshake_timeout:g}"
            reason = f"TLS handshake not complete within {seconds} seconds"
            self.ready.errback(Failure(TLSHandshakeTimeout(reason)))
        self.abort()

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def handshakeCompleted(self) -> None:
        assert self.tls is not None
        self._stop_handshake_timer()
        if self.ready.called:
            return  # too late: the handshake timed out and the connection is being aborted
        if self.tls.require_reuse and not _session_reused(self.transport):
            self.ready.errback(
                Failure(TLSReuseRequired("the data connection did not resume the TLS session"))
            )
            self.abort()
            return
        # Before TLS 1.3 the server may still owe its last flight (ChangeCipherSpec, Finished)
        # at this point; in TLS 1.3 everything the server sends from here on is post-handshake.
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        if self._hold is not None and handle.get_protocol_version_name() == "TLSv1.3":
            self._hold.hold()
        self._ready()

    def _ready(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.ready.callback(self)

    def send(self) -> None:
        """The gateway is about to write to this connection: let held TLS records go first."""
        if self._hold is not None:
            self._hold.release()

    def attach(self, receiver: Callable[[bytes], None]) -> None:
        """Deliver everything from now on (and anything that came early) to `receiver`."""
        self.receiver = receiver
        early, self._early = self._early, []
        for data in early:
            receiver(data)

    def dataReceived(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver(data)
        else:
            self._early.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._stop_handshake_timer()
        if not self.ready.called:
            if self.tls is not None and self.tls.describe is not None and self._tls is not None:
                reason = Failure(DataTLSFailed(self.tls.describe(reason, self._tls)))
            self.ready.errback(reason)
        elif self.on_lost is not None:
            self.on_lost(self, reason)

    def abort(self) -> None:
        if self.on_abort is not None:
            release, self.on_abort = self.on_abort, None
            release()
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def _unacknowledged(tcp: Any) -> int | None:
    """Bytes written to `tcp` that its peer has not acknowledged yet: what Twisted still
    buffers plus the kernel's send queue (SIOCOUTQ, Linux: unsent and unacknowledged bytes).
    None when either cannot be read."""
    try:
        buffered = len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
        raw = fcntl.ioctl(tcp.socket.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except (AttributeError, OSError):
        return None
    return int(buffered + struct.unpack("i", raw)[0])


def _session_reused(transport: Any) -> bool:
    """Whether the TLS connection under `transport` resumed an earlier session.

    The only use of private API on this side: pyOpenSSL exposes no `SSL_session_reused`, so
    this calls OpenSSL through pyOpenSSL's own binding (`OpenSSL._util.lib`) on the raw `SSL *`
    pointer of the connection (`Connection._ssl`). Without it `require_data_session_reuse`
    cannot be enforced."""
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(transport.getHandle()._ssl))


def relay(
    source: DataConnection,
    sink: DataConnection,
    clock: IReactorTime,
    stall: float,
    log: Logger = _log,
    draw: Draw | None = None,
) -> Deferred[RelayResult]:
    """Move every byte from `source` to `sink` until `source` ends, then close `sink`.

    With a `draw` (bandwidth limits), the source reads only what the draw's buckets grant
    (`gateway.throttle.ThrottledSource`), and the draw is closed when the source ends.

    Succeeds only when the source ended cleanly and the sink's transport flushed and closed
    cleanly (for a client receiving a protected download, `transfer.download_delivered` says
    what "cleanly" means); any reset, the sink going away first, or `stall` seconds without a
    byte moving, fails the relay and aborts both sides.
    """
    done: Deferred[RelayResult] = Deferred()
    count = 0
    seen = -1
    source_ended = False
    ignored = _Ignored()
    throttle = None if draw is None else ThrottledSource(source.transport, draw, clock)
    producer: Any = source.transport if throttle is None else throttle

    def watchdog() -> None:
        nonlocal seen, timer
        if done.called:
            return
        if count == seen:
            finish(False, f"no data moved for {stall:g} seconds after {count} bytes")
            return
        seen = count
        timer = clock.callLater(stall, watchdog)

    timer = clock.callLater(0, watchdog)

    def finish(ok: bool, detail: str) -> None:
        if timer.active():
            timer.cancel()
        if throttle is not None:
            throttle.stop()
        if not done.called:
            ignored.report(sink, log)
            if not ok:
                source.abort()
                sink.abort()
            done.callback(RelayResult(ok, count, detail))

    def receive(data: bytes) -> None:
        nonlocal count
        count += len(data)
        sink.transport.write(data)  # type: ignore[union-attr]
        if throttle is not None:
            throttle.received(len(data))

    def source_lost(_: DataConnection, reason: Failure) -> None:
        nonlocal source_ended
        source_ended = True
        if throttle is not None:
            throttle.stop()
        if reason.check(error.ConnectionDone):
            sink.transport.unregisterProducer()  # type: ignore[union-attr]
            sink.transport.loseConnection()  # type: ignore[union-attr]
        else:
            finish(False, f"{_describe(reason)} after {count} bytes")

    def sink_lost(_: DataConnection, reason: Failure) -> None:
        if source_ended and reason.check(error.ConnectionDone):
            finish(True, f"{count} bytes")
        elif source_ended and sink.peer_close is not None and download_delivered(sink.peer_close):
            finish(True, f"{count} bytes (the client closed without TLS close_notify)")
        elif source_ended:
            finish(False, f"{_describe(reason)} while delivering the last bytes")
        else:
            finish(False, f"receiving side closed the connection after {count} bytes")

    source.attach(receive)
    sink.attach(ignored.receive)
    source.on_lost = source_lost
    sink.on_lost = sink_lost
    sink.send()
    sink.transport.registerProducer(producer, True)  # type: ignore[union-attr]
    # The sink never sends anything meaningful; reading it lets us see it close or reset.
    sink.transport.resumeProducing()  # type: ignore[union-attr]
    producer.resumeProducing()
    return done


class _Ignored:
    """Counts and drops what the receiving side of a transfer sends.

    RFC 959 section 3.2 has data flow one way per transfer: the side the gateway writes to
    has nothing to say on it, and the relay reads it only to notice a close or a reset. Bytes
    it sends anyway are dropped as they arrive, never kept, so a peer writing into its own
    download cannot grow the gateway. They are dropped rather than answered with 426: memory
    stays bounded either way, and a stray byte (a keep-alive, a client's CRLF) should not
    fail a transfer that delivered every byte. One log line per transfer says how many.
    """

    def __init__(self) -> None:
        self.bytes = 0

    def receive(self, data: bytes) -> None:
        self.bytes += len(data)

    def report(self, sink: DataConnection, log: Logger) -> None:
        """One line, on the session's logger `log` so it carries the session id."""
        if self.bytes:
            peer = sink.transport.getPeer() if sink.transport is not None else None
            log.warn(
                "Dropped {ignored} bytes sent by the receiving side {peer} of a transfer",
                ignored=self.bytes,
                peer=str(getattr(peer, "host", "")),
                event=Event.RELAY_IGNORED_BYTES,
            )


def _describe(reason: Failure) -> str:
    if reason.check(error.ConnectionDone):
        return "connection closed"
    return reason.getErrorMessage() or "connection lost"


class _OneShotFactory(Factory):
    noisy = False

    def __init__(self, listener: PassiveListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: object) -> Protocol | None:
        return self.listener._accept(addr)


class PassiveListener:
    """A listener that accepts one connection, from one IP, within a timeout.

    Connections from any other address are dropped and logged (data-port theft, RFC 2577
    section 5). After the first good connection, or the timeout, it stops listening. Behind a
    load balancer (`balancer`), a connection from the balancer must start with a PROXY header
    naming that IP (`proxyproto.ForwardedData`).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        *,
        bind_host: str,
        peer_host: str | None,
        timeout: float,
        port_range: tuple[int, int] | None,
        tls: DataTLS | None,
        on_failure: Callable[[str], None],
        balancer: str | None = None,
        log: Logger = _log,
    ) -> None:
        #: The session's logger, so a dropped connection is logged with its session id.
        self._log = log
        self._reactor = reactor
        self._clock = clock
        self._timeout = timeout
        self._peer = peer_host
        self._balancer = balancer
        self._tls = tls
        self._on_failure = on_failure
        self.connection: DataConnection | None = None
        self.accepted: Deferred[DataConnection] = Deferred()
        self._port: IListeningPort = self._listen(bind_host, port_range)
        self._timer = clock.callLater(timeout, self._timed_out, timeout)

    def _listen(self, host: str, port_range: tuple[int, int] | None) -> IListeningPort:
        factory = _OneShotFactory(self)
        if port_range is None:
            return self._reactor.listenTCP(0, factory, interface=host)
        low, high = port_range
        ports = list(range(low, high + 1))
        random.shuffle(ports)
        for port in ports[:256]:
            try:
                return self._reactor.listenTCP(port, factory, interface=host)
            except error.CannotListenError:
                continue
        raise error.CannotListenError(host, low, OSError("no free port in the passive range"))

    @property
    def address(self) -> HostPort:
        host = self._port.getHost()
        return HostPort.of(host.host, host.port)  # type: ignore[attr-defined]

    def _accept(self, addr: object, forwarded: bool = False) -> Protocol | None:
        peer = getattr(addr, "host", None)
        if self.connection is not None:
            return None
        if (
            not forwarded
            and self._balancer is not None
            and peer is not None
            and HostPort.of(peer, 1).host == self._balancer
        ):
            # Forwarded by the balancer that carried the control connection: the PROXY header
            # names who connected, and that must be the client.
            return ForwardedData(
                lambda source: self._accept(source, forwarded=True),
                self._clock,
                self._timeout,
                log=self._log,
            )
        if self._peer is not None and peer is not None and HostPort.of(peer, 1).host != self._peer:
            self._log.warn(
                "Dropped data connection from {peer} on a listener for {expected} "
                "(possible data-port theft)",
                peer=peer,
                expected=self._peer,
                event=Event.DATA_CONNECTION_DROPPED,
            )
            return None
        self.connection = DataConnection(
            self._tls, accepted=True, clock=self._clock, handshake_timeout=self._timeout
        )
        self.close()
        self.accepted.callback(self.connection)
        return self.connection

    def _timed_out(self, timeout: float) -> None:
        self.close()
        self._on_failure(f"no data connection within {timeout:g} seconds")

    def close(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        self._port.stopListening()
