"""FTPS on both sides with real parts: vsftpd and proftpd requiring TLS session reuse,
ftplib.FTP_TLS, curl --ssl-reqd and lftp as clients, and certificates that must be refused."""

from __future__ import annotations

import ftplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import (
    curl,
    file_sha256,
    ftplib_get,
    ftplib_put,
    lftp,
    lftp_sent,
    sent_commands,
    sha256,
)
from gateway_process import GatewayProcess, free_port, start_gateway
from pki import Pki
from servers import RunningServer, start_server

MIB = 1024 * 1024


def _serve(server: RunningServer, payload: bytes) -> RunningServer:
    (server.root / "file.bin").write_bytes(payload)
    (server.root / "file.bin").chmod(0o644)
    return server


@pytest.fixture(scope="module")
def vsftpd_tls(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, payload: bytes
) -> Iterator[RunningServer]:
    server = start_server(
        "vsftpd",
        tmp_path_factory.mktemp("vsftpd-tls"),
        tls="required",
        cert=pki.server_cert,
        key=pki.server_key,
        require_ssl_reuse=True,
        # vsftpd 3.0.3 fails about half of TLS 1.3 uploads even from curl directly
        # ("426 Failure reading network stream"); proftpd covers TLS 1.3 below.
        tls_max_version="1.2",
    )
    yield _serve(server, payload)
    server.stop()


def gateway_config(tmp: Path, pki: Pki, **tls: str) -> Path:
    """A TOML file with the gateway's own certificate and the test CA for upstreams."""
    settings = {
        "certificate": str(pki.server_chain),
        "private_key": str(pki.server_key),
        "upstream_ca_file": str(pki.ca_cert),
        "upstream_name": "localhost",
        **tls,
    }
    path = tmp / f"tls-{len(list(tmp.glob('tls-*.toml')))}.toml"
    path.write_text("[tls]\n" + "".join(f'{key} = "{value}"\n' for key, value in settings.items()))
    return path


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, vsftpd_tls: RunningServer
) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("gw-tls")
    config = gateway_config(tmp, pki, upstream="required")
    upstream = f"127.0.0.1:{vsftpd_tls.port}"
    with start_gateway(tmp, "--upstream", upstream, "--config", str(config)) as gw:
        yield gw


def ftps(port: int, pki: Pki, server: RunningServer, *, passive: bool = True) -> ftplib.FTP_TLS:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    ftp = ftplib.FTP_TLS(context=context, timeout=60)
    ftp.connect("localhost", port)
    ftp.login(server.user, server.password)  # AUTH TLS first, then USER/PASS
    ftp.prot_p()
    ftp.set_pasv(passive)
    return ftp


def test_ftplib_without_session_reuse_fails_directly(vsftpd_tls: RunningServer, pki: Pki) -> None:
    """Python's FTP_TLS does not resume the TLS session on data connections: vsftpd with
    require_ssl_reuse refuses it when it connects directly."""
    ftp = ftps(vsftpd_tls.port, pki, vsftpd_tls)
    with pytest.raises((ftplib.Error, ssl.SSLError, OSError)):
        ftplib_get(ftp, "file.bin")
    ftp.close()


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_ftplib_tls_through_gateway_reaches_server_requiring_reuse(
    gateway: GatewayProcess, vsftpd_tls: RunningServer, pki: Pki, payload: bytes, passive: bool
) -> None:
    ftp = ftps(gateway.port, pki, vsftpd_tls, passive=passive)
    assert sha256(ftplib_get(ftp, "file.bin")) == sha256(payload)
    name = f"up-ftplib-{passive}.bin"
    assert ftplib_put(ftp, name, payload).startswith("226")
    ftp.quit()
    assert file_sha256(vsftpd_tls.root / name) == sha256(payload)


