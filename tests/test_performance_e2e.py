"""The fast paths with real parts: the spliced relay and its choice, the stall watchdog on either
relay, bytes from the receiving side, listen backlogs and the open files limit."""

from __future__ import annotations

import ftplib
import os
import re
import resource
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import clients
import pytest
from clients import file_sha256, ftplib_get, ftplib_put, ftplib_session, sha256
from gateway_process import GatewayProcess, free_port, start_gateway
from pki import Pki, make_pki
from servers import RunningServer, start_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def vsftpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server("vsftpd", tmp_path_factory.mktemp("vsftpd"))
    (server.root / "eight.bin").write_bytes(os.urandom(8 * MIB + 3))
    with (server.root / "big.bin").open("wb") as f:
        f.truncate(256 * MIB)  # sparse: the server reads zeros, the disk stays empty
    for path in server.root.iterdir():
        path.chmod(0o644)
    yield server
    server.stop()


def relay_paths(gw: GatewayProcess) -> list[str]:
    """The relay each finished transfer used, from the gateway's log, in order."""
    return re.findall(r"Transfer (?:download|upload) \w+: .*\((splice|copy)\)", gw.log())


def login(gw: GatewayProcess, server: RunningServer) -> ftplib.FTP:
    return clients.login("127.0.0.1", gw.port, server.user, server.password, timeout=60)


def passive_data(ftp: ftplib.FTP) -> socket.socket:
    port = int(ftp.sendcmd("EPSV").split("|")[3])
    return socket.create_connection(("127.0.0.1", port), timeout=30)


@pytest.mark.parametrize(
    ("setting", "expected"), [("auto", "splice"), ("splice", "splice"), ("copy", "copy")]
)
def test_data_relay_setting_chooses_the_path_for_plain_tcp(
    tmp_path: Path, vsftpd: RunningServer, setting: str, expected: str
) -> None:
    """Downloads and uploads, passive and active, arrive whole on the path `data.relay` names
    (auto splices plain TCP on Linux)."""
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{vsftpd.port}", "--data-relay", setting)
    try:
        payload = (vsftpd.root / "eight.bin").read_bytes()
        for passive in (True, False):
            ftp = ftplib_session(
                "127.0.0.1", gw.port, vsftpd.user, vsftpd.password, passive=passive
            )
            assert sha256(ftplib_get(ftp, "eight.bin")) == sha256(payload)
            name = f"relay-{setting}-{passive}.bin"
            assert ftplib_put(ftp, name, payload).startswith("226")
            ftp.quit()
            assert file_sha256(vsftpd.root / name) == sha256(payload)
    finally:
        gw.stop()
    assert relay_paths(gw) == [expected] * 4


