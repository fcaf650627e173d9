"""Smoke tests of tests/servers.py: each real server starts, logs in and moves bytes as configured.

The gateway's integration tests trust these servers to behave as their options say (active mode
refused, TLS required, session reuse enforced), so each option is checked here against plain
clients (ftplib, curl) before any test puts the gateway in between.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import servers
from pki import Pki
from servers import RunningServer, start_server

HOSTS = ("127.0.0.1", "::1")
TIMEOUT = 10.0
PAYLOAD = os.urandom(1 << 20)


def _login(server: RunningServer, *, passive: bool = True) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(server.host, server.port)
    ftp.login(server.user, server.password)
    ftp.set_pasv(passive)
    return ftp


def _login_tls(server: RunningServer, pki: Pki) -> ftplib.FTP_TLS:
    context = ssl.create_default_context(cafile=pki.ca_cert)
    ftp = ftplib.FTP_TLS(context=context, timeout=TIMEOUT)
    ftp.connect(server.host, server.port)
    ftp.login(server.user, server.password)
    ftp.prot_p()
    return ftp


def _assert_cleartext_login_refused(server: RunningServer) -> None:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    try:
        ftp.connect(server.host, server.port)
        # pure-ftpd says 421 (error_temp), the others 530 or 550 (error_perm).
        with pytest.raises((ftplib.error_perm, ftplib.error_temp)):
            ftp.login(server.user, server.password)
    finally:
        # Not quit(): after a refusal the server may have hung up or left a reply unread.
        ftp.close()


def _get(ftp: ftplib.FTP, path: str, rest: int | None = None) -> bytes:
    buffer = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", buffer.write, rest=rest)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _url(server: RunningServer, path: str, scheme: str = "ftp") -> str:
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{scheme}://{server.user}:{server.password}@{host}:{server.port}/{path}"


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), *args],
        capture_output=True,
        timeout=TIMEOUT + 5,
        check=False,
    )


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("kind", servers.KINDS)
def test_upload_and_download(kind: str, host: str, tmp_path: Path) -> None:
    with start_server(kind, tmp_path, host=host) as server, _login(server) as ftp:
        ftp.storbinary("STOR upload.bin", io.BytesIO(PAYLOAD))
        downloaded = _get(ftp, "upload.bin")
        assert _sha256(downloaded) == _sha256(PAYLOAD), server.log()
        assert _sha256((server.root / "upload.bin").read_bytes()) == _sha256(PAYLOAD)


@pytest.mark.parametrize("kind", servers.KINDS)
def test_commands_the_gateway_relays(kind: str, tmp_path: Path) -> None:
    """APPE, STOU, REST, LIST/NLST/MLSD and an active-mode RETR all work on every server."""
    with start_server(kind, tmp_path) as server, _login(server) as ftp:
        ftp.mkd("dir")
        ftp.storbinary("STOR dir/a.txt", io.BytesIO(b"hello "))
        ftp.storbinary("APPE dir/a.txt", io.BytesIO(b"world"))
        assert _get(ftp, "dir/a.txt") == b"hello world"
        assert _get(ftp, "dir/a.txt", rest=6) == b"world"
        ftp.storbinary("STOU", io.BytesIO(b"unique"))
        on_disk = {path.read_bytes() for path in server.root.iterdir() if path.is_file()}
        assert b"unique" in on_disk, server.log()
        listing: list[str] = []
        ftp.retrlines("LIST dir", listing.append)
        assert any("a.txt" in line for line in listing), listing
        # pure-ftpd lists "dir/." and "dir/.." too.
        assert "a.txt" in {Path(name).name for name in ftp.nlst("dir")}
        if kind != "vsftpd":  # vsftpd 3.0.3 has no MLSD
            assert "a.txt" in dict(ftp.mlsd("dir"))
        ftp.set_pasv(False)
        assert _get(ftp, "dir/a.txt") == b"hello world"


@pytest.mark.parametrize(
    ("kind", "refused"),
    [(kind, "active") for kind in ("pyftpdlib", "vsftpd", "proftpd")]
    + [(kind, "passive") for kind in servers.KINDS],
)
def test_data_mode_refused(kind: str, refused: str, tmp_path: Path) -> None:
    """A server started without one data mode refuses it and still serves the other."""
    passive = refused == "passive"
    with start_server(kind, tmp_path, **{refused: False}) as server:
        (server.root / "file.bin").write_bytes(b"data")
        with _login(server, passive=passive) as ftp, pytest.raises(ftplib.Error):
            _get(ftp, "file.bin")
        with _login(server, passive=not passive) as ftp:
            assert _get(ftp, "file.bin") == b"data"


@pytest.mark.parametrize("kind", servers.KINDS)
def test_explicit_tls_is_optional(kind: str, tmp_path: Path, pki: Pki) -> None:
    with start_server(
        kind, tmp_path, tls="explicit", cert=pki.server_cert, key=pki.server_key
    ) as server:
        with _login_tls(server, pki) as ftps:
            ftps.storbinary("STOR secret.bin", io.BytesIO(PAYLOAD))
            assert _sha256(_get(ftps, "secret.bin")) == _sha256(PAYLOAD), server.log()
        with _login(server) as ftp:
            assert _get(ftp, "secret.bin") == PAYLOAD


@pytest.mark.parametrize("kind", ["vsftpd", "proftpd"])
@pytest.mark.parametrize("host", HOSTS)
def test_required_tls_with_session_reuse(kind: str, host: str, tmp_path: Path, pki: Pki) -> None:
    """Cleartext logins are refused, and so are TLS data connections that start a new session.

    Python's FTP_TLS never resumes the control connection's session on a data connection, so it
    is the negative check; curl resumes it, so it is the positive one.
    """
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    with start_server(
        kind,
        tmp_path / "server",
        host=host,
        tls="required",
        cert=pki.server_cert,
        key=pki.server_key,
        require_ssl_reuse=True,
        # vsftpd 3.0.3 under TLS 1.3 answers about half of curl's uploads with "426 Failure
        # reading network stream" (EPIPE writing to the closed data connection), reuse or not.
        tls_max_version="1.2" if kind == "vsftpd" else None,
    ) as server:
        _assert_cleartext_login_refused(server)

        (server.root / "file.bin").write_bytes(PAYLOAD)
        ftps = _login_tls(server, pki)
        try:
            # The failure surfaces as the server's 4xx/5xx reply or as a TLS error, by timing.
            with pytest.raises((ftplib.Error, OSError)):
                _get(ftps, "file.bin")
        finally:
            # Not quit(): a TLS error can leave the transfer's reply unread, and QUIT would
            # read it and raise.
            ftps.close()

        trust = ("--ssl-reqd", "--cacert", str(pki.ca_cert))
        upload = _curl(*trust, "-T", str(source), _url(server, "up.bin"))
        assert upload.returncode == 0, upload.stderr.decode() + server.log()
        download = _curl(*trust, _url(server, "up.bin"))
        assert download.returncode == 0, download.stderr.decode() + server.log()
        assert _sha256(download.stdout) == _sha256(PAYLOAD)


@pytest.mark.parametrize("kind", ["pyftpdlib", "pure-ftpd"])
def test_required_tls_without_reuse(kind: str, tmp_path: Path, pki: Pki) -> None:
    with start_server(
        kind, tmp_path, tls="required", cert=pki.server_cert, key=pki.server_key
    ) as server:
        _assert_cleartext_login_refused(server)
        with _login_tls(server, pki) as ftps:
            ftps.storbinary("STOR secret.bin", io.BytesIO(PAYLOAD))
            assert _sha256(_get(ftps, "secret.bin")) == _sha256(PAYLOAD), server.log()


@pytest.mark.parametrize("kind", ["vsftpd", "proftpd"])
def test_implicit_tls(kind: str, tmp_path: Path, pki: Pki) -> None:
    with start_server(
        kind, tmp_path, tls="implicit", cert=pki.server_cert, key=pki.server_key
    ) as server:
        (server.root / "file.bin").write_bytes(PAYLOAD)
        url = _url(server, "file.bin", scheme="ftps")
        download = _curl("--cacert", str(pki.ca_cert), url)
        assert download.returncode == 0, download.stderr.decode() + server.log()
        assert _sha256(download.stdout) == _sha256(PAYLOAD)


@pytest.mark.parametrize("kind", servers.KINDS)
def test_tls_max_version(kind: str, tmp_path: Path, pki: Pki) -> None:
    with (
        start_server(
            kind,
            tmp_path,
            tls="explicit",
            cert=pki.server_cert,
            key=pki.server_key,
            tls_max_version="1.2",
        ) as server,
        _login_tls(server, pki) as ftps,
    ):
        assert isinstance(ftps.sock, ssl.SSLSocket)
        assert ftps.sock.version() == "TLSv1.2", server.log()


@pytest.mark.parametrize(
    ("kind", "tls", "active", "require_ssl_reuse"),
    [
        ("pure-ftpd", None, False, False),
        ("pure-ftpd", "implicit", True, False),
        ("pure-ftpd", "required", True, True),
        ("pyftpdlib", "implicit", True, False),
        ("pyftpdlib", "required", True, True),
    ],
)
def test_unsupported_options_raise(
    kind: str, tls: str | None, active: bool, require_ssl_reuse: bool, tmp_path: Path, pki: Pki
) -> None:
    """A server that cannot do what was asked must say so, not run with something else."""
    cert, key = (pki.server_cert, pki.server_key) if tls else (None, None)
    with pytest.raises(NotImplementedError):
        start_server(
            kind,
            tmp_path,
            active=active,
            tls=tls,
            cert=cert,
            key=key,
            require_ssl_reuse=require_ssl_reuse,
        )


def test_missing_binary_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "VSFTPD", tmp_path / "no-such-vsftpd")
    with pytest.raises(servers.ServerUnavailable, match="install-test-deps"):
        start_server("vsftpd", tmp_path / "work")


def test_start_failure_reports_server_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that cannot bind its port must raise with its own words, not time out silently.

    vsftpd is the hard case: it writes start-up errors to fd 0, not stderr.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        monkeypatch.setattr(servers, "free_port", lambda host: port)
        with pytest.raises(servers.ServerStartError, match="could not bind"):
            start_server("vsftpd", tmp_path)
