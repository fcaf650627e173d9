"""The data side in memory: `relay`, `DataConnection` and `PassiveListener` on a memory reactor.

No sockets: each data connection is a `DataConnection` on a `StringTransport`, the clock is a
`MemoryReactorClock`, and a test plays the peers by feeding bytes and closing connections.
"""

from __future__ import annotations

from memory import Reactor, Transport
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.data import DataConnection, PassiveListener, RelayResult, relay

STALL = 10.0


def connected(clock: Reactor | None = None) -> tuple[DataConnection, Transport]:
    """A plain-TCP data connection, connected and (as every new one) paused."""
    connection = DataConnection(clock=clock)
    transport = Transport(
        IPv4Address("TCP", "127.0.0.1", 30001), IPv4Address("TCP", "127.0.0.5", 40001)
    )
    connection.makeConnection(transport)
    return connection, transport


def outcome(d: Deferred[RelayResult]) -> RelayResult | None:
    """The relay's result if it has finished, without consuming it."""
    results: list[RelayResult] = []

    def keep(result: RelayResult) -> RelayResult:
        results.append(result)
        return result

    d.addCallback(keep)
    return results[0] if results else None


def closed_cleanly() -> Failure:
    return Failure(error.ConnectionDone())


def reset() -> Failure:
    return Failure(error.ConnectionLost("Connection reset by peer"))


def test_a_new_data_connection_is_paused_until_the_relay_starts() -> None:
    connection, transport = connected()
    assert connection.ready.called
    assert transport.producerState == "paused"


def test_relay_moves_bytes_and_succeeds_only_after_the_sink_closed_cleanly() -> None:
    clock = Reactor()
    source, source_transport = connected(clock)
    sink, sink_transport = connected(clock)
    d = relay(source, sink, clock, STALL)
    assert source_transport.producerState == "producing"
    assert sink_transport.producer is source_transport  # flow control: the sink pauses it
    source.dataReceived(b"hello ")
    source.dataReceived(b"world")
    assert sink_transport.value() == b"hello world"
    source.connectionLost(closed_cleanly())
    assert sink_transport.disconnecting
    assert sink_transport.producer is None
    assert outcome(d) is None  # the last bytes may still be on their way
    sink.connectionLost(closed_cleanly())
    result = outcome(d)
    assert result == RelayResult(True, 11, "11 bytes")


def test_bytes_that_arrived_before_the_relay_are_relayed_first() -> None:
    clock = Reactor()
    source, _ = connected(clock)
    sink, sink_transport = connected(clock)
    source.dataReceived(b"early ")
    relay(source, sink, clock, STALL)
    source.dataReceived(b"late")
    assert sink_transport.value() == b"early late"


def test_stall_watchdog_fails_a_relay_that_moves_nothing_for_the_stall_timeout() -> None:
    clock = Reactor()
    source, source_transport = connected(clock)
    sink, sink_transport = connected(clock)
    d = relay(source, sink, clock, STALL)
    clock.advance(0)
    for _ in range(3):
        # Bytes keep moving: each check of the watchdog sees progress.
        clock.advance(STALL - 1)
        source.dataReceived(b"x" * 100)
        clock.advance(1)
    assert outcome(d) is None
    clock.advance(STALL)
    result = outcome(d)
    assert result is not None and not result.ok
    assert result.detail == "no data moved for 10 seconds after 300 bytes"
    assert source_transport.aborted and sink_transport.aborted
    assert not clock.getDelayedCalls()  # the watchdog is gone with the relay


def test_stall_watchdog_stops_when_the_relay_succeeds() -> None:
    clock = Reactor()
    source, _ = connected(clock)
    sink, _ = connected(clock)
    d = relay(source, sink, clock, STALL)
    source.dataReceived(b"data")
    source.connectionLost(closed_cleanly())
    sink.connectionLost(closed_cleanly())
    assert outcome(d) == RelayResult(True, 4, "4 bytes")
    assert not clock.getDelayedCalls()


