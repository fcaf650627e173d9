"""Real FTP clients for integration tests: Python ftplib, curl and lftp, each bounded in time."""

from __future__ import annotations

import ftplib
import hashlib
import io
import socket
import struct
import subprocess
from pathlib import Path

TIMEOUT = 60


def reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN (SO_LINGER 0): a crash, not an end of file."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def login(
    host: str, port: int, user: str, password: str, *, timeout: float = TIMEOUT
) -> ftplib.FTP:
    """An ftplib session logged in at host:port, in binary mode (TYPE I)."""
    ftp = ftplib.FTP(timeout=timeout)
    ftp.connect(host, port)
    ftp.login(user, password)
    ftp.voidcmd("TYPE I")
    return ftp


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    return sha256(path.read_bytes())


def ftplib_session(host: str, port: int, user: str, password: str, *, passive: bool) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(host, port)
    ftp.login(user, password)
    ftp.set_pasv(passive)
    return ftp


def ftplib_get(ftp: ftplib.FTP, path: str) -> bytes:
    buffer = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", buffer.write)
    return buffer.getvalue()


def ftplib_put(ftp: ftplib.FTP, path: str, data: bytes) -> str:
    return ftp.storbinary(f"STOR {path}", io.BytesIO(data))


def run(
    command: list[str], *, timeout: float = TIMEOUT, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=timeout, input=input, check=False)


def curl(url: str, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """curl with a trace of the FTP commands it sent in stderr (`-v`)."""
    return run(["curl", "-sS", "-v", "--max-time", str(timeout), *args, url], timeout=timeout + 5)


def sent_commands(curl_stderr: bytes) -> list[str]:
    """The FTP commands curl sent, from its -v trace ('> VERB ...' lines)."""
    verbs = []
    for raw in curl_stderr.decode(errors="replace").splitlines():
        if raw.startswith("> "):
            verbs.append(raw[2:].split(" ", 1)[0].upper())
    return verbs


LFTP_BASE = (
    "set cmd:fail-exit yes; set net:max-retries 1; set net:timeout 15; "
    "set net:reconnect-interval-base 1; set ftp:ssl-allow no; set xfer:clobber on; "
)


def lftp(
    script: str, *, log: Path | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """Run lftp non-interactively; with `log`, its protocol debug trace goes there."""
    prefix = LFTP_BASE + (f"debug -o {log} -t 5; " if log is not None else "")
    return run(["lftp", "-c", prefix + script], timeout=timeout)


def lftp_sent(log: Path) -> list[str]:
    """The FTP verbs lftp sent, from its debug trace ('---> VERB ...')."""
    verbs = []
    for raw in log.read_text(errors="replace").splitlines():
        if "---> " in raw:
            verbs.append(raw.split("---> ", 1)[1].split(" ", 1)[0].upper())
    return verbs


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything until the peer closes; a reset ends it too (it is what some tests test)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def retr_passive(ftp: ftplib.FTP, name: str, timeout: float) -> tuple[bytes, str]:
    """RETR over PASV: the bytes received and the final reply, whatever it is (no raising)."""
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    with socket.create_connection((host, port), timeout=timeout) as data:
        ftp.putcmd(f"RETR {name}")
        first = ftp.getmultiline()
        if not first.startswith("1"):
            return b"", first
        received = read_until_closed(data)
    return received, ftp.getmultiline()
