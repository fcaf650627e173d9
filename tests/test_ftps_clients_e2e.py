"""FTPS clients that close a protected download without TLS close_notify (wget, whose GnuTLS
bye is disabled, and netkit ftp-ssl) against vsftpd requiring TLS, through the gateway; and
the cases where a missing close_notify or a reset must still fail the transfer."""

from __future__ import annotations

import ftplib
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import file_sha256, reset, run, sha256
from gateway_process import GatewayProcess, start_gateway
from pki import Pki
from servers import RunningServer, start_server
from test_tls_e2e import ftps, gateway_config

NAMES = ("file.bin", "other.txt")


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, payload: bytes
) -> Iterator[tuple[RunningServer, GatewayProcess]]:
    """vsftpd refusing clear text, and a gateway in front of it offering FTPS to clients."""
    tmp = tmp_path_factory.mktemp("ftps-clients")
    # vsftpd 3.0.3's own TLS 1.3 transfers are unreliable (see tests/test_tls_e2e.py).
    server = start_server(
        "vsftpd",
        tmp / "server",
        tls="required",
        cert=pki.server_cert,
        key=pki.server_key,
        require_ssl_reuse=True,
        tls_max_version="1.2",
    )
    (server.root / "file.bin").write_bytes(payload)
    (server.root / "other.txt").write_bytes(b"second entry\n")
    for name in NAMES:
        (server.root / name).chmod(0o644)
    config = gateway_config(tmp, pki, upstream="required")
    gw = start_gateway(tmp, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    yield server, gw
    gw.stop()
    server.stop()


def _wget(url: str, pki: Pki, out: Path, *, passive: bool) -> subprocess.CompletedProcess[bytes]:
    """wget with its FTP dialogue (`-d` prints the server's replies); one try only, so a 426
    fails the run instead of being retried."""
    mode = [] if passive else ["--no-passive-ftp"]
    return run(
        ["wget", "-d", "--tries=1", *mode, f"--ca-certificate={pki.ca_cert}", "-O", str(out), url]
    )


def _replies(output: bytes) -> list[str]:
    """The final reply codes of transfers (226/426/425/451) in a client's trace."""
    return re.findall(r"^(226|4[25][0-9]) ", output.decode(errors="replace"), re.M)


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_wget_download_and_listing_get_226(
    site: tuple[RunningServer, GatewayProcess],
    pki: Pki,
    payload: bytes,
    tmp_path: Path,
    passive: bool,
) -> None:
    server, gw = site
    base = f"ftps://{server.user}:{server.password}@localhost:{gw.port}/"
    got = tmp_path / "file.bin"
    result = _wget(base + "file.bin", pki, got, passive=passive)
    trace = result.stdout + result.stderr
    assert result.returncode == 0, trace.decode(errors="replace")[-3000:]
    assert _replies(trace) == ["226"]
    assert file_sha256(got) == sha256(payload)
    listing = tmp_path / "listing.html"
    result = _wget(base, pki, listing, passive=passive)
    trace = result.stdout + result.stderr
    assert result.returncode == 0, trace.decode(errors="replace")[-3000:]
    assert _replies(trace) == ["226"]
    assert all(name in listing.read_text() for name in NAMES)
    assert "without TLS close_notify" in gw.log()


def _ftp_ssl(
    server: RunningServer, gw: GatewayProcess, pki: Pki, script: str, *, passive: bool
) -> subprocess.CompletedProcess[bytes]:
    """netkit ftp-ssl driven through stdin: `-n` (no auto-login), `-i` (no prompts), `-z secure`
    (AUTH TLS or nothing; it then protects data connections with PROT P), `-z verify=1` with the
    test CA; `-p` for passive mode, active otherwise."""
    argv = [
        "ftp-ssl",
        "-n",
        "-i",
        "-v",
        "-z",
        "secure",
        "-z",
        "verify=1",
        "-z",
        f"cacert={pki.ca_cert}",
    ]
    if passive:
        argv.append("-p")
    commands = f"user {server.user} {server.password}\nbinary\n{script}bye\n"
    return run([*argv, "localhost", str(gw.port)], input=commands.encode())


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_ftp_ssl_download_and_listings_get_226(
    site: tuple[RunningServer, GatewayProcess],
    pki: Pki,
    payload: bytes,
    tmp_path: Path,
    passive: bool,
) -> None:
    server, gw = site
    got, ls, nlst = tmp_path / "file.bin", tmp_path / "ls.txt", tmp_path / "nlst.txt"
    script = f"get file.bin {got}\nls . {ls}\nnlist . {nlst}\n"
    result = _ftp_ssl(server, gw, pki, script, passive=passive)
    trace = result.stdout + result.stderr
    assert result.returncode == 0, trace.decode(errors="replace")
    assert b"234 " in trace and b"200 Protection level set to P" in trace
    assert _replies(trace) == ["226", "226", "226"], trace.decode(errors="replace")
    assert file_sha256(got) == sha256(payload)
    assert all(name in ls.read_text() for name in NAMES)
    assert sorted(nlst.read_text().split()) == sorted(NAMES)


def _protected_data_connection(ftp: ftplib.FTP_TLS, command: str, pki: Pki) -> ssl.SSLSocket:
    """A PROT P data connection for `command`, opened passively and after its 150."""
    host, port = ftp.makepasv()
    raw = socket.create_connection((host, port), timeout=30)
    assert ftp.sendcmd(command).startswith("150")
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    return context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("ending", ["fin", "reset"])
def test_upload_without_close_notify_gets_426(
    site: tuple[RunningServer, GatewayProcess], pki: Pki, payload: bytes, ending: str
) -> None:
    """The upload's sender is the client: without its close_notify the gateway cannot tell a
    complete file from a truncated one, so a client that drops TLS (FIN or reset) after
    sending every byte gets 426, never 226, even though the upstream confirms."""
    server, gw = site
    ftp = ftps(gw.port, pki, server)
    data = _protected_data_connection(ftp, f"STOR up-{ending}.bin", pki)
    data.sendall(payload)
    raw = socket.socket(fileno=data.detach())  # drop TLS: no close_notify
    if ending == "reset":
        reset(raw)
    else:
        raw.close()
    with pytest.raises(ftplib.error_temp) as failed:
        ftp.voidresp()
    assert str(failed.value).startswith("426"), failed.value
    ftp.quit()


def test_download_received_then_reset_gets_426(
    site: tuple[RunningServer, GatewayProcess], pki: Pki, payload: bytes
) -> None:
    """A client that resets its download connection, even after reading every byte and the
    gateway's close_notify, did not end it normally: the strict rule holds, 426."""
    server, gw = site
    ftp = ftps(gw.port, pki, server)
    data = _protected_data_connection(ftp, "RETR file.bin", pki)
    received = bytearray()
    while chunk := data.recv(65536):  # ends at the gateway's close_notify
        received += chunk
    assert sha256(bytes(received)) == sha256(payload)
    reset(socket.socket(fileno=data.detach()))
    with pytest.raises(ftplib.error_temp) as failed:
        ftp.voidresp()
    assert str(failed.value).startswith("426"), failed.value
    ftp.quit()
