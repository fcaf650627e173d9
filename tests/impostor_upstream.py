"""A scripted FTPS server whose data connections are an impostor's, for tests of how the
gateway verifies upstream certificates on data connections.

`ImpostorUpstream(control, data, payload=...)` listens on a free port of 127.0.0.1 and speaks
explicit FTPS (RFC 4217): after `AUTH TLS` its control connection presents the certificate
`control` (a (cert, key) pair of PEM paths), while every passive data connection presents
`data`. Pass the same pair twice for an honest server. It knows just enough FTP for a login and
one download (AUTH, PBSZ, PROT, USER, PASS, FEAT, TYPE, PWD, SYST, NOOP, EPSV, PASV, PORT,
RETR, QUIT); after PORT it connects to the gateway for the data connection and is still the TLS
server there (RFC 4217 section 9). RETR sends `payload` if the gateway completes the data
handshake, and then claims `226` whatever happened, as an attacker holding the data port would.
`events` records what happened.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

from hostile_upstream import HOST, TIMEOUT, ScriptedServer

_SIMPLE = {
    "PBSZ": b"200 PBSZ=0\r\n",
    "PROT": b"200 Protection level set.\r\n",
    "USER": b"331 Password required.\r\n",
    "PASS": b"230 Logged in.\r\n",
    "FEAT": b"211-Features:\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n",
    "TYPE": b"200 Type set.\r\n",
    "PWD": b'257 "/" is the current directory.\r\n',
    "SYST": b"215 UNIX Type: L8\r\n",
    "NOOP": b"200 NOOP ok.\r\n",
}


def _server_context(pair: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pair[0]), str(pair[1]))
    return context


class ImpostorUpstream(ScriptedServer):
    """The server; use it as a context manager."""

    def __init__(
        self, control: tuple[Path, Path], data: tuple[Path, Path], *, payload: bytes = b""
    ) -> None:
        super().__init__()
        self.payload = payload
        self._control_tls = _server_context(control)
        self._data_tls = _server_context(data)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        listener: socket.socket | None = None
        target: tuple[str, int] | None = None
        try:
            conn.sendall(b"220 impostor upstream ready\r\n")
            lines = conn.makefile("rb")
            while not self._stopping.is_set():
                raw = lines.readline(8192)
                if not raw:
                    return
                verb = raw.decode("latin-1").strip().partition(" ")[0].upper()
                self._event(f"command {verb}")
                if verb == "AUTH":
                    conn.sendall(b"234 AUTH TLS successful.\r\n")
                    conn = self._track(self._control_tls.wrap_socket(conn, server_side=True))
                    lines = conn.makefile("rb")
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                elif verb in ("EPSV", "PASV"):
                    if listener is not None:
                        listener.close()
                    listener = self._passive(conn, verb)
                elif verb == "PORT":
                    numbers = raw.decode("latin-1").split()[1].split(",")
                    target = (".".join(numbers[:4]), int(numbers[4]) * 256 + int(numbers[5]))
                    conn.sendall(b"200 PORT command successful.\r\n")
                elif verb == "RETR" and listener is not None:
                    with listener:
                        data, _ = listener.accept()
                    self._retr(conn, data)
                    listener = None
                elif verb == "RETR" and target is not None:
                    self._retr(conn, socket.create_connection(target, timeout=TIMEOUT))
                    target = None
                else:
                    conn.sendall(_SIMPLE.get(verb, b"502 Command not implemented.\r\n"))
        except OSError as e:
            self._event(f"control connection error: {e!r}")
        finally:
            if listener is not None:
                listener.close()
            conn.close()

    def _passive(self, conn: socket.socket, verb: str) -> socket.socket:
        listener = self._track(socket.create_server((HOST, 0)))
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        if verb == "EPSV":
            conn.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
        else:
            numbers = ",".join([*HOST.split("."), str(port >> 8), str(port & 0xFF)])
            conn.sendall(f"227 Entering Passive Mode ({numbers}).\r\n".encode())
        return listener

    def _retr(self, conn: socket.socket, data: socket.socket) -> None:
        conn.sendall(b"150 Opening BINARY mode data connection.\r\n")
        try:
            with self._data_tls.wrap_socket(self._track(data), server_side=True) as tls:
                tls.sendall(self.payload)
                self._event(f"sent {len(self.payload)} bytes on the data connection")
                with contextlib.suppress(OSError):
                    tls.unwrap()
        except (ssl.SSLError, OSError) as e:
            self._event(f"data handshake refused: {e!r}")
        conn.sendall(b"226 Transfer complete.\r\n")  # whatever happened: the attacker's claim
