"""A small, scriptable, malicious FTP server for tests of what the gateway does with it.

`HostileUpstream(mode)` listens on a free port of 127.0.0.1 and serves each control connection
in a thread of its own. It speaks just enough FTP for a login and one download (USER, PASS,
FEAT, TYPE, PWD, NOOP, EPSV, PASV, RETR, QUIT) and misbehaves at one point chosen by `mode`:

- NORMAL: a well-behaved server; proves the harness itself works.
- THIRD_HOST_PASV (EPSV, PASV): refuses EPSV; its 227 names `pasv_address`, another host, while
  it really listens on 127.0.0.1 at the same port.
- ENDLESS_GREETING (greeting): "220-" and then lines, forever.
- ENDLESS_REPLY (PWD): "257-" and then lines, forever.
- LONG_LINE (PWD): one reply line of 64 KiB.
- BAD_CODE (greeting): "999 x".
- GARBAGE_REPLY (PWD): "abc".
- RESET_MID_RETR (RETR): sends part of the file, resets the data connection (SO_LINGER 0), then
  claims success with 226.
- EARLY_CLOSE_426 (RETR): sends part of the file, closes the data connection cleanly, then
  replies 426.
- DOUBLE_REPLY (NOOP): two final replies to one command, in one write; the second is
  unsolicited (pyftpdlib does much the same to a command line over 2,048 bytes).
- ENDLESS_1XX_GREETING (greeting): single-line "120" replies, forever.
- ENDLESS_1XX_REPLY (PWD): single-line "150" replies, forever, and never a final reply.
- UNSOLICITED_FLOOD (NOOP): answers, then sends "200" replies nobody asked for, forever.
- BIG_STAT (STAT): a 213 reply of `BIG_STAT_BYTES`, within the gateway's reply bound, to every
  STAT: a large directory listed over the control connection.
- JUNK_INTO_STOR (STOR): writes `JUNK_BYTES` into the upload's data connection, which must
  carry nothing towards the gateway, over `JUNK_SECONDS` while reading the upload; then 226.
- SILENT_PWD (PWD): never answers, and answers nothing after it.
- SILENT_AFTER_RETR (RETR): sends 150 and the whole file, closes the data connection cleanly,
  and never sends the final reply (nor any reply after it).
- STALL_AFTER_150 (RETR): accepts the data connection, sends 150, then nothing at all on
  either connection.
- SUCCESS_WITHOUT_DATA (RETR): accepts PORT/EPRT (and PASV/EPSV, whose listener it closes
  without accepting) and answers RETR with 226 at once: no 150, no data connection.
- ANSWERS_WITHOUT_READING (TYPE): answers the TYPE that ends `login_hostile`, then stops
  reading its control connection but sends "200" each time the test calls `allow_reply()`.
- DEAF_AFTER_LOGIN (TYPE): answers the TYPE that ends `login_hostile`, then stops reading
  its control connection and answers nothing more, holding the connection open.
- WAITS_FOR_DATA (STOR): like pyftpdlib when its data connection is not accepted yet: sends
  150, then waits for a data connection and never answers STOR; ABOR closes its listener and
  is answered with a lone 225.
- TLS_DATA_STALL (RETR): an FTPS server (AUTH TLS with `tls_context`, PROT P) that accepts
  the data connection, sends 150 and never answers the TLS handshake on it; once the gateway
  closes the data connection it replies 426.

"Forever" is bounded by `ENDLESS_LIMIT` (time and bytes) so a gateway that never gives up
fails its test instead of hanging it. `events` records what happened, for assertions.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import BinaryIO, Self

from clients import reset

HOST = "127.0.0.1"
TIMEOUT = 15.0
ENDLESS_LIMIT = (30.0, 256 * 1024 * 1024)
"""An endless reply stops after this many seconds or bytes, whichever comes first."""
LONG_LINE_BYTES = 64 * 1024
BIG_STAT_BYTES = 240 * 1024
JUNK_SECONDS = 4.0
JUNK_BYTES = 160 * 1024 * 1024
"""JUNK_INTO_STOR writes this much, evenly over `JUNK_SECONDS`."""


class Mode(StrEnum):
    NORMAL = "normal"
    THIRD_HOST_PASV = "third-host-pasv"
    ENDLESS_GREETING = "endless-greeting"
    ENDLESS_REPLY = "endless-reply"
    LONG_LINE = "long-line"
    BAD_CODE = "bad-code"
    GARBAGE_REPLY = "garbage-reply"
    RESET_MID_RETR = "reset-mid-retr"
    EARLY_CLOSE_426 = "early-close-426"
    DOUBLE_REPLY = "double-reply"
    ENDLESS_1XX_GREETING = "endless-1xx-greeting"
    UNSOLICITED_FLOOD = "unsolicited-flood"
    BIG_STAT = "big-stat"
    JUNK_INTO_STOR = "junk-into-stor"
    SILENT_PWD = "silent-pwd"
    SILENT_AFTER_RETR = "silent-after-retr"
    STALL_AFTER_150 = "stall-after-150"
    SUCCESS_WITHOUT_DATA = "success-without-data"
    TLS_DATA_STALL = "tls-data-stall"
    DEAF_AFTER_LOGIN = "deaf-after-login"
    ANSWERS_WITHOUT_READING = "answers-without-reading"
    ENDLESS_1XX_REPLY = "endless-1xx-reply"
    WAITS_FOR_DATA = "waits-for-data"


class ScriptedServer:
    """A scripted server on loopback: one thread per connection runs the subclass's `_serve`.
    Use it as a context manager, or `start()` and `stop()` it; `events` records what it did."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.host = HOST
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> Self:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # shutdown() wakes a thread blocked reading it; close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _event(self, text: str) -> None:
        with self._lock:
            self.events.append(text)

    def saw(self, text: str, timeout: float = TIMEOUT) -> bool:
        """Whether `text` is among the events within `timeout` seconds: the server's threads
        record what they see a moment after the gateway has answered its client."""
        deadline = time.monotonic() + timeout
        while text not in self.events:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, self._track(conn))

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class HostileUpstream(ScriptedServer):
    """The server; use it as a context manager, or `start()` and `stop()` it.

    `payload` is what RETR serves, whatever the name; the misbehaving RETR modes send its first
    quarter. `pasv_address` is the (host, port) THIRD_HOST_PASV names in its 227 reply.
    """

    def __init__(
        self,
        mode: Mode,
        *,
        payload: bytes = b"",
        pasv_address: tuple[str, int] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if Mode(mode) is Mode.THIRD_HOST_PASV and pasv_address is None:
            raise ValueError("THIRD_HOST_PASV needs the pasv_address to name")
        if Mode(mode) is Mode.TLS_DATA_STALL and tls_context is None:
            raise ValueError("TLS_DATA_STALL needs a tls_context")
        super().__init__()
        self.tls_context = tls_context
        self.mode = Mode(mode)
        self.payload = payload
        self.pasv_address = pasv_address
        self.received = b""
        """What the last STOR received."""
        self.data_peers: list[str] = []
        """Addresses data connections came from, in order."""
        self._replies_allowed = threading.Semaphore(0)

    def allow_reply(self) -> None:
        """ANSWERS_WITHOUT_READING: send one more "200" reply."""
        self._replies_allowed.release()

    # --------------------------------------------------------------------------- session

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        if self.mode is Mode.TLS_DATA_STALL:
            try:
                self._serve_tls_stall(conn)
            except OSError as e:
                self._event(f"control connection error: {e!r}")
            return
        data_listener: socket.socket | None = None
        try:
            with conn, conn.makefile("rb") as lines:
                if self.mode is Mode.ENDLESS_GREETING:
                    self._endless(conn, 220)
                    return
                if self.mode is Mode.ENDLESS_1XX_GREETING:
                    self._endless(conn, 120, multi_line=False)
                    return
                if self.mode is Mode.BAD_CODE:
                    conn.sendall(b"999 x\r\n")
                    self._event("sent 999 x")
                    self._drain(lines)
                    return
                conn.sendall(b"220 hostile upstream ready\r\n")
                while not self._stopping.is_set():
                    raw = lines.readline(8192)
                    if not raw:
                        return
                    verb = raw.decode("latin-1").strip().partition(" ")[0].upper()
                    self._event(f"command {verb}")
                    if verb == "QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    if verb in ("EPSV", "PASV"):
                        if data_listener is not None:
                            data_listener.close()
                        data_listener = self._passive(conn, verb)
                    elif verb == "RETR" and self.mode is Mode.SUCCESS_WITHOUT_DATA:
                        if data_listener is not None:
                            data_listener.close()  # resets a connection waiting in its queue
                            data_listener = None
                        conn.sendall(b"226 Transfer complete.\r\n")
                        self._event("answered RETR 226 without a data connection")
                    elif verb in ("PORT", "EPRT") and self.mode is Mode.SUCCESS_WITHOUT_DATA:
                        conn.sendall(f"200 {verb} command successful.\r\n".encode())
                    elif verb == "RETR":
                        self._retr(conn, data_listener)
                        data_listener = None
                        if self.mode in (Mode.SILENT_AFTER_RETR, Mode.STALL_AFTER_150):
                            self._drain(lines)
                            return
                    elif verb == "TYPE" and self.mode is Mode.ANSWERS_WITHOUT_READING:
                        conn.sendall(_SIMPLE["TYPE"])
                        self._answer_without_reading(conn)
                        return
                    elif verb == "TYPE" and self.mode is Mode.DEAF_AFTER_LOGIN:
                        conn.sendall(_SIMPLE["TYPE"])
                        self._event("stopped reading")
                        self._stopping.wait(ENDLESS_LIMIT[0])
                        return
                    elif verb == "PWD" and self.mode is Mode.SILENT_PWD:
                        self._event("left PWD unanswered")
                        self._drain(lines)
                        return
                    elif verb == "NOOP" and self.mode is Mode.DOUBLE_REPLY:
                        conn.sendall(b"200 NOOP ok.\r\n200 Unsolicited second reply.\r\n")
                        self._event("answered NOOP twice")
                    elif verb == "NOOP" and self.mode is Mode.UNSOLICITED_FLOOD:
                        conn.sendall(b"200 NOOP ok.\r\n")
                        self._endless(conn, 200, multi_line=False)
                        return
                    elif verb == "STAT" and self.mode is Mode.BIG_STAT:
                        conn.sendall(_big_stat())
                    elif verb == "STOR" and self.mode is Mode.WAITS_FOR_DATA:
                        conn.sendall(b"150 File status okay. About to open data connection.\r\n")
                        self._event("sent 150 for STOR, waiting for a data connection")
                    elif verb == "ABOR" and self.mode is Mode.WAITS_FOR_DATA:
                        if data_listener is not None:
                            data_listener.close()
                            data_listener = None
                        conn.sendall(b"225 ABOR command successful; data channel closed.\r\n")
                        self._event("answered ABOR with 225")
                    elif verb == "STOR":
                        self._stor(conn, data_listener)
                        data_listener = None
                    elif verb == "PWD" and self.mode in _PWD_ATTACKS:
                        _PWD_ATTACKS[self.mode](self, conn)
                        self._drain(lines)
                        return
                    else:
                        conn.sendall(_SIMPLE.get(verb, b"502 Command not implemented.\r\n"))
        except OSError as e:
            self._event(f"control connection error: {e!r}")
        finally:
            if data_listener is not None:
                data_listener.close()

    def _serve_tls_stall(self, conn: socket.socket) -> None:
        """TLS_DATA_STALL: just enough FTPS (RFC 4217) to reach a protected RETR."""
        assert self.tls_context is not None
        control: socket.socket = conn
        lines = control.makefile("rb")
        listener: socket.socket | None = None
        control.sendall(b"220 hostile upstream ready\r\n")
        while raw := lines.readline(8192):
            verb = raw.decode("latin-1").strip().partition(" ")[0].upper()
            self._event(f"command {verb}")
            if verb == "AUTH":
                control.sendall(b"234 AUTH TLS ok.\r\n")
                control = self._track(self.tls_context.wrap_socket(control, server_side=True))
                lines = control.makefile("rb")
            elif verb in ("PBSZ", "PROT"):
                control.sendall(b"200 OK.\r\n")
            elif verb == "EPSV":
                listener = self._track(socket.create_server((HOST, 0)))
                listener.settimeout(TIMEOUT)
                port = listener.getsockname()[1]
                control.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
            elif verb == "RETR" and listener is not None:
                data, _ = listener.accept()
                listener.close()
                self._track(data)
                control.sendall(b"150 Opening BINARY mode data connection.\r\n")
                self._event("sent 150, not answering the data TLS handshake")
                with contextlib.suppress(OSError):
                    while data.recv(65536):
                        pass  # the gateway's ClientHello, unanswered
                data.close()
                self._event("the gateway closed the data connection")
                control.sendall(b"426 Data connection closed; transfer aborted.\r\n")
            elif verb == "QUIT":
                control.sendall(b"221 bye\r\n")
                return
            else:
                control.sendall(_SIMPLE.get(verb, b"502 Command not implemented.\r\n"))

    def _drain(self, lines: BinaryIO) -> None:
        """Read until the gateway hangs up, so the close is the gateway's decision."""
        while lines.readline(8192):
            pass
        self._event("gateway closed the control connection")

    def _endless(self, conn: socket.socket, code: int, *, multi_line: bool = True) -> None:
        """A multi-line reply that never ends (or, not `multi_line`, single-line replies that
        never end), until the gateway closes or the limit is hit."""
        seconds, most = ENDLESS_LIMIT
        deadline = time.monotonic() + seconds
        sent = 0
        prefix = " " if multi_line else f"{code} "
        if multi_line:
            conn.sendall(f"{code}-an endless reply begins\r\n".encode())
        try:
            number = 0
            while sent < most and time.monotonic() < deadline:
                chunk = b"".join(
                    f"{prefix}line {number + i} of a reply that never ends {'.' * 40}\r\n".encode()
                    for i in range(100)
                )
                number += 100
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError as e:
            self._event(f"endless reply cut off after {sent} bytes: {e!r}")
            return
        self._event(f"endless reply NOT cut off after {sent} bytes")

    def _answer_without_reading(self, conn: socket.socket) -> None:
        self._event("stopped reading")
        seconds, _ = ENDLESS_LIMIT
        deadline = time.monotonic() + seconds
        answered = 0
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and not self._stopping.is_set():
                if self._replies_allowed.acquire(timeout=0.2):
                    conn.sendall(b"200 NOOP ok.\r\n")
                    answered += 1
        self._event(f"answered {answered} commands without reading them")

    def _endless_1xx(self, conn: socket.socket) -> None:
        self._endless(conn, 150, multi_line=False)

    def _long_line(self, conn: socket.socket) -> None:
        conn.sendall(b"257 " + b"A" * LONG_LINE_BYTES + b"\r\n")
        self._event(f"sent a {LONG_LINE_BYTES}-byte reply line")

    def _garbage(self, conn: socket.socket) -> None:
        conn.sendall(b"abc\r\n")
        self._event("sent abc")

    def _endless_pwd(self, conn: socket.socket) -> None:
        self._endless(conn, 257)

    # ---------------------------------------------------------------------- data channel

    def _passive(self, conn: socket.socket, verb: str) -> socket.socket | None:
        if self.mode is Mode.THIRD_HOST_PASV:
            if verb == "EPSV":
                conn.sendall(b"500 EPSV not understood.\r\n")
                return None
            assert self.pasv_address is not None
            named_host, port = self.pasv_address
            listener = socket.create_server((HOST, port))  # really here, at the same port
            numbers = ",".join([*named_host.split("."), str(port >> 8), str(port & 0xFF)])
            conn.sendall(f"227 Entering Passive Mode ({numbers}).\r\n".encode())
            self._event(f"227 named {named_host}:{port}")
        else:
            listener = socket.create_server((HOST, 0))
            port = listener.getsockname()[1]
            if verb == "EPSV":
                conn.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
            else:
                numbers = ",".join([*HOST.split("."), str(port >> 8), str(port & 0xFF)])
                conn.sendall(f"227 Entering Passive Mode ({numbers}).\r\n".encode())
        listener.settimeout(TIMEOUT)
        return self._track(listener)

    def _retr(self, conn: socket.socket, listener: socket.socket | None) -> None:
        if listener is None:
            conn.sendall(b"425 Use EPSV or PASV first.\r\n")
            return
        with listener:
            data, peer = listener.accept()
        self._track(data)
        self.data_peers.append(peer[0])
        self._event(f"data connection from {peer[0]}")
        conn.sendall(b"150 Opening BINARY mode data connection.\r\n")
        if self.mode is Mode.STALL_AFTER_150:
            self._event("sent 150, then nothing")
            return  # the data connection stays open (tracked) until stop()
        if self.mode is Mode.SILENT_AFTER_RETR:
            data.sendall(self.payload)
            data.shutdown(socket.SHUT_WR)
            data.close()
            self._event("sent the whole file, then no final reply")
            return
        if self.mode is Mode.RESET_MID_RETR:
            part = self.payload[: len(self.payload) // 4]
            data.sendall(part)
            time.sleep(0.2)  # let the gateway relay some of it before the crash
            reset(data)
            self._event(f"reset the data connection after {len(part)} bytes")
            conn.sendall(b"226 Transfer complete.\r\n")  # a lie: the transfer was cut
        elif self.mode is Mode.EARLY_CLOSE_426:
            part = self.payload[: len(self.payload) // 4]
            data.sendall(part)
            data.shutdown(socket.SHUT_WR)
            data.close()
            self._event(f"closed the data connection cleanly after {len(part)} bytes")
            conn.sendall(b"426 Connection closed; transfer aborted.\r\n")
        else:
            data.sendall(self.payload)
            data.shutdown(socket.SHUT_WR)
            data.close()
            conn.sendall(b"226 Transfer complete.\r\n")

    def _stor(self, conn: socket.socket, listener: socket.socket | None) -> None:
        if listener is None:
            conn.sendall(b"425 Use EPSV or PASV first.\r\n")
            return
        with listener:
            data, peer = listener.accept()
        self._track(data)
        self._event(f"data connection from {peer[0]}")
        conn.sendall(b"150 Ok to send data.\r\n")
        received = bytearray()
        junk = b"junk from the receiving side\r\n" * 2048
        sent = 0
        data.setblocking(False)
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            writing = elapsed < JUNK_SECONDS and sent < JUNK_BYTES * elapsed / JUNK_SECONDS
            readable, writable, _ = select.select([data], [data] if writing else [], [], 0.01)
            if writable:
                with contextlib.suppress(BlockingIOError):
                    sent += data.send(junk)
            if readable:
                try:
                    chunk = data.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                received += chunk
        data.close()
        self.received = bytes(received)
        self._event(f"wrote {sent} bytes into the upload connection; received {len(received)}")
        conn.sendall(b"226 Transfer complete.\r\n")


def _big_stat() -> bytes:
    lines = [b"213-Status of /:"]
    size = 0
    number = 0
    while size < BIG_STAT_BYTES - 100:
        name = f"file-{number:08d}-{'x' * 320}.bin"  # long names: fewer lines than the bound
        line = f" -rw-r--r-- 1 ftp ftp 1024 Jan 01 00:00 {name}".encode()
        lines.append(line)
        size += len(line) + 2
        number += 1
    lines.append(b"213 End of status")
    return b"\r\n".join(lines) + b"\r\n"


_SIMPLE = {
    "USER": b"331 Password required.\r\n",
    "PASS": b"230 Logged in.\r\n",
    "FEAT": b"211-Features:\r\n UTF8\r\n211 End\r\n",
    "TYPE": b"200 Type set.\r\n",
    "PWD": b'257 "/" is the current directory.\r\n',
    "NOOP": b"200 NOOP ok.\r\n",
    "SYST": b"215 UNIX Type: L8\r\n",
}

_PWD_ATTACKS = {
    Mode.ENDLESS_REPLY: HostileUpstream._endless_pwd,
    Mode.LONG_LINE: HostileUpstream._long_line,
    Mode.ENDLESS_1XX_REPLY: HostileUpstream._endless_1xx,
    Mode.GARBAGE_REPLY: HostileUpstream._garbage,
}
