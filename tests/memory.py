"""The Twisted shell in memory: a reactor, transports and peers with no sockets.

`MemoryGateway` builds a real `GatewayFactory` on a `MemoryReactorClock` and lets a test play
the client, the upstream server and both data peers by feeding bytes into the gateway's
protocols and reading what the gateway wrote to their `StringTransport`s. Nothing here knows
how the session is built inside: tests written against it drive the shell's public surface
(protocols, factories, transports) and survive a reshaping of the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport, _FakePort
from twisted.python.failure import Failure

from gateway.config import Config, Data, Tls
from gateway.control import GatewayFactory

CLIENT_IP = "127.0.0.5"
GATEWAY_IP = "127.0.0.1"
UPSTREAM_IP = "192.0.2.50"


class Port(_FakePort):
    """A listening port that remembers whether it still listens."""

    listening = True

    def stopListening(self) -> None:
        self.listening = False


class Reactor(MemoryReactorClock):
    """A memory reactor whose listeners report the interface and a port they were given or
    one it picked, like a real reactor (the stock one reports port 0 on 0.0.0.0)."""

    def __init__(self) -> None:
        super().__init__()
        self._next_port = 40000
        #: The ports `listenTCP` returned, in the order of `tcpServers`.
        self.ports: list[Port] = []

    def listenTCP(self, port: int, factory: Factory, backlog: int = 50, interface: str = "") -> Any:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        self.tcpServers.append((port, factory, backlog, interface))
        self.ports.append(Port(IPv4Address("TCP", interface or "0.0.0.0", port)))
        return self.ports[-1]


class Transport(StringTransport):
    """A `StringTransport` that records, in order, what was written and when TLS started, so a
    test can see that a reply went out in clear text before the switch."""

    def __init__(self, host: IPv4Address, peer: IPv4Address) -> None:
        super().__init__(hostAddress=host, peerAddress=peer)
        self.events: list[tuple[str, Any]] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.events.append(("write", data))

    def startTLS(self, options: Any, normal: bool = True) -> None:
        self.events.append(("startTLS", options))

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def _done() -> Failure:
    return Failure(error.ConnectionDone())


@dataclass
class Peer:
    """One end the test plays: the gateway's protocol and the transport it writes to."""

    protocol: Protocol
    transport: Transport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        """Everything the gateway wrote to this peer so far; clears it."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def lines(self) -> list[str]:
        return self.received().decode().splitlines()

    def close(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or _done())


@dataclass
class MemoryGateway:
    """A gateway on a memory reactor; `connect_client` plays a client arriving."""

    config: Config
    reactor: Reactor = field(default_factory=Reactor)

    def __post_init__(self) -> None:
        self.factory = GatewayFactory(self.config, self.reactor)
        self._ports = 50000

    def _port(self) -> int:
        self._ports += 1
        return self._ports

    def connect_client(self, ip: str = CLIENT_IP) -> Peer:
        address = IPv4Address("TCP", ip, self._port())
        protocol = self.factory.buildProtocol(address)
        assert protocol is not None
        transport = Transport(IPv4Address("TCP", GATEWAY_IP, 2121), address)
        protocol.makeConnection(transport)
        return Peer(protocol, transport)

    def accept_outgoing(self, index: int = -1) -> Peer:
        """Complete a connection the gateway opened (`connectTCP`), as its peer."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        peer = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(peer)
        transport = Transport(IPv4Address("TCP", GATEWAY_IP, self._port()), peer)
        protocol.makeConnection(transport)
        return Peer(protocol, transport)

    def connect_to_listener(self, index: int = -1, ip: str = CLIENT_IP) -> Peer | None:
        """Connect to a listener the gateway opened (`listenTCP`) from `ip`; None when the
        listener refused the connection."""
        port, factory, _backlog, interface = self.reactor.tcpServers[index]
        address = IPv4Address("TCP", ip, self._port())
        protocol = factory.buildProtocol(address)
        if protocol is None:
            return None
        transport = Transport(IPv4Address("TCP", interface, port), address)
        protocol.makeConnection(transport)
        return Peer(protocol, transport)

    def reverse_session(self, greeting: bytes = b"220 upstream ready\r\n") -> tuple[Peer, Peer]:
        """A client connected in reverse mode, its upstream connected and greeted."""
        client = self.connect_client()
        upstream = self.accept_outgoing()
        upstream.send(greeting)
        return client, upstream

    def logged_in(self) -> tuple[Peer, Peer]:
        """A reverse-mode session past USER and PASS, with both peers' buffers empty."""
        client, upstream = self.reverse_session()
        client.send(b"USER alice\r\n")
        upstream.send(b"331 password please\r\n")
        client.send(b"PASS secret\r\n")
        upstream.send(b"230 logged in\r\n")
        client.received()
        upstream.received()
        return client, upstream


def reverse_config(**overrides: Any) -> Config:
    """Reverse mode to a fixed upstream IP, plain text upstream, a passive port range;
    `overrides` replace whole tables (`tls=Tls(...)`) or top-level settings."""
    values: dict[str, Any] = {
        "upstream": (UPSTREAM_IP, 21),
        "tls": Tls(upstream="off"),
        # The in-memory transports have no socket to splice: bytes go through Python.
        "data": Data(passive_ports=(30000, 30009), relay="copy"),
    }
    values.update(overrides)
    return Config(**values)
