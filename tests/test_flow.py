"""Control-connection back-pressure (`gateway.flow`) on in-memory transports and a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.effects import Side
from gateway.flow import ControlFlow

TIMEOUT = 60.0


class Rig:
    """A flow watching two in-memory transports; `stuck` lists the sides it gave up on."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.stuck: list[Side] = []
        self.flow = ControlFlow(self.clock, TIMEOUT, self.stuck.append)
        self.client, self.upstream = StringTransport(), StringTransport()
        self.flow.attach(Side.CLIENT, self.client)
        self.flow.attach(Side.UPSTREAM, self.upstream)


def test_full_client_buffer_stops_reading_both_sides_until_it_drains() -> None:
    rig = Rig()
    clock, stuck, client, upstream = rig.clock, rig.stuck, rig.client, rig.upstream
    assert client.producer is not None  # the transport tells the flow when its buffer fills
    client.producer.pauseProducing()
    assert (client.producerState, upstream.producerState) == ("paused", "paused")
    clock.advance(TIMEOUT - 1)
    client.producer.resumeProducing()
    assert (client.producerState, upstream.producerState) == ("producing", "producing")
    clock.advance(TIMEOUT)
    assert stuck == []


def test_full_upstream_buffer_stops_reading_the_client_only() -> None:
    rig = Rig()
    client, upstream = rig.client, rig.upstream
    assert upstream.producer is not None
    upstream.producer.pauseProducing()
    assert (client.producerState, upstream.producerState) == ("paused", "producing")
    upstream.producer.resumeProducing()
    assert client.producerState == "producing"


def test_a_buffer_full_past_the_timeout_ends_the_session() -> None:
    rig = Rig()
    flow, clock, stuck, client, upstream = rig.flow, rig.clock, rig.stuck, rig.client, rig.upstream
    assert client.producer is not None and upstream.producer is not None
    upstream.producer.pauseProducing()
    clock.advance(TIMEOUT / 2)
    client.producer.pauseProducing()
    clock.advance(TIMEOUT / 2)
    assert stuck == [Side.UPSTREAM]
    clock.advance(TIMEOUT / 2)
    assert stuck == [Side.UPSTREAM, Side.CLIENT]
    flow.stop()
    assert clock.getDelayedCalls() == []


def test_client_tls_handshake_is_read_while_the_tls_layer_holds_the_greeting() -> None:
    rig = Rig()
    flow, client, upstream = rig.flow, rig.client, rig.upstream
    flow.tls_started(Side.CLIENT)
    assert client.producer is not None
    client.producer.pauseProducing()  # TLS layer: greeting written before the handshake
    assert (client.producerState, upstream.producerState) == ("producing", "paused")
    flow.tls_done(Side.CLIENT)  # still full after the handshake: a client not reading
    assert client.producerState == "paused"
    client.producer.resumeProducing()
    assert (client.producerState, upstream.producerState) == ("producing", "producing")


def test_an_upstream_attached_while_the_client_is_full_starts_paused() -> None:
    clock = Clock()
    flow = ControlFlow(clock, TIMEOUT, lambda side: None)
    client, upstream = StringTransport(), StringTransport()
    flow.attach(Side.CLIENT, client)
    assert client.producer is not None
    client.producer.pauseProducing()
    flow.attach(Side.UPSTREAM, upstream)
    assert upstream.producerState == "paused"
    flow.detach(Side.UPSTREAM)
    client.producer.resumeProducing()
    assert client.producerState == "producing"


def test_closing_unregisters_the_producer_and_aborts_a_peer_that_never_reads() -> None:
    """A transport with a producer registered does not close (a TLS one never starts its
    shutdown), and one whose peer reads nothing never finishes sending: `close` unregisters
    the producer, and aborts the connection if it is still open after the timeout."""
    rig = Rig()
    flow, clock, client, upstream = rig.flow, rig.clock, rig.client, rig.upstream
    assert client.producer is not None
    client.producer.pauseProducing()  # the client stopped reading
    flow.close(Side.CLIENT, client)
    assert client.producer is None and client.disconnecting
    clock.advance(TIMEOUT)
    assert client.disconnected  # aborted: StringTransport.abortConnection
    flow.close(Side.UPSTREAM, upstream)
    assert upstream.producer is None and upstream.disconnecting
    flow.detach(Side.UPSTREAM)  # it closed in time
    flow.stop()
    assert clock.getDelayedCalls() == []
    assert rig.stuck == []
