"""Honest transfers against a real server (vsftpd): completion, ABOR, flow control, resume,
pipelining, address families and upstream data modes."""

from __future__ import annotations

import ftplib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import clients
import pytest
from clients import curl, file_sha256, ftplib_get, ftplib_put, ftplib_session, reset, sha256
from gateway_process import GatewayProcess, StartGateway, start_gateway
from servers import RunningServer, start_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def vsftpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server("vsftpd", tmp_path_factory.mktemp("vsftpd"))
    data = os.urandom(8 * MIB)
    (server.root / "eight.bin").write_bytes(data)
    big = server.root / "big.bin"
    with big.open("wb") as f:
        f.truncate(256 * MIB)  # sparse: the server reads zeros, the disk stays empty
    for path in server.root.iterdir():
        path.chmod(0o644)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(module_gateways: StartGateway, vsftpd: RunningServer) -> GatewayProcess:
    return module_gateways("--upstream", f"{vsftpd.host}:{vsftpd.port}")


def login(gw: GatewayProcess, server: RunningServer, host: str = "127.0.0.1") -> ftplib.FTP:
    return clients.login(host, gw.port, server.user, server.password, timeout=60)


def passive_data(ftp: ftplib.FTP) -> socket.socket:
    """EPSV, then connect: a data socket the test controls byte by byte."""
    port = int(ftp.sendcmd("EPSV").split("|")[3])
    return socket.create_connection((ftp.sock.getpeername()[0], port), timeout=30)


