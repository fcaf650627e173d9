"""Upstream certificates are verified on data connections exactly as on the control connection,
in every trust mode: a pinned fingerprint (`tls.upstream_fingerprint`), `tls.upstream_ca_file`
with the name, and the system store with the name. A scripted upstream whose control connection
presents the genuine certificate and whose data port presents another one (an impostor holding
the data port) must never get its bytes to the client, nor a 226."""

from __future__ import annotations

import ftplib
import os
import time
from pathlib import Path

import pytest
from gateway_process import GatewayProcess, start_gateway
from impostor_upstream import ImpostorUpstream
from pki import Pki

PAYLOAD = os.urandom(256 * 1024)


def _settings(trust: str, pki: Pki) -> str:
    if trust == "pin":
        return f'upstream_fingerprint = "{pki.server_sha256}"\n'
    if trust == "ca_file":
        return f'upstream_ca_file = "{pki.ca_cert}"\nupstream_name = "localhost"\n'
    return 'upstream_name = "localhost"\n'  # the system store


# (trust mode, the data port's certificate, what the gateway's log must say, upstream data mode)
IMPOSTORS = [
    # Same names, same CA, another key: only the pin tells it from the genuine one.
    ("pin", "twin", "is not the pinned one", "passive"),
    ("ca_file", "untrusted", "signed by an unknown CA", "passive"),
    ("ca_file", "wrong_name", "does not match the name localhost", "passive"),
    ("system", "untrusted", "signed by an unknown CA", "passive"),
    ("system", "wrong_name", "does not match the name localhost", "passive"),
    # The upstream connects to the gateway (PORT); the gateway is still the TLS client.
    ("pin", "twin", "is not the pinned one", "active"),
    ("ca_file", "wrong_name", "does not match the name localhost", "active"),
]


def _retrieve(port: int) -> tuple[str, bytes]:
    """RETR through the gateway as a plain client: the final reply and the bytes received.
    The gateway may cut the client's data connection (a reset) when the upstream's fails."""
    received = bytearray()
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", port)
    ftp.login("user", "secret")
    ftp.voidcmd("TYPE I")
    try:
        conn = ftp.transfercmd("RETR file.bin")
    except ftplib.error_temp as e:
        ftp.close()
        return str(e), b""
    with conn:
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except OSError:
            pass
    try:
        reply = ftp.getresp()
    except ftplib.error_temp as e:
        reply = str(e)
    ftp.close()
    return reply, bytes(received)


def _gateway(
    tmp_path: Path,
    pki: Pki,
    trust: str,
    upstream_port: int,
    monkeypatch: pytest.MonkeyPatch,
    upstream_mode: str = "passive",
) -> GatewayProcess:
    if trust == "system":
        # OpenSSL's default trust store, as the system's: just the test CA.
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[data]\nupstream_mode = "{upstream_mode}"\n'
        '[tls]\nupstream = "required"\n' + _settings(trust, pki)
    )
    return start_gateway(
        tmp_path, "--upstream", f"127.0.0.1:{upstream_port}", "--config", str(config)
    )


@pytest.mark.parametrize("upstream_mode", ["passive", "active"])
@pytest.mark.parametrize("trust", ["pin", "ca_file", "system"])
def test_genuine_data_certificate_is_accepted(
    tmp_path: Path, pki: Pki, trust: str, upstream_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness itself: the same certificate on both connections passes in every mode."""
    genuine = (pki.server_cert, pki.server_key)
    with ImpostorUpstream(genuine, genuine, payload=PAYLOAD) as upstream:
        gw = _gateway(tmp_path, pki, trust, upstream.port, monkeypatch, upstream_mode)
        try:
            reply, received = _retrieve(gw.port)
        finally:
            gw.stop()
    assert reply.startswith("226"), gw.log()[-3000:]
    assert received == PAYLOAD
    assert ("command PORT" in upstream.events) is (upstream_mode == "active")


@pytest.mark.parametrize(("trust", "impostor", "logged", "upstream_mode"), IMPOSTORS)
def test_impostor_on_the_upstream_data_port_is_refused(
    tmp_path: Path,
    pki: Pki,
    trust: str,
    impostor: str,
    logged: str,
    upstream_mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    genuine = (pki.server_cert, pki.server_key)
    fake = (getattr(pki, f"{impostor}_cert"), getattr(pki, f"{impostor}_key"))
    with ImpostorUpstream(genuine, fake, payload=PAYLOAD) as upstream:
        gw = _gateway(tmp_path, pki, trust, upstream.port, monkeypatch, upstream_mode)
        try:
            reply, received = _retrieve(gw.port)
            deadline = time.monotonic() + 10
            while logged not in gw.log() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            gw.stop()
    assert reply[:3] in ("425", "426"), reply
    assert received == b""
    assert "command RETR" in upstream.events  # the control connection itself was trusted
    assert ("command PORT" in upstream.events) is (upstream_mode == "active")
    assert not any(event.startswith("sent") for event in upstream.events), upstream.events
    log = gw.log()
    assert "upstream data connection failed" in log and logged in log, log[-3000:]
