"""The control shell in memory: `ClientControl` and `UpstreamControl` on a memory reactor.

A test plays the client, the upstream server and the data peers by feeding bytes into the
gateway's protocols and reading what the gateway wrote (see `memory.MemoryGateway`). The
session inside is not touched: these tests hold for whatever shape it has.
"""

from __future__ import annotations

import pytest
from memory import CLIENT_IP, UPSTREAM_IP, MemoryGateway, Peer, reverse_config
from pki import Pki
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway.codec import Reply
from gateway.config import Config, Limits, Timeouts, Tls
from gateway.control import ClientControl, GatewayFactory
from gateway.effects import ConnectUpstream, ToClient


def tls_config(pki: Pki, **overrides: object) -> MemoryGateway:
    return MemoryGateway(
        reverse_config(
            tls=Tls(
                upstream="off", certificate=str(pki.server_cert), private_key=str(pki.server_key)
            ),
            **overrides,
        )
    )


def test_commands_sent_before_the_upstream_greets_go_out_after_it_in_order() -> None:
    gateway = MemoryGateway(reverse_config())
    client = gateway.connect_client()
    client.send(b"USER alice\r\nPASS secret\r\n")
    upstream = gateway.accept_outgoing()
    assert (upstream.transport.getPeer().host, upstream.transport.getPeer().port) == (
        UPSTREAM_IP,
        21,
    )
    assert upstream.received() == b""
    upstream.send(b"220 upstream ready\r\n")
    assert client.lines() == ["220 upstream ready"]
    assert upstream.received() == b"USER alice\r\n"
    upstream.send(b"331 password please\r\n")
    assert upstream.received() == b"PASS secret\r\n"
    upstream.send(b"230 logged in\r\n")
    assert client.lines() == ["331 password please", "230 logged in"]


def test_pipelined_replies_keep_the_order_of_the_commands() -> None:
    # One command, one final reply, in order (RFC 959 section 4.2), whether the gateway
    # answers it itself (PASV) or the upstream does (NOOP).
    gateway = MemoryGateway(reverse_config())
    client, upstream = gateway.logged_in()
    client.send(b"PASV\r\nNOOP\r\nPWD\r\n")
    assert upstream.received() == b"NOOP\r\n"
    upstream.send(b"200 noop ok\r\n")
    assert upstream.received() == b"PWD\r\n"
    upstream.send(b'257 "/" is the current directory\r\n')
    lines = client.lines()
    assert [line[:3] for line in lines] == ["227", "200", "257"]


def test_auth_tls_answers_234_in_clear_text_before_the_switch(pki: Pki) -> None:
    gateway = tls_config(pki)
    client, _ = gateway.reverse_session()
    client.transport.events.clear()
    client.send(b"AUTH TLS\r\n")
    kinds = [kind for kind, _ in client.transport.events]
    assert kinds == ["write", "startTLS"]
    assert client.transport.events[0][1].startswith(b"234 ")
    assert client.transport.events[1][1] is gateway.factory.server_tls


def test_client_bytes_sent_after_auth_tls_in_clear_text_are_discarded(pki: Pki) -> None:
    # RFC 4217 section 4: nothing the client sent in clear text after AUTH TLS may be acted
    # on; a man in the middle could have added it.
    gateway = tls_config(pki)
    client, upstream = gateway.reverse_session()
    client.received()
    client.send(b"AUTH TLS\r\nUSER mallory\r\nPASS x\r\nUSER mal")
    assert [line[:4] for line in client.lines()] == ["234 "]
    assert upstream.received() == b""
    # The test transport has no TLS layer: bytes from here on stand for the decrypted stream.
    client.send(b"USER alice\r\n")
    assert upstream.received() == b"USER alice\r\n"
    upstream.send(b"331 password please\r\n")
    assert client.lines() == ["331 password please"]


def test_upstream_replies_after_its_234_in_clear_text_are_discarded() -> None:
    # RFC 4217 section 4, the other way round: what followed the upstream's 234 in the same
    # clear-text read was not sent by the TLS peer.
    gateway = MemoryGateway(reverse_config(tls=Tls(upstream="required")))
    client = gateway.connect_client()
    upstream = gateway.accept_outgoing()
    upstream.send(b"220 upstream ready\r\n")
    assert upstream.received() == b"AUTH TLS\r\n"
    upstream.send(b"234 go ahead\r\n421 injected: closing\r\n")
    assert [kind for kind, _ in upstream.transport.events if kind == "startTLS"] == ["startTLS"]
    assert client.received() == b""
    upstream.protocol.handshakeCompleted()  # type: ignore[attr-defined]
    assert upstream.received() == b"PBSZ 0\r\n"
    upstream.send(b"200 PBSZ=0\r\n")
    assert upstream.received() == b"PROT P\r\n"
    assert client.received() == b""
    upstream.send(b"200 PROT now private\r\n")
    assert client.lines() == ["220 upstream ready"]