def test_upload_cut_by_client_reset_is_not_reported_as_226(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    ftp = login(gateway, vsftpd)
    data = passive_data(ftp)
    ftp.putcmd("STOR cut.bin")
    assert ftp.getresp().startswith("150")
    data.sendall(os.urandom(2 * MIB))
    reset(data)
    with pytest.raises(ftplib.error_temp) as failed:
        ftp.getresp()
    assert str(failed.value)[:3] in ("426", "451")
    assert ftp.voidcmd("NOOP").startswith("200")  # the session and its pairing survive
    ftp.quit()


def test_download_abandoned_by_client_gets_426_not_226(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    ftp = login(gateway, vsftpd)
    data = passive_data(ftp)
    ftp.putcmd("RETR big.bin")
    assert ftp.getresp().startswith("150")
    assert len(data.recv(65536)) > 0
    reset(data)
    with pytest.raises(ftplib.error_temp) as failed:
        ftp.getresp()
    assert str(failed.value).startswith("426")
    ftp.quit()


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_abor_with_telnet_synch_answers_426_then_226(
    gateway: GatewayProcess, vsftpd: RunningServer, direction: str
) -> None:
    ftp = login(gateway, vsftpd)
    data = passive_data(ftp)
    ftp.putcmd("RETR big.bin" if direction == "download" else "STOR aborted.bin")
    assert ftp.getresp().startswith("150")
    if direction == "download":
        assert len(data.recv(65536)) > 0
    else:
        data.sendall(os.urandom(MIB))
    # RFC 959 section 4.1.3: Telnet IP, then Synch (IAC DM as urgent data), then ABOR.
    ftp.sock.sendall(b"\xff\xf4")
    ftp.sock.send(b"\xff\xf2", socket.MSG_OOB)
    ftp.sock.sendall(b"ABOR\r\n")
    first = ftp.getline()
    second = ftp.getline()
    assert first.startswith("426"), first
    assert second.startswith("226"), second
    data.close()
    assert ftp.voidcmd("NOOP").startswith("200")
    assert sha256(ftplib_get(ftp, "eight.bin")) == file_sha256(vsftpd.root / "eight.bin")
    ftp.quit()


def test_python_ftplib_abort_sent_as_urgent_data(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    ftp = login(gateway, vsftpd)
    conn = ftp.transfercmd("RETR big.bin")
    assert len(conn.recv(65536)) > 0
    reply = ftp.abort()  # sends the whole "ABOR\r\n" with MSG_OOB
    conn.close()
    assert reply.startswith("426")  # for the RETR; the ABOR's own 226 follows
    assert ftp.getline().startswith("226")
    assert ftp.voidcmd("NOOP").startswith("200")
    ftp.quit()


def test_pipelined_commands_get_replies_in_order(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220")
        sock.sendall(
            f"USER {vsftpd.user}\r\nPASS {vsftpd.password}\r\nPWD\r\nTYPE I\r\nSIZE eight.bin\r\n"
            "SYST\r\nQUIT\r\n".encode()
        )
        codes = []
        while len(codes) < 7:
            line = f.readline()
            assert line, f"connection closed after {codes}"
            if line[3:4] == b" ":
                codes.append(line[:3].decode())
        assert codes == ["331", "230", "257", "200", "213", "215", "221"]


def test_rest_resumes_download_and_upload(gateway: GatewayProcess, vsftpd: RunningServer) -> None:
    payload = (vsftpd.root / "eight.bin").read_bytes()
    ftp = login(gateway, vsftpd)
    tail = bytearray()
    ftp.retrbinary("RETR eight.bin", tail.extend, rest=5 * MIB + 7)
    assert bytes(tail) == payload[5 * MIB + 7 :]
    half = len(payload) // 2
    ftplib_put(ftp, "resumed.bin", payload[:half])
    import io

    ftp.storbinary("STOR resumed.bin", io.BytesIO(payload[half:]), rest=half)
    ftp.quit()
    assert file_sha256(vsftpd.root / "resumed.bin") == sha256(payload)


def test_metadata_commands_pass_through(gateway: GatewayProcess, vsftpd: RunningServer) -> None:
    ftp = login(gateway, vsftpd)
    assert ftp.size("eight.bin") == 8 * MIB
    assert ftp.voidcmd("MDTM eight.bin").startswith("213")
    names = [name for name, _ in ftp.mlsd()] if "MLSD" in ftp.sendcmd("FEAT") else ftp.nlst()
    assert "eight.bin" in names
    feat = ftp.sendcmd("FEAT")
    assert " EPSV" in feat and " EPRT" in feat
    ftp.quit()


def test_flow_control_keeps_memory_bounded_for_a_slow_reader(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    """256 MiB to a reader slower than the upstream: the gateway's resident memory must not
    follow the file size (it would grow by hundreds of MiB without back-pressure)."""
    ftp = login(gateway, vsftpd)
    baseline = gateway.rss_kib()
    data = passive_data(ftp)
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    ftp.putcmd("RETR big.bin")
    assert ftp.getresp().startswith("150")
    peak = baseline
    received = 0
    deadline = time.monotonic() + 240
    samples = 0
    while time.monotonic() < deadline:
        chunk = data.recv(256 * 1024)
        if not chunk:
            break
        received += len(chunk)
        if received % (4 * MIB) < len(chunk):
            peak = max(peak, gateway.rss_kib())
            samples += 1
        time.sleep(0.0005)  # slower than loopback from vsftpd
    data.close()
    assert received == 256 * MIB
    assert ftp.getresp().startswith("226")
    ftp.quit()
    assert samples > 20
    assert peak - baseline < 48 * 1024, f"RSS grew from {baseline} KiB to {peak} KiB"


def test_ipv6_client_to_ipv4_upstream(tmp_path: Path, vsftpd: RunningServer) -> None:
    gw = start_gateway(tmp_path, "--upstream", f"{vsftpd.host}:{vsftpd.port}", host="::1")
    try:
        ftp = login(gw, vsftpd, host="::1")
        payload = (vsftpd.root / "eight.bin").read_bytes()
        assert sha256(ftplib_get(ftp, "eight.bin")) == sha256(payload)  # EPSV over ::1
        ftp.set_pasv(False)  # EPRT |2| to the client's ::1
        assert sha256(ftplib_get(ftp, "eight.bin")) == sha256(payload)
        ftp.quit()
        result = curl(
            f"ftp://{vsftpd.user}:{vsftpd.password}@[::1]:{gw.port}/eight.bin", "-g", "-P", "::1"
        )
        assert result.returncode == 0, result.stderr.decode()
        assert sha256(result.stdout) == sha256(payload)
    finally:
        gw.stop()


def test_ipv4_client_to_ipv6_upstream(tmp_path: Path) -> None:
    server = start_server("vsftpd", tmp_path / "v6", host="::1")
    payload = os.urandom(3 * MIB)
    (server.root / "six.bin").write_bytes(payload)
    (server.root / "six.bin").chmod(0o644)
    gw = start_gateway(tmp_path, "--upstream", f"[::1]:{server.port}")
    try:
        for passive in (True, False):
            ftp = ftplib_session(
                "127.0.0.1", gw.port, server.user, server.password, passive=passive
            )
            assert sha256(ftplib_get(ftp, "six.bin")) == sha256(payload)
            ftplib_put(ftp, f"up-{passive}.bin", payload)
            ftp.quit()
            assert file_sha256(server.root / f"up-{passive}.bin") == sha256(payload)
    finally:
        gw.stop()
        server.stop()


@pytest.mark.parametrize("mode", ["active", "pasv", "epsv", "client"])
def test_upstream_data_modes(tmp_path: Path, vsftpd: RunningServer, mode: str) -> None:
    gw = start_gateway(
        tmp_path,
        "--upstream",
        f"{vsftpd.host}:{vsftpd.port}",
        "--upstream-data-mode",
        mode,
        "--log-level=debug",  # the commands sent upstream are debug lines
    )
    try:
        payload = (vsftpd.root / "eight.bin").read_bytes()
        for passive in (True, False):
            ftp = ftplib_session(
                "127.0.0.1", gw.port, vsftpd.user, vsftpd.password, passive=passive
            )
            assert sha256(ftplib_get(ftp, "eight.bin")) == sha256(payload)
            ftplib_put(ftp, f"mode-{mode}-{passive}.bin", payload)
            ftp.quit()
            assert file_sha256(vsftpd.root / f"mode-{mode}-{passive}.bin") == sha256(payload)
    finally:
        gw.stop()
    log = gw.log()
    expected = {
        "active": "To upstream: PORT",
        "pasv": "To upstream: PASV",
        "epsv": "To upstream: EPSV",
    }
    if mode in expected:
        assert expected[mode] in log


def test_passive_port_range_and_masquerade_address(tmp_path: Path, vsftpd: RunningServer) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[data]\npassive_ports = "29000-29009"\nmasquerade_address = "127.0.0.1"\n')
    gw = start_gateway(
        tmp_path, "--upstream", f"{vsftpd.host}:{vsftpd.port}", "--config", str(config)
    )
    try:
        ftp = login(gw, vsftpd)
        for _ in range(3):
            host, port = ftplib.parse227(ftp.sendcmd("PASV"))
            assert host == "127.0.0.1" and 29000 <= port <= 29009
        ftp.quit()
    finally:
        gw.stop()


def test_epsv_all_refuses_other_data_commands(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    ftp = login(gateway, vsftpd)
    assert ftp.sendcmd("EPSV ALL").startswith("200")
    with pytest.raises(ftplib.error_perm):
        ftp.sendcmd("PASV")
    with pytest.raises(ftplib.error_perm):
        ftp.sendcmd("PORT 127,0,0,1,200,1")
    payload = (vsftpd.root / "eight.bin").read_bytes()
    data = passive_data(ftp)
    ftp.putcmd("RETR eight.bin")
    assert ftp.getresp().startswith("150")
    got = bytearray()
    while chunk := data.recv(1 << 16):
        got += chunk
    data.close()
    assert ftp.getresp().startswith("226")
    assert sha256(bytes(got)) == sha256(payload)
    ftp.quit()


def test_concurrent_sessions_do_not_mix_data(
    gateway: GatewayProcess, vsftpd: RunningServer
) -> None:
    payload = (vsftpd.root / "eight.bin").read_bytes()
    results: list[str] = []

    def one(index: int) -> None:
        ftp = login(gateway, vsftpd)
        ftp.set_pasv(index % 2 == 0)
        results.append(sha256(ftplib_get(ftp, "eight.bin")))
        ftp.quit()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [sha256(payload)] * 6


@pytest.mark.parametrize("mode", ["passive", "active"])
def test_source_address_for_upstream_connections(tmp_path: Path, mode: str) -> None:
    """Control and data connections to the upstream leave from `source_address`. pyftpdlib
    refuses data connections from, and PORT to, any address but the control connection's."""
    server = start_server("pyftpdlib", tmp_path / "pyftpdlib")
    payload = os.urandom(MIB + 17)
    (server.root / "one.bin").write_bytes(payload)
    gw = start_gateway(
        tmp_path,
        "--upstream",
        f"{server.host}:{server.port}",
        "--source-address",
        "127.0.0.2",
        "--upstream-data-mode",
        mode,
    )
    try:
        ftp = ftplib_session("127.0.0.1", gw.port, server.user, server.password, passive=True)
        assert sha256(ftplib_get(ftp, "one.bin")) == sha256(payload)
        ftplib_put(ftp, "two.bin", payload)
        ftp.quit()
    finally:
        gw.stop()
        server.stop()
    assert file_sha256(server.root / "two.bin") == sha256(payload)
    # pyftpdlib names each logged-in session's peer: "127.0.0.2:41655-[ftptest] ...".
    peers = set(re.findall(r"([0-9.]+):\d+-\[ftptest\]", server.output_path.read_text()))
    assert peers == {"127.0.0.2"}