def test_curl_ssl_reqd_passive(
    gateway: GatewayProcess, vsftpd_tls: RunningServer, pki: Pki, payload: bytes, tmp_path: Path
) -> None:
    base = f"ftp://{vsftpd_tls.user}:{vsftpd_tls.password}@localhost:{gateway.port}"
    out = tmp_path / "curl.bin"
    result = curl(f"{base}/file.bin", "--ssl-reqd", "--cacert", str(pki.ca_cert), "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert "AUTH" in sent_commands(result.stderr) and "PROT" in sent_commands(result.stderr)
    assert file_sha256(out) == sha256(payload)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    result = curl(f"{base}/up-curl.bin", "--ssl-reqd", "--cacert", str(pki.ca_cert), "-T", str(src))
    assert result.returncode == 0, result.stderr.decode()
    assert file_sha256(vsftpd_tls.root / "up-curl.bin") == sha256(payload)


def _lftp_tls(
    gateway: GatewayProcess, server: RunningServer, pki: Pki, command: str, log: Path
) -> subprocess.CompletedProcess[bytes]:
    return lftp(
        "set ftp:ssl-allow yes; set ftp:ssl-force yes; set ftp:ssl-protect-data yes; "
        f"set ssl:ca-file {pki.ca_cert}; "
        f"open -u {server.user},{server.password} localhost:{gateway.port}; {command}",
        log=log,
    )


def test_lftp_ssl_force_and_protect_data_download(
    gateway: GatewayProcess, vsftpd_tls: RunningServer, pki: Pki, payload: bytes, tmp_path: Path
) -> None:
    local = tmp_path / "lftp.bin"
    log = tmp_path / "lftp.log"
    result = _lftp_tls(gateway, vsftpd_tls, pki, f"get file.bin -o {local}", log)
    assert result.returncode == 0, result.stderr.decode() + log.read_text()[-3000:]
    sent = lftp_sent(log)
    assert "AUTH" in sent and "PROT" in sent
    assert file_sha256(local) == sha256(payload)


def test_lftp_ssl_force_and_protect_data_upload(
    gateway: GatewayProcess, vsftpd_tls: RunningServer, pki: Pki, payload: bytes, tmp_path: Path
) -> None:
    """lftp (GnuTLS) never reads an upload's data connection: it writes the file, sends
    close_notify and closes, often before a TLS 1.3 session ticket from the gateway could
    arrive. The gateway must not send one then, or the client's kernel resets the connection."""
    local = tmp_path / "src.bin"
    local.write_bytes(payload)
    log = tmp_path / "lftp.log"
    result = _lftp_tls(gateway, vsftpd_tls, pki, f"put {local} -o up-lftp.bin", log)
    assert result.returncode == 0, result.stderr.decode() + log.read_text()[-3000:]
    assert file_sha256(vsftpd_tls.root / "up-lftp.bin") == sha256(payload)


def test_tls13_upload_data_connection_is_silent_until_close_notify(
    gateway: GatewayProcess, vsftpd_tls: RunningServer, pki: Pki, payload: bytes
) -> None:
    """A client that never reads an upload's data connection (RFC 4217 PROT P) and closes
    its socket right after close_notify: anything the gateway had sent by then would be unread
    at close, the client's kernel would answer with a reset and the upload's tail would be
    lost. Here the client waits after the TLS 1.3 handshake and checks that nothing came."""
    ftp = ftps(gateway.port, pki, vsftpd_tls)
    host, port = ftp.makepasv()
    raw = socket.create_connection((host, port), timeout=30)
    assert ftp.sendcmd("STOR up-silent.bin").startswith("150")
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(50):  # a TLS 1.3 handshake takes one or two round trips
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
    else:
        pytest.fail("the TLS handshake did not complete")
    raw.sendall(outgoing.read())  # the client's Finished
    time.sleep(0.5)
    raw.setblocking(False)
    with pytest.raises(BlockingIOError):
        raw.recv(1, socket.MSG_PEEK)  # no session ticket, nothing at all
    raw.setblocking(True)
    view = memoryview(payload)
    while view:
        view = view[tls.write(view[: 64 * 1024]) :]
        raw.sendall(outgoing.read())
    with pytest.raises(ssl.SSLWantReadError):
        tls.unwrap()  # close_notify goes out; the client does not wait for the gateway's
    raw.sendall(outgoing.read())
    raw.close()
    assert ftp.voidresp().startswith("226")
    ftp.quit()
    assert file_sha256(vsftpd_tls.root / "up-silent.bin") == sha256(payload)


def test_plain_client_to_ftps_upstream(
    gateway: GatewayProcess, vsftpd_tls: RunningServer, payload: bytes
) -> None:
    """Legacy clients get protected traffic on the outside: the gateway speaks TLS upstream."""
    ftp = ftplib.FTP(timeout=60)
    ftp.connect("127.0.0.1", gateway.port)
    ftp.login(vsftpd_tls.user, vsftpd_tls.password)
    assert sha256(ftplib_get(ftp, "file.bin")) == sha256(payload)
    ftp.set_pasv(False)
    assert sha256(ftplib_get(ftp, "file.bin")) == sha256(payload)
    ftp.quit()


def test_ftps_client_to_plain_upstream(tmp_path: Path, pki: Pki, payload: bytes) -> None:
    server = _serve(start_server("pyftpdlib", tmp_path / "plain"), payload)
    config = gateway_config(tmp_path, pki, upstream="auto")
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    try:
        for passive in (True, False):
            ftp = ftps(gw.port, pki, server, passive=passive)
            assert sha256(ftplib_get(ftp, "file.bin")) == sha256(payload)
            ftp.quit()
    finally:
        gw.stop()
        server.stop()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_proftpd_requiring_reuse(tmp_path: Path, pki: Pki, payload: bytes, version: str) -> None:
    server = _serve(
        start_server(
            "proftpd",
            tmp_path / "proftpd",
            tls="required",
            cert=pki.server_cert,
            key=pki.server_key,
            require_ssl_reuse=True,
            tls_max_version=version,
        ),
        payload,
    )
    config = gateway_config(tmp_path, pki, upstream="required")
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    try:
        ftp = ftps(gw.port, pki, server)
        assert sha256(ftplib_get(ftp, "file.bin")) == sha256(payload)
        assert ftplib_put(ftp, "up.bin", payload).startswith("226")
        ftp.quit()
        assert file_sha256(server.root / "up.bin") == sha256(payload)
    finally:
        gw.stop()
        server.stop()


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        ("expired", "expired"),
        ("wrong_name", "does not match"),
        ("untrusted", "unknown CA"),
    ],
)
def test_bad_upstream_certificates_are_refused_with_a_reason(
    tmp_path: Path, pki: Pki, cert: str, reason: str
) -> None:
    server = start_server(
        "vsftpd",
        tmp_path / "bad",
        tls="required",
        cert=getattr(pki, f"{cert}_cert"),
        key=getattr(pki, f"{cert}_key"),
    )
    config = gateway_config(tmp_path, pki, upstream="required")
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    try:
        ftp = ftplib.FTP(timeout=30)
        with pytest.raises(ftplib.error_temp) as refused:
            ftp.connect("127.0.0.1", gw.port)
        assert str(refused.value).startswith("421")
        assert reason in str(refused.value)
    finally:
        gw.stop()
        server.stop()
    # Nothing but AUTH went out: the server never saw a USER.
    assert "USER" not in (
        server.log_path.read_text() if server.log_path and server.log_path.exists() else ""
    )