def test_reply_timer_ends_the_session_when_the_upstream_stays_silent() -> None:
    config = reverse_config(timeouts=Timeouts(reply=20.0))
    gateway = MemoryGateway(config)
    client, upstream = gateway.logged_in()
    client.send(b"CWD /a\r\n")
    assert upstream.received() == b"CWD /a\r\n"
    gateway.reactor.advance(19.0)
    assert client.received() == b""
    upstream.send(b"250 ok\r\n")
    assert client.lines() == ["250 ok"]
    # Answered: no wait is left, so no timer ends the session however long it stays quiet
    # (the idle timeout is far away).
    gateway.reactor.advance(60.0)
    assert client.received() == b""
    assert not client.transport.disconnecting
    client.send(b"CWD /b\r\n")
    gateway.reactor.advance(19.9)
    assert client.received() == b""
    gateway.reactor.advance(0.2)
    lines = client.lines()
    assert lines == ["421 The upstream server sent no reply within 20 seconds; closing."]
    assert client.transport.disconnecting


def test_each_upstream_reply_restarts_the_reply_timer() -> None:
    gateway = MemoryGateway(reverse_config(timeouts=Timeouts(reply=20.0)))
    client, upstream = gateway.logged_in()
    client.send(b"CWD /a\r\nCWD /b\r\n")
    gateway.reactor.advance(15.0)
    upstream.send(b"250 a\r\n")
    gateway.reactor.advance(15.0)  # 30 s after the first command, 15 s after the last reply
    assert client.lines() == ["250 a"]
    upstream.send(b"250 b\r\n")
    assert client.lines() == ["250 b"]


def test_login_timer_ends_a_session_that_does_not_log_in() -> None:
    gateway = MemoryGateway(reverse_config(timeouts=Timeouts(login=30.0)))
    client, _ = gateway.reverse_session()
    client.received()
    gateway.reactor.advance(29.0)
    assert client.received() == b""
    gateway.reactor.advance(1.0)
    assert client.lines() == ["421 Login timed out; closing the connection."]
    assert client.transport.disconnecting


def test_passive_listener_admits_only_the_clients_control_ip() -> None:
    # Data-port theft (RFC 2577 section 5), through the whole shell.
    gateway = MemoryGateway(reverse_config())
    client, _ = gateway.logged_in()
    client.send(b"PASV\r\n")
    (reply,) = client.lines()
    assert reply.startswith("227 ")
    port, _, _, interface = gateway.reactor.tcpServers[-1]
    assert interface == "127.0.0.1"
    assert reply.endswith(f"(127,0,0,1,{port >> 8},{port & 255}).")
    assert gateway.connect_to_listener(ip="127.0.0.66") is None
    assert gateway.reactor.ports[-1].listening
    assert gateway.connect_to_listener(ip=CLIENT_IP) is not None
    assert not gateway.reactor.ports[-1].listening


def retr_ready(gateway: MemoryGateway) -> tuple[Peer, Peer, Peer, Peer]:
    """A RETR with both data connections made: client, upstream, client data, upstream data."""
    client, upstream = gateway.logged_in()
    client.send(b"PASV\r\n")
    client.received()
    client.send(b"RETR file\r\n")
    assert upstream.received() == b"EPSV\r\n"
    upstream.send(b"229 Entering Extended Passive Mode (|||2000|)\r\n")
    upstream_data = gateway.accept_outgoing()
    assert upstream_data.transport.getPeer().port == 2000
    client_data = gateway.connect_to_listener()
    assert client_data is not None
    assert upstream.received() == b"RETR file\r\n"
    upstream.send(b"150 opening\r\n")
    assert client.lines() == ["150 opening"]
    return client, upstream, client_data, upstream_data


def test_226_waits_until_the_relayed_bytes_reached_the_client() -> None:
    # The completion hazard: the upstream's 226 can come before the client has every byte.
    gateway = MemoryGateway(reverse_config())
    client, upstream, client_data, upstream_data = retr_ready(gateway)
    upstream_data.send(b"file contents")
    assert client_data.received() == b"file contents"
    upstream_data.close()
    upstream.send(b"226 transfer complete\r\n")
    assert client.received() == b""
    assert client_data.transport.disconnecting
    client_data.close()
    assert client.lines() == ["226 transfer complete"]


