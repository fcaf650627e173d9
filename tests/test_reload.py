"""SIGHUP re-reads the configuration: policy, masquerade address and certificate change for new
sessions without a restart; a broken file is refused and the running configuration stays."""

from __future__ import annotations

import ftplib
import hashlib
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_process import GatewayProcess, start_gateway
from pki import make_pki
from servers import RunningServer

TIMEOUT = 30.0


def hang_up(gateway: GatewayProcess, expect: str) -> None:
    """SIGHUP the gateway and wait (bounded) until its log shows `expect` once more."""
    before = gateway.log().count(expect)
    gateway.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gateway.log().count(expect) <= before:
        assert gateway.proc.poll() is None, gateway.log()[-2000:]
        assert time.monotonic() < deadline, f"no {expect!r} in the log:\n{gateway.log()[-2000:]}"
        time.sleep(0.05)


def forward_login(gateway: GatewayProcess, server: RunningServer) -> str:
    """USER name@host:port through a forward-mode gateway; the reply to USER, or the error."""
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect("127.0.0.1", gateway.port)
    try:
        return ftp.sendcmd(f"USER {server.user}@{server.host}:{server.port}")
    except ftplib.Error as e:
        return str(e)
    finally:
        ftp.close()


@pytest.fixture
def forward(tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path]]:
    """A forward-mode gateway whose configuration file allows loopback upstreams."""
    config = tmp_path / "gateway.toml"
    config.write_text('allow_upstream = ["127.0.0.0/8"]\n')
    gateway = start_gateway(tmp_path, "--config", str(config))
    yield gateway, config
    gateway.stop()


def test_reload_changes_upstream_policy_for_new_sessions(
    forward: tuple[GatewayProcess, Path], server: RunningServer
) -> None:
    gateway, config = forward
    assert forward_login(gateway, server).startswith("331")
    config.write_text("allow_upstream = []\n")
    hang_up(gateway, "Configuration reloaded")
    refused = forward_login(gateway, server)
    assert refused.startswith("530") and "policy" in refused


def test_broken_configuration_on_reload_keeps_the_running_one(
    forward: tuple[GatewayProcess, Path], server: RunningServer
) -> None:
    gateway, config = forward
    config.write_text("allow_upstream = [\n")  # not TOML
    hang_up(gateway, "Reload failed, keeping the running configuration")
    config.write_text('[data]\nupstream_mode = "sideways"\n')  # TOML, wrong value
    hang_up(gateway, "Reload failed, keeping the running configuration")
    assert "upstream_mode" in gateway.log()
    assert forward_login(gateway, server).startswith("331")


def pasv_address(gateway: GatewayProcess, server: RunningServer) -> tuple[int, ...]:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect("127.0.0.1", gateway.port)
    ftp.login(server.user, server.password)
    answer = ftp.sendcmd("PASV")
    ftp.close()
    numbers = answer[answer.index("(") + 1 : answer.index(")")].split(",")
    return tuple(int(n) for n in numbers[:4])


def test_reload_resolves_the_masquerade_name_again(tmp_path: Path, server: RunningServer) -> None:
    config = tmp_path / "gateway.toml"
    upstream = f'upstream = "{server.host}:{server.port}"\n'
    config.write_text(upstream + '[data]\nmasquerade_address = "127.0.0.3"\n')
    gateway = start_gateway(tmp_path, "--config", str(config))
    try:
        assert pasv_address(gateway, server) == (127, 0, 0, 3)
        # A host name is resolved when the configuration is read: at start and on reload.
        config.write_text(upstream + '[data]\nmasquerade_address = "localhost"\n')
        hang_up(gateway, "Configuration reloaded")
        assert pasv_address(gateway, server) == (127, 0, 0, 1)
    finally:
        gateway.stop()


def served_certificate(port: int, ca: Path, server: RunningServer) -> bytes:
    ftp = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(ca)), timeout=TIMEOUT)
    ftp.connect("localhost", port)
    ftp.auth()
    der = ftp.sock.getpeercert(binary_form=True)
    ftp.close()
    assert der is not None
    return der


def test_reload_picks_up_a_renewed_certificate(tmp_path: Path, server: RunningServer) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    certificate, key = tmp_path / "gateway.pem", tmp_path / "gateway.key"

    def install(chain: Path, private_key: Path) -> None:
        certificate.write_bytes(chain.read_bytes())
        key.write_bytes(private_key.read_bytes())

    install(old.server_chain, old.server_key)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'upstream = "{server.host}:{server.port}"\n'
        f'[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\nupstream = "off"\n'
    )
    gateway = start_gateway(tmp_path, "--config", str(config))
    try:
        first = served_certificate(gateway.port, old.ca_cert, server)
        install(new.server_chain, new.server_key)
        hang_up(gateway, "Configuration reloaded")
        second = served_certificate(gateway.port, new.ca_cert, server)
        assert hashlib.sha256(first).hexdigest() == old.server_sha256
        assert hashlib.sha256(second).hexdigest() == new.server_sha256
    finally:
        gateway.stop()
