"""The gateway's own listening addresses, known from start-up.

A forward-mode upstream or a PORT/EPRT target naming one of them would make the gateway
connect to itself: nested sessions through a second listener, or a downloaded file replayed
into its own control port as commands. `GatewayFactory.add_listener` learns each listener's
address as soon as it is bound, before any client has used it; a listener bound to 0.0.0.0
or :: is reached through every local interface address, which `interface_addresses` lists.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

from gateway.addresses import HostPort

_IF_INET6 = Path("/proc/net/if_inet6")
_FIB_TRIE = Path("/proc/net/fib_trie")


def parse_if_inet6(text: str) -> set[str]:
    """IPv6 addresses of the local interfaces from /proc/net/if_inet6 (one per line, the
    address first as 32 hex digits)."""
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(str(ipaddress.IPv6Address(int(fields[0], 16))))
            except ValueError:
                continue
    return found


def parse_fib_trie(text: str) -> set[str]:
    """IPv4 addresses of the local interfaces from /proc/net/fib_trie: each "|-- address"
    line followed by a "/32 host LOCAL" route is one (secondary addresses included)."""
    found = set()
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("/32 host LOCAL") and previous.startswith("|-- "):
            with contextlib.suppress(ValueError):
                found.add(str(ipaddress.IPv4Address(previous[4:].strip())))
        previous = stripped
    return found


def interface_addresses() -> set[str]:
    """Every address of this host's interfaces, IPv4 and IPv6 (Linux /proc), or, where those
    files cannot be read, what the host's own name resolves to."""
    found: set[str] = set()
    for path, parse in ((_IF_INET6, parse_if_inet6), (_FIB_TRIE, parse_fib_trie)):
        try:
            found |= parse(path.read_text())
        except OSError:
            continue
    if not found:
        try:
            infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
            found = {str(info[4][0]).partition("%")[0] for info in infos}
        except OSError:
            pass
    return found | {"127.0.0.1", "::1"}


def listener_addresses(bound: HostPort, interfaces: Iterable[str]) -> set[HostPort]:
    """Where a client reaches a listener bound to `bound`: that address, and for a wildcard
    (0.0.0.0 or ::) every interface address of the families it accepts on the same port."""
    found = {bound}
    if bound.unspecified:
        # A :: listener takes IPv4 too unless IPV6_V6ONLY is set; count both, to be safe.
        families = (4,) if bound.family == 4 else (4, 6)
        for address in interfaces:
            try:
                candidate = HostPort.of(address, bound.port)
            except ValueError:
                continue
            if candidate.family in families:
                found.add(candidate)
    return found


@implementer(IStreamServerEndpoint)
class _Reporting:
    """A server endpoint that reports the address its port is bound to."""

    def __init__(self, inner: Any, on_listening: Callable[[HostPort], None]) -> None:
        self.inner = inner
        self.on_listening = on_listening

    def listen(self, factory: Any) -> Any:
        def bound(port: IListeningPort) -> IListeningPort:
            address = port.getHost()
            host, number = getattr(address, "host", None), getattr(address, "port", None)
            if isinstance(host, str) and isinstance(number, int):
                self.on_listening(HostPort.of(host, number))
            return port

        return self.inner.listen(factory).addCallback(bound)


def report_bound(
    service: StreamServerEndpointService, on_listening: Callable[[HostPort], None]
) -> None:
    """Make `service` call `on_listening` with its bound address as soon as its port listens
    (at start-up, before any client connects)."""
    service.endpoint = _Reporting(service.endpoint, on_listening)