def test_a_reset_source_fails_the_relay_and_aborts_the_sink() -> None:
    clock = Reactor()
    source, _ = connected(clock)
    sink, sink_transport = connected(clock)
    d = relay(source, sink, clock, STALL)
    source.dataReceived(b"abc")
    source.connectionLost(reset())
    result = outcome(d)
    assert result is not None and not result.ok
    assert result.detail == f"{reset().getErrorMessage()} after 3 bytes"
    assert sink_transport.aborted  # the source is gone already


def test_a_sink_that_closes_first_fails_the_relay() -> None:
    clock = Reactor()
    source, source_transport = connected(clock)
    sink, _ = connected(clock)
    d = relay(source, sink, clock, STALL)
    source.dataReceived(b"abcd")
    sink.connectionLost(closed_cleanly())
    result = outcome(d)
    assert result is not None and not result.ok
    assert result.detail == "receiving side closed the connection after 4 bytes"
    assert source_transport.aborted


def test_a_sink_reset_while_delivering_the_last_bytes_fails_the_relay() -> None:
    clock = Reactor()
    source, _ = connected(clock)
    sink, _ = connected(clock)
    d = relay(source, sink, clock, STALL)
    source.dataReceived(b"abcd")
    source.connectionLost(closed_cleanly())
    sink.connectionLost(reset())
    result = outcome(d)
    assert result is not None and not result.ok
    assert "while delivering the last bytes" in result.detail


class Listening:
    """A `PassiveListener` for the client at 127.0.0.5 on a memory reactor."""

    def __init__(self, timeout: float = 30.0, peer: str | None = "127.0.0.5") -> None:
        self.reactor = Reactor()
        self.failures: list[str] = []
        self.listener = PassiveListener(
            self.reactor,
            self.reactor,
            bind_host="127.0.0.1",
            peer_host=peer,
            timeout=timeout,
            port_range=(30000, 30009),
            tls=None,
            on_failure=self.failures.append,
        )
        self.accepted: list[DataConnection] = []
        self.listener.accepted.addCallback(self.accepted.append)
        (self.port, self.factory, _, self.interface) = self.reactor.tcpServers[0]
        self.listening_port = self.reactor.ports[0]

    def connect_from(self, ip: str) -> DataConnection | None:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", ip, 45000))
        assert protocol is None or isinstance(protocol, DataConnection)
        return protocol

    @property
    def listening(self) -> bool:
        return self.listening_port.listening


def test_passive_listener_binds_in_the_port_range_on_the_control_address() -> None:
    listening = Listening()
    assert 30000 <= listening.port <= 30009
    assert listening.interface == "127.0.0.1"
    assert listening.listener.address.port == listening.port


def test_passive_listener_drops_connections_from_any_other_ip() -> None:
    # Data-port theft (RFC 2577 section 5): only the client's control IP may connect.
    listening = Listening()
    assert listening.connect_from("127.0.0.66") is None
    assert listening.connect_from("10.1.2.3") is None
    assert listening.accepted == []
    assert listening.listening
    connection = listening.connect_from("127.0.0.5")
    assert connection is not None
    assert listening.accepted == [connection]


def test_passive_listener_accepts_one_connection_then_stops_listening() -> None:
    listening = Listening()
    first = listening.connect_from("127.0.0.5")
    assert first is not None
    assert not listening.listening
    assert listening.connect_from("127.0.0.5") is None
    assert listening.accepted == [first]
    assert not listening.reactor.getDelayedCalls()  # the timeout is cancelled


def test_passive_listener_times_out_and_stops_listening() -> None:
    listening = Listening(timeout=30.0)
    listening.reactor.advance(29.9)
    assert listening.failures == []
    assert listening.listening
    listening.reactor.advance(0.2)
    assert listening.failures == ["no data connection within 30 seconds"]
    assert not listening.listening
    assert listening.accepted == []


def test_passive_listener_compares_ip_addresses_not_their_spelling() -> None:
    listening = Listening(peer="2001:db8::5")
    assert listening.connect_from("2001:db8:0::5") is not None
