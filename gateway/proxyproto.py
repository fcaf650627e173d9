"""The PROXY protocol (HAProxy's, versions 1 and 2) on both sides of the gateway.

Clients: a `haproxy:` listener reads the header a load balancer sends before anything else and
only then builds the session, with the client's real address as the connection's peer. Twisted's
own `HAProxyWrappingFactory` cannot be used for this: it builds and starts the wrapped protocol
when the TCP connection opens, before the header names the client, so admission (client ACL,
per-IP limits), the bounce rules and the passive listener's peer check would all see the
balancer. `ProxyHeaderFactory` reuses Twisted's header parsers and builds the session from the
wrapped factory only once the real address is known.

Passive data: a client that uses EPSV, or ignores the address in 227, connects to the balancer,
which forwards each instance's port range to it with a header; `ForwardedData` reads it and
hands the socket to the data connection if it names the session's client.

Upstreams: `header` writes the header the gateway sends first on an upstream control connection
when `upstream_proxy_protocol` is `v1` or `v2`, so a server that accepts it (proftpd's
mod_proxy_protocol) sees and logs the client instead of the gateway.

The specification is haproxy's doc/proxy-protocol.txt; section numbers below refer to it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from gateway.addresses import HostPort
from gateway.events import Event

_log = Logger(namespace="gateway.session")
_data_log = Logger(namespace="gateway.data")

#: Section 2.2: the twelve bytes every version 2 header starts with.
V2_SIGNATURE = V2Parser.PREFIX
#: Section 2.1: a version 1 header starts with "PROXY" and a space.
V1_SIGNATURE = b"PROXY "
#: Section 2.2: version 2, command PROXY; families TCP over IPv4 (0x11) and IPv6 (0x21).
_V2_PROXY = 0x21
#: Section 2.2: version 2, command LOCAL (health checks and the like).
_V2_LOCAL = 0x20
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


class HeaderReader:
    """Collects one PROXY header, v1 or v2, from bytes as they come; Twisted's parsers do the
    parsing. `feed` returns the header's info and the bytes after it once complete, (None,
    None) before, and raises InvalidProxyHeader for anything else."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parser: V1Parser | V2Parser | None = None

    def feed(self, data: bytes) -> tuple[Any, bytes | None]:
        if self._parser is None:
            # Pick the parser from the first bytes (sections 2.1, 2.2).
            self._buffer += data
            head = self._buffer
            if head.startswith(V2_SIGNATURE):
                if len(head) < 16:  # V2Parser needs the fixed 16 bytes in one piece
                    return None, None
                self._parser = V2Parser()
            elif head.startswith(V1_SIGNATURE):
                self._parser = V1Parser()
            elif V2_SIGNATURE.startswith(head[:12]) or V1_SIGNATURE.startswith(head[:6]):
                return None, None
            else:
                raise InvalidProxyHeader()
            data, self._buffer = head, b""
        return self._parser.feed(data)

    def read(self, data: bytes) -> tuple[bool, IPv4Address | IPv6Address | None, bytes | None]:
        """Feed `data`: (False, None, None) until the header is complete, then (True, its TCP
        source or None for a header that names none, the bytes after it). Raises
        InvalidProxyHeader whose one argument is the sentence to log."""
        try:
            info, rest = self.feed(data)
            if info is None:
                return False, None, None
            return True, tcp_source(info), rest
        except InvalidProxyHeader as e:
            detail = e.args[0] if e.args else type(e).__name__
            raise InvalidProxyHeader(f"invalid PROXY header ({detail})") from None