def test_pinned_fingerprint_replaces_ca_verification(
    tmp_path: Path, pki: Pki, vsftpd_tls: RunningServer, payload: bytes
) -> None:
    config = tmp_path / "pin.toml"
    config.write_text(
        f'[tls]\nupstream = "required"\nupstream_fingerprint = "{pki.server_sha256}"\n'
    )
    gw = start_gateway(
        tmp_path, "--upstream", f"127.0.0.1:{vsftpd_tls.port}", "--config", str(config)
    )
    try:
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", gw.port)
        ftp.login(vsftpd_tls.user, vsftpd_tls.password)
        assert sha256(ftplib_get(ftp, "file.bin")) == sha256(payload)
        ftp.quit()
    finally:
        gw.stop()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f'[tls]\nupstream = "required"\nupstream_fingerprint = "{"0" * 64}"\n')
    gw = start_gateway(
        tmp_path, "--upstream", f"127.0.0.1:{vsftpd_tls.port}", "--config", str(wrong)
    )
    try:
        with pytest.raises(ftplib.error_temp) as refused:
            ftplib.FTP(timeout=30).connect("127.0.0.1", gw.port)
        assert "fingerprint" in str(refused.value)
    finally:
        gw.stop()


def test_upstream_without_auth_when_tls_required(tmp_path: Path, pki: Pki) -> None:
    server = start_server("pyftpdlib", tmp_path / "plain")
    config = gateway_config(tmp_path, pki, upstream="required")
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    try:
        with pytest.raises(ftplib.error_temp) as refused:
            ftplib.FTP(timeout=30).connect("127.0.0.1", gw.port)
        assert str(refused.value).startswith("421") and "refused TLS" in str(refused.value)
    finally:
        gw.stop()
        server.stop()