def test_a_relay_that_failed_never_reaches_the_client_as_226() -> None:
    gateway = MemoryGateway(reverse_config())
    client, upstream, client_data, upstream_data = retr_ready(gateway)
    upstream_data.send(b"partial")
    client_data.close(Failure(error.ConnectionLost("reset")))
    upstream_data.close()
    upstream.send(b"226 transfer complete\r\n")
    lines = client.lines()
    assert len(lines) == 1 and lines[0].startswith("426 "), lines


def test_a_late_loss_of_a_closed_transfers_connection_does_not_touch_the_next_one() -> None:
    # The stale-channel guard: a second PASV closes the first data connection; the reactor
    # reports its loss later, when the next transfer's channels are already in place.
    gateway = MemoryGateway(reverse_config())
    client, upstream = gateway.logged_in()
    client.send(b"PASV\r\n")
    client.received()
    old = gateway.connect_to_listener()
    assert old is not None
    client.send(b"PASV\r\n")
    assert client.lines()[0].startswith("227 ")
    assert old.transport.aborted
    client.send(b"RETR file\r\n")
    assert upstream.received() == b"EPSV\r\n"
    upstream.send(b"229 Entering Extended Passive Mode (|||2000|)\r\n")
    upstream_data = gateway.accept_outgoing()
    old.close(Failure(error.ConnectionAborted()))
    assert client.received() == b""
    client_data = gateway.connect_to_listener()
    assert client_data is not None
    assert upstream.received() == b"RETR file\r\n"
    upstream.send(b"150 opening\r\n")
    upstream_data.send(b"data")
    upstream_data.close()
    upstream.send(b"226 transfer complete\r\n")
    client_data.close()
    assert client_data.transport.value() == b"data"
    assert client.lines() == ["150 opening", "226 transfer complete"]


def test_abor_during_a_transfer_answers_426_then_226_and_the_next_transfer_works() -> None:
    # RFC 959 section 4.1.3: the aborted command gets 426, ABOR itself 226. The aborted
    # relay's connections report their loss later, while the next transfer runs: that stale
    # outcome must not end the next transfer.
    gateway = MemoryGateway(reverse_config())
    client, upstream, client_data, upstream_data = retr_ready(gateway)
    upstream_data.send(b"some")
    client.send(b"ABOR\r\n")
    assert client_data.transport.aborted and upstream_data.transport.aborted
    assert upstream.received() == b"ABOR\r\n"
    upstream.send(b"426 aborted\r\n226 ABOR ok\r\n")
    assert [line[:3] for line in client.lines()] == ["426", "226"]
    client.send(b"PASV\r\n")
    client.received()
    client.send(b"RETR other\r\n")
    assert upstream.received() == b"EPSV\r\n"
    upstream.send(b"229 Entering Extended Passive Mode (|||2001|)\r\n")
    next_upstream = gateway.accept_outgoing()
    next_client = gateway.connect_to_listener()
    assert next_client is not None
    assert upstream.received() == b"RETR other\r\n"
    upstream.send(b"150 opening\r\n")
    assert client.lines() == ["150 opening"]
    client_data.close(Failure(error.ConnectionAborted()))
    upstream_data.close(Failure(error.ConnectionAborted()))
    assert client.received() == b""
    next_upstream.send(b"rest")
    next_upstream.close()
    upstream.send(b"226 transfer complete\r\n")
    next_client.close()
    assert next_client.transport.value() == b"rest"
    assert client.lines() == ["226 transfer complete"]


def test_the_upstream_going_away_ends_the_session_with_421() -> None:
    gateway = MemoryGateway(reverse_config())
    client, upstream = gateway.logged_in()
    upstream.close(Failure(error.ConnectionLost("reset")))
    lines = client.lines()
    assert len(lines) == 1 and lines[0].startswith("421 "), lines
    assert client.transport.disconnecting


def test_client_leaving_closes_the_upstream_and_frees_its_session_slot() -> None:
    gateway = MemoryGateway(reverse_config())
    client, upstream = gateway.logged_in()
    assert gateway.factory.active == 1
    client.close()
    assert upstream.transport.disconnecting
    assert gateway.factory.active == 0
    assert gateway.factory.sessions == {}


@pytest.mark.parametrize("limit", [1, 2])
def test_sessions_beyond_the_per_ip_limit_get_421_and_no_session(limit: int) -> None:
    gateway = MemoryGateway(reverse_config(limits=Limits(max_sessions_per_ip=limit)))
    for _ in range(limit):
        gateway.connect_client()
    refused = gateway.connect_client()
    assert refused.lines() == ["421 Too many sessions from your address; try again later."]
    assert refused.transport.disconnecting
    assert gateway.factory.active == limit
    assert len(gateway.reactor.tcpClients) == limit  # no upstream connection for it


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