def tcp_source(info: Any) -> IPv4Address | IPv6Address | None:
    """The header's TCP source in the gateway's canonical form; None for a header that names
    none (UNKNOWN, LOCAL); raises InvalidProxyHeader for a UNIX or UDP source."""
    source = info.source
    if source is None:
        return None
    if not isinstance(source, IPv4Address | IPv6Address) or source.type != "TCP":
        raise InvalidProxyHeader(f"the PROXY header names a non-TCP source ({source})")
    return _normal(source)


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads one PROXY header, then carries the session built for the address it names.

    Until the header is complete nothing is built: no session, no greeting, no admission
    decision. Afterwards it is a plain wrapper whose `getPeer` returns the client's address;
    `getHost` stays the gateway's own socket address, which is where passive listeners bind
    and what the session advertises (the balancer's address, named in the header as the
    destination, is not where clients can open data connections to this instance).
    """

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]  # built after the header
        self._reader = HeaderReader()
        self._peer: IAddress | None = None
        self._timer: IDelayedCall | None = None

    def logPrefix(self) -> str:
        return "ProxyHeader"

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper would connect the wrapped protocol here; it does not exist yet.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(
            self.factory.timeout, self._refuse, f"no PROXY header within {self.factory.timeout:g} s"
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timer is None:  # already refused; the connection is closing
            return
        try:
            complete, source, rest = self._reader.read(data)
        except InvalidProxyHeader as e:
            self._refuse(e.args[0])
            return
        if not complete:
            return
        self._timer.cancel()
        self._timer = None
        if source is None:
            # Section 2.1 (UNKNOWN) and 2.2 (LOCAL, e.g. the balancer's own health check):
            # the connection's own endpoints are the real ones.
            source = self.transport.getPeer()  # type: ignore[union-attr]
        self._peer = source
        protocol = self.factory.wrappedFactory.buildProtocol(source)
        if protocol is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.wrappedProtocol = protocol
        self.factory.registerProtocol(self)
        protocol.makeConnection(self)
        if rest and not self.disconnecting:
            protocol.dataReceived(rest)

    def _refuse(self, reason: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        peer = _describe(self.transport.getPeer())  # type: ignore[union-attr]
        _log.warn(
            "Refused connection from {client}: {reason}",
            client=peer,
            reason=reason,
            event=Event.SESSION_REFUSED,
            reason_key="proxy_header",
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def getPeer(self) -> IAddress:
        if self._peer is not None:
            return self._peer
        return self.transport.getPeer()  # type: ignore[union-attr, no-any-return]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.wrappedProtocol is not None:
            super().connectionLost(reason)


class ProxyHeaderFactory(WrappingFactory):
    """Wraps the gateway's factory for a `haproxy:` listener.

    `timeout` bounds the wait for the header; a connection without a valid header in time is
    closed and logged at warn, and never reaches the gateway's factory.
    """

    protocol = ProxyHeaderProtocol
    # No `Starting factory <...ProxyHeaderFactory object at 0x...>` line per listener.
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, clock: IReactorTime, timeout: float) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:  # type: ignore[override]
        return ProxyHeaderProtocol(self)

    def logPrefix(self) -> str:
        return "ProxyHeader"


class ForwardedData(Protocol):
    """A passive data connection that the balancer forwarded: reads its PROXY header, then
    hands the socket itself to the protocol `accept` returns for the header's source.

    Clients that ignore the address in `227` (curl since 7.74, Python's ftplib) or use EPSV
    connect to the balancer, which forwards each instance's passive port range to it with a
    header. Only connections from the balancer that carried the session's control connection
    get here (`PassiveListener`), and `accept` applies the usual check to the client's address,
    so the port stays the client's alone. After the header the connection is the data
    connection's own: no wrapper stays between it and the socket (TLS, the relay).
    """

    def __init__(
        self,
        accept: Callable[[IAddress], Protocol | None],
        clock: IReactorTime,
        timeout: float,
        log: Logger = _data_log,
    ) -> None:
        self._accept = accept
        self._clock = clock
        self._timeout = timeout
        #: The session's logger, so a dropped connection is logged with its session id.
        self._log = log
        self._reader = HeaderReader()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(
            self._timeout, self._drop, f"no PROXY header within {self._timeout:g} s"
        )

    def dataReceived(self, data: bytes) -> None:
        if self._timer is None:
            return
        try:
            complete, source, rest = self._reader.read(data)
        except InvalidProxyHeader as e:
            self._drop(e.args[0])
            return
        if not complete:
            return
        if source is None:
            self._drop("the PROXY header names no client")
            return
        self._timer.cancel()
        self._timer = None
        transport = self.transport
        protocol = self._accept(source)
        if protocol is None:
            transport.abortConnection()  # type: ignore[union-attr]
            return
        # The way startTLS puts its layer in: the socket delivers to `protocol` from now on.
        transport.protocol = protocol  # type: ignore[union-attr]
        protocol.makeConnection(transport)
        if rest:
            # What came with the header goes where the socket's next bytes go: a protected
            # data connection started TLS as it was made, so a ClientHello the balancer sent
            # in the same segment as the header belongs to the TLS layer, not to the protocol.
            transport.protocol.dataReceived(rest)  # type: ignore[union-attr]

    def _drop(self, reason: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._log.warn(
            "Dropped forwarded data connection from {peer}: {reason}",
            peer=_describe(self.transport.getPeer()),  # type: ignore[union-attr]
            reason=reason,
            event=Event.DATA_CONNECTION_DROPPED,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def balancer_of(transport: Any) -> str | None:
    """The balancer's address when `transport` is a session's connection that came through a
    `haproxy:` listener (and named a client other than the balancer); None otherwise."""
    if not isinstance(transport, ProxyHeaderProtocol) or transport.transport is None:
        return None
    socket_peer = transport.transport.getPeer()
    host = getattr(socket_peer, "host", None)
    if host is None or host == getattr(transport.getPeer(), "host", None):
        return None
    return HostPort.of(host, 1).host


def split_endpoint(description: str) -> tuple[bool, str]:
    """Whether a listener description asks for the PROXY protocol, and the endpoint under it:
    `haproxy:tcp:2121` -> (True, "tcp:2121")."""
    kind, _, rest = description.partition(":")
    if kind.strip().lower() == "haproxy":
        return True, rest
    return False, description


def header(version: str, source: HostPort, destination: HostPort) -> bytes:
    """The PROXY header naming a TCP connection from `source` to `destination`.

    Both ends must be of one family (sections 2.1, 2.2); when they are not (an IPv6 client of
    an IPv4 listener, say), the IPv4 one is written IPv4-mapped (RFC 4291 section 2.5.5.2).
    """
    src = ipaddress.ip_address(source.host)
    dst = ipaddress.ip_address(destination.host)
    if src.version != dst.version:
        src, dst = (_mapped(src), _mapped(dst))
    if version == "v1":
        # Section 2.1: "PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n".
        proto = "TCP4" if src.version == 4 else "TCP6"
        line = f"PROXY {proto} {src} {dst} {source.port} {destination.port}\r\n"
        return line.encode("ascii")
    if version == "v2":
        family = _V2_TCP4 if src.version == 4 else _V2_TCP6
        addresses = src.packed + dst.packed + struct.pack("!HH", source.port, destination.port)
        return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(addresses)) + addresses
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def local_header(version: str) -> bytes:
    """The PROXY header of a connection the gateway makes on its own behalf (a health check),
    relaying no client: v1 "PROXY UNKNOWN" (section 2.1), v2 command LOCAL with no address
    (section 2.2), which the server accepts and uses its own view of the connection for."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    if version == "v2":
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def _mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


def _normal(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """The address in the form the rest of the gateway compares: canonical text, and an
    IPv4-mapped IPv6 source (an IPv6 balancer frontend) as plain IPv4."""
    hostport = HostPort.of(address.host, address.port)
    if hostport.family == 4:
        return IPv4Address("TCP", hostport.host, hostport.port)
    return IPv6Address("TCP", hostport.host, hostport.port)


def _describe(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