def test_client_tls_required_refuses_user_before_auth(tmp_path: Path, pki: Pki) -> None:
    server = start_server("pyftpdlib", tmp_path / "plain")
    config = gateway_config(tmp_path, pki, client="required", upstream="off")
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    try:
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", gw.port)
        with pytest.raises(ftplib.error_perm) as refused:
            ftp.login(server.user, server.password)
        assert str(refused.value).startswith("530") and "TLS is required" in str(refused.value)
        ftp.close()
        tls = ftps(gw.port, pki, server)
        with pytest.raises(ftplib.error_perm) as clear:
            tls.prot_c()
            tls.nlst()
        assert str(clear.value).startswith("521")
        tls.close()
    finally:
        gw.stop()
        server.stop()


def test_client_data_session_reuse_can_be_required(
    tmp_path: Path, pki: Pki, payload: bytes
) -> None:
    server = _serve(start_server("pyftpdlib", tmp_path / "plain"), payload)
    config = gateway_config(tmp_path, pki, upstream="off")
    config.write_text(config.read_text() + "require_data_session_reuse = true\n")
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    try:
        ftp = ftps(gw.port, pki, server)
        with pytest.raises((ftplib.Error, ssl.SSLError, OSError)):
            ftplib_get(ftp, "file.bin")  # FTP_TLS starts a fresh session: refused
        ftp.close()
        result = curl(
            f"ftp://{server.user}:{server.password}@localhost:{gw.port}/file.bin",
            "--ssl-reqd",
            "--cacert",
            str(pki.ca_cert),
        )
        assert result.returncode == 0, result.stderr.decode()  # curl resumes: accepted
        assert sha256(result.stdout) == sha256(payload)
    finally:
        gw.stop()
        server.stop()
    assert "did not resume the TLS session" in gw.log()