def test_tls_data_connections_use_the_copy_relay(tmp_path: Path, vsftpd: RunningServer) -> None:
    """splice(2) cannot move TLS records: a protected client data connection is copied even
    with data.relay = splice, and the transfer still completes."""
    pki: Pki = make_pki(tmp_path / "pki")
    config = tmp_path / "tls.toml"
    config.write_text(
        f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n'
        'upstream = "off"\n'
    )
    gw = start_gateway(
        tmp_path,
        "--config",
        str(config),
        "--upstream",
        f"127.0.0.1:{vsftpd.port}",
        "--data-relay",
        "splice",
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        ftp = ftplib.FTP_TLS(context=context, timeout=60)
        ftp.connect("localhost", gw.port)
        ftp.login(vsftpd.user, vsftpd.password)
        ftp.prot_p()
        payload = (vsftpd.root / "eight.bin").read_bytes()
        assert sha256(ftplib_get(ftp, "eight.bin")) == sha256(payload)
        ftp.quit()
    finally:
        gw.stop()
    assert relay_paths(gw) == ["copy"]


def test_stalled_download_fails_with_426_on_either_relay(
    tmp_path: Path, vsftpd: RunningServer
) -> None:
    """A client that opens a download and never reads: the stall watchdog ends the transfer
    with 426 after timeouts.stall, on whichever relay the suite runs."""
    config = tmp_path / "stall.toml"
    config.write_text("[timeouts]\nstall = 1\n")
    gw = start_gateway(tmp_path, "--config", str(config), "--upstream", f"127.0.0.1:{vsftpd.port}")
    try:
        ftp = login(gw, vsftpd)
        data = passive_data(ftp)
        data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        ftp.putcmd("RETR big.bin")
        assert ftp.getresp().startswith("150")
        ftp.sock.settimeout(30)
        with pytest.raises(ftplib.error_temp, match=r"^426"):
            ftp.getresp()
        data.close()
        ftp.quit()
    finally:
        gw.stop()
    assert "no data moved for 1 seconds" in gw.log()


def test_bytes_written_into_a_spliced_download_are_discarded(
    tmp_path: Path, vsftpd: RunningServer
) -> None:
    """A client writing 64 MiB into its download connection: the spliced relay reads and drops
    those bytes (the gateway's memory does not grow with them) and the download completes."""
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{vsftpd.port}", "--data-relay", "splice")
    try:
        ftp = login(gw, vsftpd)
        baseline = gw.rss_kib()
        data = passive_data(ftp)
        ftp.putcmd("RETR eight.bin")
        assert ftp.getresp().startswith("150")
        junk = b"x" * MIB
        sent: list[int] = []

        def write() -> None:
            for _ in range(64):
                data.sendall(junk)
                sent.append(len(junk))

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        received = 0
        while chunk := data.recv(256 * 1024):
            received += len(chunk)
        writer.join(timeout=60)
        peak = gw.rss_kib()
        data.close()
        assert ftp.getresp().startswith("226")
        ftp.quit()
    finally:
        gw.stop()
    assert received == 8 * MIB + 3
    assert sum(sent) == 64 * MIB
    assert peak - baseline < 16 * 1024, f"RSS grew from {baseline} KiB to {peak} KiB"
    # One warn line, tied to its session by the session id like every other session line.
    assert re.search(
        r"#warn\] \[[0-9a-f]{8}\] Dropped 67108864 bytes sent by the receiving side 127\.0\.0\.1",
        gw.log(),
    ), gw.log()[-3000:]


def listen_backlog(port: int) -> int:
    """The accept-queue size the kernel gave the listener on `port` (ss shows it as Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    return int(out[2])


def test_listeners_get_a_backlog_that_holds_a_burst(tmp_path: Path) -> None:
    """Without backlog= in the endpoint the listener gets 1024 (capped by somaxconn), not
    Twisted's 50; an endpoint's own backlog= is kept."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    explicit = free_port()
    gw = start_gateway(
        tmp_path, "--demo", "--listen", f"tcp:{explicit}:interface=127.0.0.1:backlog=77"
    )
    try:
        assert listen_backlog(gw.port) == min(1024, somaxconn)
        assert listen_backlog(explicit) == 77
    finally:
        gw.stop()


def max_open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_open_files_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1024, "the hard limit must exceed 1024 for this test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        gw = start_gateway(tmp_path, "--demo")  # inherits the soft limit of 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert max_open_files(gw.proc.pid) == (hard, hard)
    finally:
        gw.stop()
    assert f"Open files limit: {hard} (hard limit {hard})" in gw.log()
    assert "limits.max_sessions" not in gw.log()


def test_open_files_limit_too_small_for_max_sessions_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nmax_open_files = 512\nmax_sessions = 1000\n")
    gw = start_gateway(tmp_path, "--demo", "--config", str(config))
    try:
        assert max_open_files(gw.proc.pid)[0] == 512
        deadline = time.monotonic() + 10
        while "limits.max_sessions" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        gw.stop()
    warnings = [line for line in gw.log().splitlines() if "limits.max_sessions" in line]
    assert len(warnings) == 1
    assert "limits.max_sessions is 1000 but 512 open files hold about 112 sessions" in warnings[0]
