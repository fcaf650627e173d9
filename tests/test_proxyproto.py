"""The PROXY-protocol wrapper in memory (StringTransport, a Clock): the session is built only
after the header, with the client's real address; a missing, invalid or late header closes the
connection with a warn line; the gateway's admission counts the real address; and the headers
the gateway sends upstream parse with Twisted's own parsers."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from gateway.addresses import HostPort
from gateway.config import ConfigError, build
from gateway.control import ClientControl, GatewayFactory
from gateway.data import PassiveListener
from gateway.logs import SessionLogger
from gateway.proxyproto import (
    ForwardedData,
    ProxyHeaderFactory,
    header,
    local_header,
    split_endpoint,
)

BALANCER = IPv4Address("TCP", "127.0.0.9", 40000)
GATEWAY = IPv4Address("TCP", "127.0.0.11", 2121)
CLIENT = HostPort.of("192.0.2.5", 50123)
V1 = b"PROXY TCP4 192.0.2.5 198.51.100.1 50123 21\r\n"
V2 = header("v2", CLIENT, HostPort.of("198.51.100.1", 21))
#: Section 2.2: version 2, command LOCAL, family UNSPEC, no addresses.
V2_LOCAL = V2Parser.PREFIX + b"\x20\x00\x00\x00"


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.peer: IAddress | None = None
        self.host: IAddress | None = None

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.host = self.transport.getHost()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.built: list[tuple[IAddress, Recorder]] = []

    def buildProtocol(self, addr: IAddress) -> Recorder:
        protocol = Recorder()
        self.built.append((addr, protocol))
        return protocol


@pytest.fixture
def warnings() -> Any:
    seen: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("event") == "session_refused":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def connect(factory: Factory) -> tuple[Protocol, StringTransport]:
    protocol = factory.buildProtocol(BALANCER)
    assert protocol is not None
    transport = StringTransport(hostAddress=GATEWAY, peerAddress=BALANCER)
    protocol.makeConnection(transport)
    return protocol, transport


def feed(protocol: Protocol, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        protocol.dataReceived(data[i : i + chunk])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_session_is_built_after_the_header_with_the_real_address(version: str, chunk: int) -> None:
    inner = RecordingFactory()
    wrapper, transport = connect(ProxyHeaderFactory(inner, Clock(), 10))
    data = (V1 if version == "v1" else V2) + b"USER anonymous\r\n"
    feed(wrapper, data[: len(data) - 20], chunk)
    assert inner.built == []  # the header's last bytes are still missing
    feed(wrapper, data[len(data) - 20 :], chunk)
    [(addr, protocol)] = inner.built
    assert (addr.host, addr.port) == ("192.0.2.5", 50123)  # type: ignore[attr-defined]
    assert protocol.peer == addr
    # The gateway's own socket address stays the local one: passive listeners bind there.
    assert protocol.host == GATEWAY
    assert protocol.received == b"USER anonymous\r\n"
    assert transport.connected and not transport.disconnecting


def test_nothing_is_built_before_the_header_completes() -> None:
    inner = RecordingFactory()
    wrapper, transport = connect(ProxyHeaderFactory(inner, Clock(), 10))
    feed(wrapper, V2[:-1], 1)
    assert inner.built == []
    assert transport.value() == b""  # no greeting before the header


@pytest.mark.parametrize(
    "data",
    [
        b"USER anonymous\r\n",  # a client that skipped the balancer
        b"PROXY TCP4 nonsense\r\n",
        b"PROXY TCP4 192.0.2.5 198.51.100.1 50123\r\n",
        b"PROXY " + b"9" * 120,  # no end of line within the 107 bytes of section 2.1
        V2[:12] + b"\x31" + V2[13:],  # version 3
        b"\r\n\r\n\x00\r\nQUIX\n" + V2[12:],
    ],
)
def test_invalid_header_closes_and_logs(data: bytes, warnings: list[LogEvent]) -> None:
    inner = RecordingFactory()
    wrapper, transport = connect(ProxyHeaderFactory(inner, Clock(), 10))
    feed(wrapper, data, 1)
    assert inner.built == []
    assert transport.disconnecting
    assert transport.value() == b""
    [event] = warnings
    assert event["log_level"].name == "warn"
    assert event["reason_key"] == "proxy_header"
    assert event["client"] == "127.0.0.9:40000"


def test_no_header_within_the_timeout_closes_and_logs(warnings: list[LogEvent]) -> None:
    clock = Clock()
    inner = RecordingFactory()
    wrapper, transport = connect(ProxyHeaderFactory(inner, clock, 10))
    feed(wrapper, V1[:10], 3)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert inner.built == []
    assert "no PROXY header within 10 s" in warnings[0]["reason"]
    wrapper.dataReceived(V1[10:])  # too late: ignored
    assert inner.built == []


def test_local_command_keeps_the_connection_address() -> None:
    # Section 2.2: LOCAL (a balancer's own health check) names no client.
    inner = RecordingFactory()
    wrapper, _ = connect(ProxyHeaderFactory(inner, Clock(), 10))
    wrapper.dataReceived(V2_LOCAL)
    [(addr, _protocol)] = inner.built
    assert addr == BALANCER


def test_timer_cancelled_when_the_connection_is_lost() -> None:
    clock = Clock()
    wrapper, _transport = connect(ProxyHeaderFactory(RecordingFactory(), clock, 10))
    wrapper.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    assert clock.getDelayedCalls() == []


def gateway(**settings: Any) -> tuple[ProxyHeaderFactory, GatewayFactory]:
    config = build({"upstream": "127.0.0.1:21", **settings})
    inner = GatewayFactory(config, MemoryReactorClock())
    return ProxyHeaderFactory(inner, Clock(), 10), inner


def proxied(factory: ProxyHeaderFactory, client: str) -> StringTransport:
    wrapper, transport = connect(factory)
    wrapper.dataReceived(f"PROXY TCP4 {client} 198.51.100.1 50000 21\r\n".encode())
    return transport


def test_per_ip_limit_counts_the_real_address() -> None:
    factory, inner = gateway(**{"limits.max_sessions_per_ip": 1})
    first = proxied(factory, "192.0.2.5")
    other = proxied(factory, "192.0.2.6")  # same balancer, another client: admitted
    again = proxied(factory, "192.0.2.5")
    assert not first.disconnecting and not other.disconnecting
    assert inner.sessions == {"192.0.2.5": 1, "192.0.2.6": 1}
    assert again.value().startswith(b"421 Too many sessions from your address")
    assert again.disconnecting


def test_client_policy_sees_the_real_address() -> None:
    factory, inner = gateway(deny_clients=["192.0.2.0/24"])
    refused = proxied(factory, "192.0.2.5")
    allowed = proxied(factory, "203.0.113.7")
    assert refused.value().startswith(b"421 Access denied")
    assert not allowed.disconnecting
    assert inner.sessions == {"203.0.113.7": 1}


def test_session_peer_is_the_real_client() -> None:
    factory, _inner = gateway()
    wrapper, _ = connect(factory)
    wrapper.dataReceived(V1)
    control = wrapper.wrappedProtocol  # type: ignore[attr-defined]
    assert isinstance(control, ClientControl)
    assert control.peer == CLIENT
    assert control.session.client_peer == CLIENT


def test_session_end_releases_the_real_address() -> None:
    factory, inner = gateway(**{"limits.max_sessions_per_ip": 1})
    wrapper, _transport = connect(factory)
    wrapper.dataReceived(V1)
    assert inner.sessions == {"192.0.2.5": 1}
    wrapper.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    assert inner.sessions == {}
    assert inner.active == 0


# ---------------------------------------------------------------- headers sent upstream


@pytest.mark.parametrize(
    ("source", "destination", "want_source", "want_destination"),
    [
        ("192.0.2.5", "198.51.100.1", "192.0.2.5", "198.51.100.1"),
        ("2001:db8::5", "2001:db8::1", "2001:db8::5", "2001:db8::1"),
        ("2001:db8::5", "198.51.100.1", "2001:db8::5", "::ffff:198.51.100.1"),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upstream_header_parses_with_twisteds_parsers(
    version: str, source: str, destination: str, want_source: str, want_destination: str
) -> None:
    data = header(version, HostPort.of(source, 50123), HostPort.of(destination, 21))
    parser = V1Parser() if version == "v1" else V2Parser()
    info, rest = parser.feed(data + b"220 hi\r\n")
    assert rest == b"220 hi\r\n"
    assert info is not None
    assert info.source is not None and info.destination is not None
    assert HostPort.of(info.source.host, info.source.port) == HostPort.of(want_source, 50123)  # type: ignore[attr-defined]
    assert HostPort.of(info.destination.host, info.destination.port) == HostPort.of(  # type: ignore[attr-defined]
        want_destination, 21
    )
    family = IPv4Address if ":" not in want_source else IPv6Address
    assert isinstance(info.source, family)


def test_v2_header_layout() -> None:
    # Section 2.2: signature, 0x21 (v2, PROXY), 0x11 (TCP over IPv4), length 12.
    data = header("v2", CLIENT, HostPort.of("198.51.100.1", 21))
    assert data[:12] == V2Parser.PREFIX
    assert data[12:16] == b"\x21\x11" + struct.pack("!H", 12)
    assert len(data) == 28


# ----------------------------------------------------------------------- configuration


def test_haproxy_listener_accepted_over_tcp() -> None:
    config = build({"listen": ["haproxy:tcp:2121:interface=127.0.0.1"]})
    assert split_endpoint(config.listen[0]) == (True, "tcp:2121:interface=127.0.0.1")
    assert split_endpoint("tcp:2121") == (False, "tcp:2121")


def test_haproxy_over_tls_refused() -> None:
    with pytest.raises(ConfigError, match="needs a TCP listener under it"):
        build({"listen": ["haproxy:ssl:990:privateKey=k.pem"]})


def test_upstream_proxy_protocol_setting() -> None:
    assert build({}).upstream_proxy_protocol == "off"
    assert build({"upstream_proxy_protocol": "v2"}).upstream_proxy_protocol == "v2"
    with pytest.raises(ConfigError, match="upstream_proxy_protocol"):
        build({"upstream_proxy_protocol": "v3"})
    with pytest.raises(ConfigError, match="implicit"):
        build({"upstream_proxy_protocol": "v1", "tls.upstream": "implicit"})


def test_refusal_is_counted_in_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import MetricsObserver

    registry = CollectorRegistry()
    observer = MetricsObserver(registry)
    name = "ftp_gateway_sessions_refused_total"
    assert registry.get_sample_value(name, {"reason": "proxy_header"}) == 0
    globalLogPublisher.addObserver(observer)
    try:
        wrapper, _ = connect(ProxyHeaderFactory(RecordingFactory(), Clock(), 10))
        wrapper.dataReceived(b"GET / HTTP/1.0\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert registry.get_sample_value(name, {"reason": "proxy_header"}) == 1


# ------------------------------------------------ data connections forwarded by the balancer


class Accepting:
    def __init__(self, allow: str) -> None:
        self.allow = allow
        self.asked: list[IAddress] = []
        self.protocol = Recorder()

    def __call__(self, addr: IAddress) -> Protocol | None:
        self.asked.append(addr)
        return self.protocol if addr.host == self.allow else None  # type: ignore[attr-defined]


def forwarded(accept: Accepting, clock: Clock) -> tuple[ForwardedData, StringTransport]:
    protocol = ForwardedData(accept, clock, 10)
    transport = StringTransport(hostAddress=GATEWAY, peerAddress=BALANCER)
    transport.protocol = protocol  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize("chunk", [1, 10_000])
def test_forwarded_data_is_handed_to_the_client_protocol(chunk: int) -> None:
    accept = Accepting("192.0.2.5")
    _, transport = forwarded(accept, Clock())
    data = V2 + b"first bytes of an upload"
    for i in range(0, len(data), chunk):
        # As the socket does: to whichever protocol is the transport's now.
        transport.protocol.dataReceived(data[i : i + chunk])  # type: ignore[attr-defined]
    assert [(a.host, a.port) for a in accept.asked] == [("192.0.2.5", 50123)]  # type: ignore[attr-defined]
    # The socket delivers to the data connection itself from now on, nothing in between.
    assert transport.protocol is accept.protocol  # type: ignore[attr-defined]
    assert accept.protocol.transport is transport
    assert accept.protocol.received == b"first bytes of an upload"
    assert not transport.disconnecting


class Layering(Recorder):
    """A data connection that puts a layer between itself and the socket as it is made, as
    a protected one does with startTLS."""

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        self.layer = Recorder()
        transport.protocol = self.layer


def test_bytes_that_came_with_the_header_go_to_the_layer_the_connection_put_in() -> None:
    # HAProxy sends the header and what the client sent so far (a TLS ClientHello) in one
    # segment when the client was quicker than the connection to this instance.
    accept = Accepting("192.0.2.5")
    accept.protocol = Layering()
    _, transport = forwarded(accept, Clock())
    transport.protocol.dataReceived(V2 + b"\x16\x03\x01 a ClientHello")  # type: ignore[attr-defined]
    assert accept.protocol.layer.received == b"\x16\x03\x01 a ClientHello"
    assert accept.protocol.received == b""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (V1.replace(b"192.0.2.5", b"192.0.2.66"), None),  # someone else: the check refuses
        (b"GET / HTTP/1.0\r\n\r\n", "invalid PROXY header"),
        (V2_LOCAL, "names no client"),
    ],
)
def test_forwarded_data_not_from_the_client_is_dropped(data: bytes, reason: str | None) -> None:
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        accept = Accepting("192.0.2.5")
        _, transport = forwarded(accept, Clock())
        forwarded_protocol = transport.protocol  # type: ignore[attr-defined]
        forwarded_protocol.dataReceived(data)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert transport.disconnecting
    assert accept.protocol.transport is None
    if reason is not None:
        assert any(reason in str(e.get("reason", "")) for e in seen), seen


def test_forwarded_data_without_header_in_time_is_dropped() -> None:
    clock = Clock()
    accept = Accepting("192.0.2.5")
    _, transport = forwarded(accept, clock)
    clock.advance(10.1)
    assert transport.disconnecting
    assert accept.asked == []


def test_dropped_forwarded_data_is_logged_with_the_session_id() -> None:
    """A session's passive listener behind the balancer: a forwarded connection whose header
    names someone else is logged as that session's line (its id, an event name), as every
    other line of the session is."""
    reactor = MemoryReactorClock()
    listener = PassiveListener(
        reactor,
        reactor,
        bind_host=GATEWAY.host,
        peer_host="192.0.2.5",
        timeout=10,
        port_range=None,
        tls=None,
        on_failure=lambda reason: None,
        balancer=BALANCER.host,
        log=SessionLogger("5e55101d", namespace="gateway.session"),
    )
    [(_, factory, _, _)] = reactor.tcpServers
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        protocol = factory.buildProtocol(BALANCER)
        transport = StringTransport(hostAddress=GATEWAY, peerAddress=BALANCER)
        transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        protocol.dataReceived(V1.replace(b"192.0.2.5", b"192.0.2.66"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert transport.disconnecting
    assert listener.connection is None
    [dropped] = [e for e in seen if e.get("event") == "data_connection_dropped"]
    assert dropped["session"] == "5e55101d"
    assert dropped["log_level"] is LogLevel.warn


def test_local_header_relays_no_client() -> None:
    """Health checks say they relay no client: v1 "PROXY UNKNOWN" (section 2.1's own form),
    v2 LOCAL, which a parser accepts without addresses, so the server keeps its own view."""
    assert local_header("v1") == b"PROXY UNKNOWN\r\n"
    info, rest = V2Parser().feed(local_header("v2") + b"QUIT\r\n")
    assert info is not None and info.source is None and info.destination is None
    assert rest == b"QUIT\r\n"