def test_commands_sent_in_clear_after_auth_are_discarded(gateway: GatewayProcess, pki: Pki) -> None:
    """STARTTLS injection: bytes after AUTH TLS in the same packet must not be acted on."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"AUTH TLS\r\nUSER injected\r\n")
        assert f.readline().startswith(b"234")
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"NOOP\r\n")
            tf = tls.makefile("rb")
            # vsftpd answers NOOP before login with 530; a 331 would be the injected USER's.
            assert tf.readline()[:3] in (b"200", b"530")
            tls.sendall(b"USER someone\r\n")
            assert tf.readline().startswith(b"331")


def test_implicit_ftps_listener(tmp_path: Path, pki: Pki, payload: bytes) -> None:
    """An ssl: endpoint is implicit FTPS: TLS from the first byte, then PBSZ/PROT as usual."""
    server = _serve(start_server("pyftpdlib", tmp_path / "plain"), payload)
    config = gateway_config(tmp_path, pki, upstream="off")
    port = free_port()
    listen = (
        f"ssl:{port}:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_chain}"
    )
    gw = start_gateway(
        tmp_path,
        "--upstream",
        f"127.0.0.1:{server.port}",
        "--config",
        str(config),
        "--listen",
        listen,
    )
    try:
        result = curl(
            f"ftps://{server.user}:{server.password}@localhost:{port}/file.bin",
            "--cacert",
            str(pki.ca_cert),
        )
        assert result.returncode == 0, result.stderr.decode()
        assert sha256(result.stdout) == sha256(payload)
        assert "PROT" in sent_commands(result.stderr)
        assert "AUTH" not in sent_commands(result.stderr)  # implicit: no AUTH needed
    finally:
        gw.stop()
        server.stop()


# --- FTPS on both sides, every server ---------------------------------------------------------

TLS_CLIENTS = ("ftplib-passive", "ftplib-active", "curl", "lftp")


@pytest.fixture(scope="module", params=["pyftpdlib", "vsftpd", "pure-ftpd", "proftpd"])
def ftps_site(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    payload: bytes,
) -> Iterator[tuple[RunningServer, GatewayProcess]]:
    """A server that refuses clear text, and a gateway in front of it that requires TLS of the
    upstream and offers it to clients."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"ftps-{kind}")
    # vsftpd's own TLS 1.3 uploads are unreliable (see vsftpd_tls above).
    cap = {"tls_max_version": "1.2"} if kind == "vsftpd" else {}
    server = start_server(
        kind, tmp / "server", tls="required", cert=pki.server_cert, key=pki.server_key, **cap
    )
    _serve(server, payload)
    config = gateway_config(tmp, pki, upstream="required")
    gw = start_gateway(tmp, "--upstream", f"127.0.0.1:{server.port}", "--config", str(config))
    yield server, gw
    gw.stop()
    server.stop()


@pytest.mark.parametrize("operation", ["RETR", "STOR"])
@pytest.mark.parametrize("client", TLS_CLIENTS)
def test_ftps_matrix(
    ftps_site: tuple[RunningServer, GatewayProcess],
    pki: Pki,
    payload: bytes,
    tmp_path: Path,
    client: str,
    operation: str,
) -> None:
    """TLS on the control and data connections on both sides (PROT P), every client and server;
    the server refuses clear text, so the upstream leg is protected too."""
    server, gw = ftps_site
    name = f"up-{client}-{tmp_path.name}.bin"
    local = tmp_path / "local.bin"
    if operation == "STOR":
        local.write_bytes(payload)
    if client.startswith("ftplib"):
        ftp = ftps(gw.port, pki, server, passive=client == "ftplib-passive")
        if operation == "RETR":
            local.write_bytes(ftplib_get(ftp, "file.bin"))
        else:
            assert ftplib_put(ftp, name, payload).startswith("226")
        ftp.quit()
    elif client == "curl":
        url = f"ftp://{server.user}:{server.password}@localhost:{gw.port}/"
        tls = ("--ssl-reqd", "--cacert", str(pki.ca_cert))
        if operation == "RETR":
            result = curl(url + "file.bin", *tls, "-o", str(local))
        else:
            result = curl(url + name, *tls, "-T", str(local))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        sent = sent_commands(result.stderr)
        assert "AUTH" in sent and "PROT" in sent
    else:
        log = tmp_path / "lftp.log"
        command = f"get file.bin -o {local}" if operation == "RETR" else f"put {local} -o {name}"
        result = _lftp_tls(gw, server, pki, command, log)
        assert result.returncode == 0, result.stderr.decode() + log.read_text()[-3000:]
        sent = lftp_sent(log)
        assert "AUTH" in sent and "PROT" in sent
    if operation == "RETR":
        assert file_sha256(local) == sha256(payload)
    else:
        assert file_sha256(server.root / name) == sha256(payload)
