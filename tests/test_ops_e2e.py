"""Operations settings with the real gateway process and real servers and clients:
masquerade_except, the transparent-mode start-up check and its refusal log, and the `421`
that names the settings to fix an untrusted upstream certificate in `tls.upstream = "auto"`."""

from __future__ import annotations

import ftplib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gateway_process import PROJECT, GatewayProcess, free_port, start_gateway
from pki import Pki
from servers import RunningServer, start_server

TIMEOUT = 30.0
PAYLOAD = os.urandom(200_000)
SERVED = {"file.bin": PAYLOAD}


def wait_for_log(gateway: GatewayProcess, text: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while text not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return gateway.log()


def pasv_host_and_download(gateway: GatewayProcess, server: RunningServer, source: str) -> str:
    """Log in from `source`, ask PASV, and download following the 227 address literally."""
    ftp = ftplib.FTP(timeout=TIMEOUT, source_address=(source, 0))
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect("127.0.0.1", gateway.port)
    try:
        ftp.login(server.user, server.password)
        ftp.sendcmd("TYPE I")
        reply = ftp.sendcmd("PASV")
        numbers = re.search(r"\((\d+),(\d+),(\d+),(\d+),\d+,\d+\)", reply)
        assert numbers is not None, reply
        host = ".".join(numbers.groups())
        if host == "127.0.0.1":
            data = io.BytesIO()
            ftp.retrbinary("RETR file.bin", data.write)
            assert data.getvalue() == PAYLOAD
        return host
    finally:
        ftp.close()


def test_masquerade_except_gives_listed_clients_the_local_address(
    tmp_path: Path, server: RunningServer
) -> None:
    config = tmp_path / "masquerade.toml"
    config.write_text(
        '[data]\nmasquerade_address = "203.0.113.99"\nmasquerade_except = ["127.0.0.5/32"]\n'
    )
    gateway = start_gateway(
        tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config)
    )
    try:
        # Inside the excepted network: the local address, and the transfer works through it.
        assert pasv_host_and_download(gateway, server, "127.0.0.5") == "127.0.0.1"
        # Anyone else: the masquerade address.
        assert pasv_host_and_download(gateway, server, "127.0.0.6") == "203.0.113.99"
    finally:
        gateway.stop()


def test_transparent_without_passive_ports_refuses_to_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--transparent", "--listen", f"tcp:{free_port()}"],
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ftp-gateway: configuration error: transparent: needs data.passive_ports, a range the "
        "edge redirects to the gateway as it does the control port"
    ]


def test_unredirected_connection_in_transparent_mode_is_logged_at_warn(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--transparent", "--passive-ports", "30000-30099")
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        with pytest.raises(ftplib.error_temp) as refused:
            ftp.connect("127.0.0.1", gateway.port)
        assert str(refused.value).startswith("421")
        log = wait_for_log(gateway, "not redirected")
    finally:
        gateway.stop()
    lines = [line for line in log.splitlines() if "not redirected" in line]
    # One per connection: the start-up probe's and the client's.
    assert len(lines) == 2, log
    # At warn, with the session's id (gateway.logs).
    assert all(re.search(r"#warn\] \[[0-9a-f]{8}\] Refused 127\.0\.0\.1:", line) for line in lines)


def test_auto_tls_meeting_an_untrusted_certificate_names_the_fix(tmp_path: Path, pki: Pki) -> None:
    server = start_server(
        "vsftpd",
        tmp_path / "vsftpd",
        tls="required",
        cert=pki.untrusted_cert,
        key=pki.untrusted_key,
    )
    gateway = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}")
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        # With tls.upstream = "auto" the greeting comes at once; USER waits for TLS, which
        # fails: its answer is the 421.
        assert ftp.connect("127.0.0.1", gateway.port).startswith("220")
        with pytest.raises(ftplib.error_temp) as refused:
            ftp.login(server.user, server.password)
        text = str(refused.value)
        log = wait_for_log(gateway, "tls.upstream_ca_file")
    finally:
        gateway.stop()
        server.stop()
    assert text.startswith("421")
    for setting in ("tls.upstream_ca_file", "tls.upstream_fingerprint", 'tls.upstream = "off"'):
        assert setting in text
        assert setting in log
