"""The gateway core end to end: real gateway process, real servers, real clients, loopback only.

The headline: an upstream that refuses active mode (vsftpd with port_enable=NO) still serves
clients in active mode through the gateway, which talks passive upstream.
"""

from __future__ import annotations

import ftplib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import (
    curl,
    file_sha256,
    ftplib_get,
    ftplib_put,
    ftplib_session,
    lftp,
    lftp_sent,
    run,
    sent_commands,
    sha256,
)
from gateway_process import GatewayProcess, free_port, start_gateway, wait_for_port
from servers import RunningServer, start_server


@pytest.fixture(scope="module")
def vsftpd_passive_only(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes
) -> Iterator[RunningServer]:
    server = start_server("vsftpd", tmp_path_factory.mktemp("vsftpd"), active=False)
    (server.root / "big.bin").write_bytes(payload)
    os.chmod(server.root / "big.bin", 0o644)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reverse_gateway(
    tmp_path_factory: pytest.TempPathFactory, vsftpd_passive_only: RunningServer
) -> Iterator[GatewayProcess]:
    server = vsftpd_passive_only
    gateway = start_gateway(
        tmp_path_factory.mktemp("gw"), "--upstream", f"{server.host}:{server.port}"
    )
    yield gateway
    gateway.stop()


def test_upstream_refusing_active_mode_fails_for_a_direct_active_client(
    vsftpd_passive_only: RunningServer,
) -> None:
    server = vsftpd_passive_only
    ftp = ftplib_session(server.host, server.port, server.user, server.password, passive=False)
    with pytest.raises(ftplib.Error):
        ftplib_get(ftp, "big.bin")
    ftp.close()


def test_active_ftplib_client_downloads_and_uploads_through_gateway(
    reverse_gateway: GatewayProcess, vsftpd_passive_only: RunningServer, payload: bytes
) -> None:
    server = vsftpd_passive_only
    ftp = ftplib_session(
        "127.0.0.1", reverse_gateway.port, server.user, server.password, passive=False
    )
    assert sha256(ftplib_get(ftp, "big.bin")) == sha256(payload)
    assert ftplib_put(ftp, "up-ftplib.bin", payload).startswith("226")
    ftp.quit()
    assert file_sha256(server.root / "up-ftplib.bin") == sha256(payload)


def test_active_eprt_client(
    reverse_gateway: GatewayProcess, vsftpd_passive_only: RunningServer, payload: bytes
) -> None:
    """EPRT |1| from an IPv4 client: the gateway connects back to the client's listener."""
    server = vsftpd_passive_only
    ftp = ftplib_session(
        "127.0.0.1", reverse_gateway.port, server.user, server.password, passive=False
    )
    ftp.voidcmd("TYPE I")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        assert ftp.sendeprt("127.0.0.1", listener.getsockname()[1]).startswith("200")
        ftp.putcmd("RETR big.bin")
        assert ftp.getresp().startswith("150")
        conn, _ = listener.accept()
        with conn:
            received = bytearray()
            while chunk := conn.recv(1 << 16):
                received += chunk
    assert ftp.voidresp().startswith("226")
    assert sha256(bytes(received)) == sha256(payload)
    ftp.quit()


