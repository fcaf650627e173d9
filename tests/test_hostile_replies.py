"""Every command gets its one final reply, in time: a live gateway against peers that leave it
without a data side (a taken passive range, a refused PORT address, a data-connection TLS
handshake that never completes) or without an answer (an upstream that falls silent, stalls
after 150, or claims success without a data connection).

Each case runs the real gateway process with short timeouts, so a reply that would come only
after a default timeout (or never) fails the test through the client's socket timeout; no test
asserts how fast a reply came.
"""

from __future__ import annotations

import contextlib
import ftplib
import random
import socket
import ssl
import threading
import time
from pathlib import Path

import clients
import pytest
from gateway_process import GatewayProcess, StartGateway, start_gateway
from hostile_upstream import HostileUpstream, Mode
from pki import Pki
from servers import RunningServer

MIB = 1024 * 1024
HEALTH = "health.bin"
HEALTH_DATA = random.Random(4217).randbytes(MIB)
PAYLOAD = random.Random(959).randbytes(256 * 1024)
TIMEOUT = 20.0
"""The client's socket timeout: far above the gateway's 2 s timeouts, far below its defaults
(30 s data_connect, 120 s reply, 300 s stall), so a gateway that waits fails the test."""

CONFIG = """\
allow_upstream = ["127.0.0.0/8"]
[timeouts]
data_connect = 2
stall = 2
reply = 2
"""


SERVED = {HEALTH: HEALTH_DATA}


def run_gateway(tmp_path: Path, extra: str = "", *args: str) -> GatewayProcess:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG + extra)
    return start_gateway(tmp_path, "--config", str(config), *args)


@pytest.fixture
def gateway(gateways: StartGateway) -> GatewayProcess:
    return gateways(config=CONFIG)


def connect(gw: GatewayProcess) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(gw.host, gw.port)
    return ftp


def login(gw: GatewayProcess, host: str, port: int, user: str, password: str) -> ftplib.FTP:
    return clients.login(gw.host, gw.port, f"{user}@{host}:{port}", password, timeout=TIMEOUT)


def login_ftpd(gw: GatewayProcess, server: RunningServer) -> ftplib.FTP:
    return login(gw, server.host, server.port, server.user, server.password)


def login_hostile(gw: GatewayProcess, upstream: HostileUpstream) -> ftplib.FTP:
    return login(gw, upstream.host, upstream.port, "anon", "secret")


def answer(ftp: ftplib.FTP, command: str) -> str:
    """The final reply to `command` (after any 1xx), whatever it is: no raising."""
    ftp.putcmd(command)
    reply = ftp.getmultiline()
    while reply.startswith("1"):
        reply = ftp.getmultiline()
    return reply


def assert_closed(ftp: ftplib.FTP) -> None:
    with pytest.raises((EOFError, ConnectionResetError)):
        ftp.getline()
    ftp.close()


def wait_for_log(gw: GatewayProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := gw.log()):
        assert time.monotonic() < deadline, f"{text!r} not in the gateway log:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


def assert_download_works(ftp: ftplib.FTP) -> None:
    chunks: list[bytes] = []
    assert ftp.retrbinary(f"RETR {HEALTH}", chunks.append).startswith("226")
    assert b"".join(chunks) == HEALTH_DATA


# ---------------------------------------------------------- the gateway cannot open its side


