"""The Twisted shell (`gateway.control`) driven in memory: `StringTransport` for the client's
control connection, `MemoryReactorClock` for the reactor; no sockets."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.codec import Reply
from gateway.config import Config
from gateway.control import ClientControl, GatewayFactory
from gateway.effects import ConnectUpstream, ToClient

GATEWAY = IPv4Address("TCP", "127.0.0.1", 2121)
CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)


def connected_client(config: Config) -> tuple[ClientControl, StringTransport]:
    factory = GatewayFactory(config, MemoryReactorClock())
    protocol = factory.buildProtocol(CLIENT)
    assert isinstance(protocol, ClientControl)
    transport = StringTransport(hostAddress=GATEWAY, peerAddress=CLIENT)
    protocol.makeConnection(transport)
    return protocol, transport


def test_forward_mode_greets_the_client_in_memory() -> None:
    _, transport = connected_client(Config())
    assert transport.value().startswith(b"220 ")


def test_effects_reported_back_while_running_run_after_the_queued_ones() -> None:
    """Connecting upstream to the gateway itself is refused at once, and the session answers
    530 from inside `run`. That answer must not overtake the effect already queued behind the
    connect: `run` queues what it produces while running instead of re-entering itself."""
    protocol, transport = connected_client(Config())
    transport.clear()
    protocol.run([ConnectUpstream(GATEWAY.host, GATEWAY.port), ToClient(Reply.of(200, "first"))])
    lines = transport.value().decode().splitlines()
    assert lines[0] == "200 first"
    assert lines[1].startswith("530 Cannot connect to the upstream"), lines
    assert "connection loop" in lines[1]