def test_active_curl_client_downloads_and_uploads_through_gateway(
    reverse_gateway: GatewayProcess,
    vsftpd_passive_only: RunningServer,
    payload: bytes,
    tmp_path: Path,
) -> None:
    server = vsftpd_passive_only
    base = f"ftp://{server.user}:{server.password}@127.0.0.1:{reverse_gateway.port}"
    out = tmp_path / "down.bin"
    result = curl(f"{base}/big.bin", "-P", "127.0.0.1", "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert {"PORT", "EPRT"} & set(sent_commands(result.stderr))
    assert file_sha256(out) == sha256(payload)
    src = tmp_path / "up.bin"
    src.write_bytes(payload)
    result = curl(f"{base}/up-curl.bin", "-P", "127.0.0.1", "-T", str(src))
    assert result.returncode == 0, result.stderr.decode()
    assert file_sha256(server.root / "up-curl.bin") == sha256(payload)


def test_passive_clients_through_gateway(
    reverse_gateway: GatewayProcess,
    vsftpd_passive_only: RunningServer,
    payload: bytes,
    tmp_path: Path,
) -> None:
    server = vsftpd_passive_only
    port = reverse_gateway.port
    ftp = ftplib_session("127.0.0.1", port, server.user, server.password, passive=True)
    assert sha256(ftplib_get(ftp, "big.bin")) == sha256(payload)
    assert "big.bin" in ftp.nlst()
    ftp.quit()

    out = tmp_path / "curl.bin"
    result = curl(f"ftp://{server.user}:{server.password}@127.0.0.1:{port}/big.bin", "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert "EPSV" in sent_commands(result.stderr)
    assert file_sha256(out) == sha256(payload)

    log = tmp_path / "lftp.log"
    local = tmp_path / "lftp.bin"
    result = lftp(
        f"set ftp:passive-mode on; open -u {server.user},{server.password} 127.0.0.1:{port}; "
        f"get big.bin -o {local}; put {local} -o up-lftp.bin",
        log=log,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert file_sha256(local) == sha256(payload)
    assert file_sha256(server.root / "up-lftp.bin") == sha256(payload)
    assert {"EPSV", "PASV"} & set(lftp_sent(log))


@pytest.fixture(scope="module")
def pyftpd(tmp_path_factory: pytest.TempPathFactory, payload: bytes) -> Iterator[RunningServer]:
    server = start_server("pyftpdlib", tmp_path_factory.mktemp("pyftpd"))
    (server.root / "big.bin").write_bytes(payload)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def forward_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = start_gateway(tmp_path_factory.mktemp("fgw"), "--allow-upstream", "127.0.0.0/8")
    yield gateway
    gateway.stop()


def test_forward_mode_user_at_host_port(
    forward_gateway: GatewayProcess, pyftpd: RunningServer, payload: bytes
) -> None:
    ftp = ftplib.FTP(timeout=60)
    greeting = ftp.connect("127.0.0.1", forward_gateway.port)
    assert greeting.startswith("220")
    ftp.login(f"{pyftpd.user}@127.0.0.1:{pyftpd.port}", pyftpd.password)
    ftp.set_pasv(False)
    assert sha256(ftplib_get(ftp, "big.bin")) == sha256(payload)
    ftp.quit()


def test_forward_mode_with_lftp_proxy_setting(
    forward_gateway: GatewayProcess, pyftpd: RunningServer, payload: bytes, tmp_path: Path
) -> None:
    local = tmp_path / "via-proxy.bin"
    log = tmp_path / "lftp.log"
    result = lftp(
        f"set ftp:proxy ftp://127.0.0.1:{forward_gateway.port}; "
        f"open -u {pyftpd.user},{pyftpd.password} -p {pyftpd.port} 127.0.0.1; "
        f"get big.bin -o {local}",
        log=log,
    )
    assert result.returncode == 0, result.stderr.decode() + log.read_text()
    assert file_sha256(local) == sha256(payload)
    trace = log.read_text()
    assert f"USER {pyftpd.user}@127.0.0.1" in trace


def test_forward_mode_denied_upstream_gets_clear_refusal(
    tmp_path: Path, pyftpd: RunningServer
) -> None:
    gateway = start_gateway(tmp_path)  # default policy: loopback denied
    try:
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", gateway.port)
        with pytest.raises(ftplib.error_perm) as refused:
            ftp.login(f"{pyftpd.user}@127.0.0.1:{pyftpd.port}", pyftpd.password)
        assert str(refused.value).startswith("530")
        assert "denied by policy" in str(refused.value)
        ftp.close()
    finally:
        gateway.stop()
    assert "denied by policy" in gateway.log()


def test_invalid_configuration_stops_startup_with_one_line(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "gateway", "--passive-ports", "5-3"], timeout=30)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [
        "ftp-gateway: configuration error: data.passive_ports: expected 'LOW-HIGH' "
        "with 1024 <= LOW <= HIGH <= 65535, got '5-3'"
    ]
    config = tmp_path / "bad.toml"
    config.write_text('[data]\nupstream_mode = "sideways"\n')
    result = run([sys.executable, "-m", "gateway", "--config", str(config)], timeout=30)
    assert result.returncode != 0
    assert "data.upstream_mode" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_installed_twistd_plugin_answers_220(tmp_path: Path) -> None:
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or shutil.which("twistd")
    assert twistd is not None, "twistd is not installed"
    help_text = run([twistd, "--help"], timeout=30).stdout.decode()
    assert "ftp-gateway" in help_text
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "ftp-gateway", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path,  # not the source tree: the installed package must be what runs
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        ftp = ftplib.FTP(timeout=30)
        assert ftp.connect("127.0.0.1", port).startswith("220")
        ftp.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_demo_mode_serves_sample_files(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--demo")
    try:
        result = curl(f"ftp://127.0.0.1:{gateway.port}/pub/hello.txt", "-P", "127.0.0.1")
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"Hello through the gateway!\n"
    finally:
        gateway.stop()