@pytest.mark.parametrize("verb", ["PASV", "EPSV"])
def test_taken_passive_range_gets_425_and_the_session_goes_on(
    tmp_path: Path, server: RunningServer, verb: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        gw = run_gateway(tmp_path, f'[data]\npassive_ports = "{taken}-{taken}"\n')
        try:
            ftp = login_ftpd(gw, server)
            # Pipelined behind the passive command: each still gets its own reply, in order.
            assert ftp.sock is not None
            ftp.sock.sendall(f"{verb}\r\nNOOP\r\nPWD\r\n".encode())
            first = ftp.getmultiline()
            assert first.startswith("425") and "passive" in first, first
            assert ftp.getmultiline().startswith("200")
            assert ftp.getmultiline().startswith("257")
            wait_for_log(gw, "Cannot open a passive listener")
            assert answer(ftp, f"RETR {HEALTH}").startswith("425")  # no data target was left
            assert ftp.quit().startswith("221")
        finally:
            gw.stop()


def test_port_to_a_closed_port_gets_425_and_the_session_goes_on(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    # A bound socket that does not listen: connections to its port are refused, and no other
    # process can take the port while the test runs.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        ftp = login_ftpd(gateway, server)
        ftp.voidcmd(f"PORT 127,0,0,1,{port >> 8},{port & 0xFF}")
        final = answer(ftp, f"RETR {HEALTH}")
        assert final.startswith("425") and "refused" in final.lower(), final
        assert ftp.voidcmd("NOOP").startswith("200")
        assert_download_works(ftp)
        assert ftp.quit().startswith("221")


def test_port_refused_while_the_upstream_waits_for_its_data_connection_gets_425_at_once(
    gateway: GatewayProcess,
) -> None:
    # The upstream has sent 150 for STOR and waits for a data connection the gateway closes
    # when the client's port refuses; it never answers STOR, only ABOR (with 225), as
    # pyftpdlib does. The client gets 425, not the reply timeout's 426 and 421, and the
    # session stays in step.
    with socket.socket() as closed, HostileUpstream(Mode.WAITS_FOR_DATA) as up:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        ftp = login_hostile(gateway, up)
        ftp.voidcmd(f"PORT 127,0,0,1,{port >> 8},{port & 0xFF}")
        final = answer(ftp, "STOR upload")
        assert final.startswith("425") and "refused" in final.lower(), final
        assert ftp.voidcmd("NOOP").startswith("200")
        assert ftp.pwd() == "/"
        assert up.saw("answered ABOR with 225"), up.events
        assert ftp.quit().startswith("221")


def test_last_reply_reaches_a_client_whose_pipelined_commands_were_never_read(
    gateway: GatewayProcess,
) -> None:
    # The upstream answers nothing after login; the client pipelines far more commands than
    # the gateway queues (`max_pending_commands`, 32), so the gateway closes with 421 while
    # most of them are still unread in its socket. Closing a socket with unread bytes sends a
    # reset, which can destroy the replies still on their way to the client; the gateway
    # sends FIN after its last reply instead and reads (and drops) what the client still
    # sends until the client closes too.
    kept: list[ftplib.FTP] = []
    with HostileUpstream(Mode.DEAF_AFTER_LOGIN) as up:
        for _ in range(5):
            ftp = login_hostile(gateway, up)
            kept.append(ftp)
            sock = ftp.sock
            assert sock is not None
            # More than one read of the gateway takes (64 KiB): much is still unread at 421.
            sender = threading.Thread(target=_send_quietly, args=(sock, b"NOOP\r\n" * 40000))
            sender.start()
            received = bytearray()
            while chunk := sock.recv(65536):  # a reset raises here: the test fails
                received.extend(chunk)
            last = bytes(received).decode("latin-1").splitlines()[-1]
            assert last.startswith("421 Too many commands"), last
            sender.join(timeout=TIMEOUT)
        # The clients keep their sockets open: the gateway closes them itself a little later.
        deadline = time.monotonic() + TIMEOUT
        while gateway.log().count("Session ended") < 6:  # and start_gateway's probe
            assert time.monotonic() < deadline, gateway.log()[-2000:]
            time.sleep(0.1)
        for ftp in kept:
            ftp.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


# ---------------------------------------------------------------- an upstream falls silent


def test_upstream_that_never_answers_a_command_gets_421(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    with HostileUpstream(Mode.SILENT_PWD) as up:
        ftp = login_hostile(gateway, up)
        final = answer(ftp, "PWD")
        assert final.startswith("421") and "no reply within 2 seconds" in final, final
        assert_closed(ftp)
        wait_for_log(gateway, "sent no reply within 2 seconds")
    # Other sessions are unaffected.
    ftp = login_ftpd(gateway, server)
    assert_download_works(ftp)
    ftp.quit()


def test_upstream_without_a_final_reply_after_the_transfer_gets_426_then_421(
    gateway: GatewayProcess,
) -> None:
    with HostileUpstream(Mode.SILENT_AFTER_RETR, payload=PAYLOAD) as up:
        ftp = login_hostile(gateway, up)
        data, final = clients.retr_passive(ftp, "file", TIMEOUT)
        assert data == PAYLOAD  # every byte arrived, but the upstream never confirmed
        assert final.startswith("426") and "no reply within 2 seconds" in final, final
        # The session went on; the upstream stays silent, so the next command ends it.
        final = answer(ftp, "NOOP")
        assert final.startswith("421") and "no reply" in final, final
        assert_closed(ftp)


def test_upstream_stalling_after_150_gets_426(gateway: GatewayProcess) -> None:
    with HostileUpstream(Mode.STALL_AFTER_150, payload=PAYLOAD) as up:
        ftp = login_hostile(gateway, up)
        data, final = clients.retr_passive(ftp, "file", TIMEOUT)
        assert data == b""
        assert final.startswith("426"), final
        assert "sent 150, then nothing" in up.events
        wait_for_log(gateway, "no data moved for 2 seconds")
        wait_for_log(gateway, "sent no reply within 2 seconds")


# ------------------------------------------------------------- success without a transfer


def test_upstream_success_without_data_connection_is_not_226(tmp_path: Path) -> None:
    """The upstream is active (it would connect to the gateway) and answers RETR with 226 at
    once, having connected nowhere: nothing was transferred."""
    gw = run_gateway(tmp_path, '[data]\nupstream_mode = "active"\n')
    try:
        with HostileUpstream(Mode.SUCCESS_WITHOUT_DATA, payload=PAYLOAD) as up:
            ftp = login_hostile(gw, up)
            host, port = ftplib.parse227(ftp.sendcmd("PASV"))
            with socket.create_connection((host, port), timeout=TIMEOUT) as data:
                final = answer(ftp, "RETR file")
                assert final.startswith("451"), final
                assert "without ever opening a data connection" in final
                assert clients.read_until_closed(data) == b""
            assert "answered RETR 226 without a data connection" in up.events
            wait_for_log(gw, "without ever opening a data connection")
            assert ftp.voidcmd("NOOP").startswith("200")  # the session goes on
            ftp.quit()
    finally:
        gw.stop()


def test_upstream_success_without_1xx_to_an_active_client_is_not_226(
    gateway: GatewayProcess,
) -> None:
    """The gateway's passive connection to the upstream waits in a listen queue the upstream
    then closes; its 226 (no 150) must not reach a client that got no byte."""
    with HostileUpstream(Mode.SUCCESS_WITHOUT_DATA, payload=PAYLOAD) as up:
        ftp = login_hostile(gateway, up)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT)
            port = listener.getsockname()[1]
            ftp.voidcmd(f"PORT 127,0,0,1,{port >> 8},{port & 0xFF}")
            final = answer(ftp, "RETR file")
            assert final.startswith("4"), final
        assert ftp.voidcmd("NOOP").startswith("200")
        ftp.quit()


# ------------------------------------------------- a data-connection TLS handshake stalls


def test_client_data_tls_handshake_that_never_completes_gets_425(
    tmp_path: Path, pki: Pki, server: RunningServer
) -> None:
    tls = f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n'
    gw = run_gateway(tmp_path, tls, "--upstream", f"127.0.0.1:{server.port}")
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        ftp = ftplib.FTP_TLS(context=context, timeout=TIMEOUT)
        ftp.connect("localhost", gw.port)
        ftp.login(server.user, server.password)
        ftp.prot_p()
        ftp.voidcmd("TYPE I")
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        # Connect the data port and never start the handshake.
        with socket.create_connection((host, port), timeout=TIMEOUT) as data:
            final = answer(ftp, f"RETR {HEALTH}")
            assert final.startswith("425"), final
            assert "TLS handshake not complete within 2 seconds" in final
            assert clients.read_until_closed(data) == b""
        assert ftp.voidcmd("NOOP").startswith("200")
        chunks: list[bytes] = []  # a client that does complete its handshake is served
        assert ftp.retrbinary(f"RETR {HEALTH}", chunks.append).startswith("226")
        assert b"".join(chunks) == HEALTH_DATA
        ftp.quit()
    finally:
        gw.stop()


def test_tls_session_the_gateway_ends_is_closed_not_left_open(tmp_path: Path, pki: Pki) -> None:
    """A session the gateway ends with 421 is closed, also under TLS: a registered producer
    (control-channel back-pressure) must not keep the transport open after the 421, where it
    would hold the client's connection and session slot for as long as the client stays."""
    tls = f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n'
    gw = run_gateway(tmp_path, "login = 2\n" + tls)  # CONFIG ends inside [timeouts]
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        ftp = ftplib.FTP_TLS(context=context, timeout=TIMEOUT)
        ftp.connect("localhost", gw.port)
        ftp.auth()
        assert ftp.getline().startswith("421 Login timed out")
        assert_closed(ftp)
        wait_for_log(gw, "Session ended")
    finally:
        gw.stop()


def test_upstream_data_tls_handshake_that_never_completes_gets_425(
    tmp_path: Path, pki: Pki
) -> None:
    tls = f'[tls]\nupstream = "required"\nupstream_ca_file = "{pki.ca_cert}"\n'
    gw = run_gateway(tmp_path, tls)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_chain, pki.server_key)
    try:
        with HostileUpstream(Mode.TLS_DATA_STALL, tls_context=context) as up:
            ftp = login_hostile(gw, up)
            data, final = clients.retr_passive(ftp, "file", TIMEOUT)
            assert data == b""
            assert final.startswith("425"), final
            assert "TLS handshake not complete within 2 seconds" in final
            assert up.saw("the gateway closed the data connection"), up.events
            assert ftp.voidcmd("NOOP").startswith("200")  # the session goes on
            ftp.quit()
    finally:
        gw.stop()
