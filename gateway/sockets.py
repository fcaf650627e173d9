"""Small helpers of the Twisted shell for sockets and transports.

Each hides one socket option or one Twisted detail behind a name that says what it is for, so
the protocols in `gateway.control`, `gateway.upstreamside` and `gateway.dataside` read as what
they do.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from gateway.addresses import HostPort


def hostport(address: IAddress) -> HostPort:
    """A Twisted TCP address as the core's `HostPort`."""
    return HostPort.of(address.host, address.port)  # type: ignore[attr-defined]


def one_shot(protocol: Protocol) -> Factory:
    """A factory for one prepared protocol: what `endpoints.connectProtocol` builds, but
    quiet, since that one logs "Starting factory" and "Stopping factory" for every data
    connection."""
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return factory


def urgent_inline(transport: Any) -> None:
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


def original_destination(transport: Any) -> HostPort | None:
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
    return None if destination == hostport(transport.getHost()) else destination


def no_delay(transport: Any) -> None:
    """Send each control line at once (TCP_NODELAY). The gateway writes whole commands and
    replies; with Nagle's algorithm a reply written while the previous one is unacknowledged
    waits for the peer's delayed ACK, 40 ms or more per exchange."""
    with contextlib.suppress(AttributeError, OSError):  # not TCP: a UNIX endpoint, a test double
        transport.setTcpNoDelay(True)


def tls_handle(transport: Any) -> Any:
    """The OpenSSL connection under a TLS transport, while it is being torn down."""
    try:
        return transport.getHandle()
    except AttributeError:
        return None


def reason_of(failure: Failure) -> str:
    """A failure as one short line for the logs and the session."""
    return failure.getErrorMessage() or failure.type.__name__


def open_plain_tcp(transport: Any) -> bool:
    """A plain TCP transport (no TLS, no wrapper) that is open and not closing either way."""
    return (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.TLS
    )


def write_now(transport: Any, data: bytes) -> None:
    """Write `data` to a control connection, sending it at once when nothing is queued before
    it. Twisted's `write` only queues and sends when the reactor next finds the socket
    writable: one more turn of the event loop, and two more epoll_ctl calls, for every reply
    and command the gateway passes on, on the critical path of every session's set-up.

    Only a plain TCP transport that is open, not closing and has nothing queued takes the
    short way; TLS, wrapped transports (PROXY protocol) and anything queued go through `write`,
    which keeps the order and Twisted's producer bookkeeping. What the socket does not take at
    once is queued by `write` as usual."""
    if open_plain_tcp(transport) and not transport.dataBuffer and not transport._tempDataBuffer:
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
        # An error (an int below 0 or an exception object) is left to the reactor: queued,
        # the bytes make it try the socket, find the error and close the connection.
    if data:
        transport.write(data)
