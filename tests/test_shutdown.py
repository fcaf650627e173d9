"""SIGTERM stops the gateway without losing a transfer: idle sessions get 421 at once, running
transfers get `timeouts.shutdown` seconds to finish (226, byte-exact), then 426 and 421; a
second SIGTERM ends them at once. Real gateway process, ftplib clients, and a pyftpdlib
upstream whose data connections send at a throttled rate, so transfers are still running when
the signal comes."""

from __future__ import annotations

import ftplib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gateway_process import GatewayProcess, free_port, start_gateway, wait_for_port

TIMEOUT = 30.0
RATE = 200 * 1024  # bytes per second the upstream sends on a data connection
SMALL = os.urandom(600 * 1024)  # about 3 s at RATE
LARGE = os.urandom(8 * 1024 * 1024)  # about 40 s at RATE

_THROTTLED_UPSTREAM = """
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
from pyftpdlib.servers import FTPServer

root, port, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
authorizer = DummyAuthorizer()
authorizer.add_user("user", "secret", root, perm="elr")

class Slow(ThrottledDTPHandler):
    write_limit = rate

class Handler(FTPHandler):
    dtp_handler = Slow
    banner = "throttled test server ready."

Handler.authorizer = authorizer
FTPServer(("127.0.0.1", port), Handler).serve_forever(timeout=0.2)
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("throttled")
    (root / "small.bin").write_bytes(SMALL)
    (root / "large.bin").write_bytes(LARGE)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _THROTTLED_UPSTREAM, str(root), str(port), str(RATE)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def gateway_for(tmp_path: Path, upstream: int, grace: float) -> GatewayProcess:
    """A reverse-mode gateway with this grace period, writing `tmp_path/xferlog`."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'upstream = "127.0.0.1:{upstream}"\n[timeouts]\nshutdown = {grace}\n'
        f'[log]\ntransfer_log = "{tmp_path / "xferlog"}"\n'
    )
    return start_gateway(tmp_path, "--config", str(config))


def logged_in(gateway: GatewayProcess, passive: bool = True) -> ftplib.FTP:
    """A logged-in ftplib client; `passive=False`: active mode (PORT), the client that once
    printed its own 421 and kept a truncated file."""
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(gateway.host, gateway.port)
    ftp.login("user", "secret")
    ftp.set_pasv(passive)
    return ftp


@dataclass
class Download:
    """A RETR in a thread: the bytes it got, every reply after the data, or the error."""

    ftp: ftplib.FTP
    name: str
    started: threading.Event = field(default_factory=threading.Event)
    data: bytearray = field(default_factory=bytearray)
    replies: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(TIMEOUT), "the transfer did not start"

    def _run(self) -> None:
        self.ftp.voidcmd("TYPE I")
        with self.ftp.transfercmd(f"RETR {self.name}") as conn:
            try:
                while chunk := conn.recv(65536):
                    self.data += chunk
                    self.started.set()
            except ConnectionResetError:
                pass  # a transfer cut short may end with a reset; the control reply says so
        self.started.set()
        # The transfer's final reply, then whatever the session says before it closes.
        while True:
            try:
                line = self.ftp.getline()
            except (OSError, EOFError):
                break
            if not line:
                break
            self.replies.append(line)

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(TIMEOUT * 2)
        assert not self.thread.is_alive(), "the client is still waiting"


def wait_exit(gateway: GatewayProcess, timeout: float = TIMEOUT * 2) -> int:
    try:
        return gateway.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        gateway.stop()
        raise AssertionError(f"the gateway did not exit:\n{gateway.log()[-3000:]}") from None


def wait_log(gateway: GatewayProcess, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in gateway.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{gateway.log()[-3000:]}"
        time.sleep(0.05)


def codes(replies: list[str]) -> list[str]:
    return [line[:3] for line in replies if line[:3].isdigit() and line[3:4] == " "]


MODES = pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])


@MODES
def test_running_transfer_completes_and_idle_session_gets_421(
    tmp_path: Path, upstream: int, passive: bool
) -> None:
    gateway = gateway_for(tmp_path, upstream, grace=60)
    try:
        idle = logged_in(gateway)
        download = Download(logged_in(gateway, passive), "small.bin")
        download.start()
        gateway.proc.send_signal(signal.SIGTERM)
        # The idle session is told at once and closed.
        with pytest.raises(ftplib.error_temp, match=r"^421 Service shutting down"):
            idle.getresp()
        assert idle.sock.recv(1) == b""  # closed by the gateway
        # No new sessions.
        wait_log(gateway, "Shutting down")
        with pytest.raises(OSError):
            socket.create_connection((gateway.host, gateway.port), timeout=5).recv(1)
        download.join()
        assert wait_exit(gateway) == 0
    finally:
        gateway.stop()
    assert hashlib.sha256(download.data).digest() == hashlib.sha256(SMALL).digest()
    assert codes(download.replies) == ["226", "421"], download.replies
    log = gateway.log()
    assert "[gateway.shutdown#info] Received SIGTERM, shutting down." in log
    assert "idle sessions closed: 1; running transfers: 1, given up to 60 s" in log
    assert "Shutdown complete: 1 transfers ran to their end, 0 ended with 426" in log
    # The transfer log was still open when the transfer ended during the grace period.
    (record,) = [line.split() for line in (tmp_path / "xferlog").read_text().splitlines()]
    assert record[7:9] == [str(len(SMALL)), "small.bin"] and record[-1] == "c"


@MODES
def test_transfer_outlasting_the_grace_gets_426_then_421(
    tmp_path: Path, upstream: int, passive: bool
) -> None:
    gateway = gateway_for(tmp_path, upstream, grace=1)
    try:
        download = Download(logged_in(gateway, passive), "large.bin")
        download.start()
        gateway.proc.send_signal(signal.SIGTERM)
        download.join()
        assert wait_exit(gateway) == 0
    finally:
        gateway.stop()
    assert len(download.data) < len(LARGE)
    assert codes(download.replies) == ["426", "421"], download.replies
    assert "226" not in codes(download.replies)
    log = gateway.log()
    assert "ending 1 transfers with 426 (grace period over)" in log
    assert "Shutdown complete: 0 transfers ran to their end, 1 ended with 426" in log
    (record,) = [line.split() for line in (tmp_path / "xferlog").read_text().splitlines()]
    assert record[8] == "large.bin" and record[-1] == "i"
    assert 0 < int(record[7]) < len(LARGE)  # what moved before the cut


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_sigterm_ends_transfers_at_once(
    tmp_path: Path, upstream: int, second: signal.Signals
) -> None:
    gateway = gateway_for(tmp_path, upstream, grace=600)
    try:
        download = Download(logged_in(gateway), "large.bin")
        download.start()
        gateway.proc.send_signal(signal.SIGTERM)
        wait_log(gateway, "Shutting down")
        gateway.proc.send_signal(second)
        download.join()
        assert wait_exit(gateway) == 0
    finally:
        gateway.stop()
    assert len(download.data) < len(LARGE)
    assert codes(download.replies) == ["426", "421"], download.replies
    assert "ending 1 transfers with 426 (second signal)" in gateway.log()


class _Reactor:
    """What the shutdown service asks of the reactor when a signal comes."""

    def __init__(self) -> None:
        self.from_thread: list[tuple[object, tuple[object, ...]]] = []
        self.stopped = 0
        self._exitSignal: int | None = None

    def callFromThread(self, f: object, *args: object) -> None:
        self.from_thread.append((f, args))

    def stop(self) -> None:
        self.stopped += 1


def test_the_first_signal_only_hands_the_stop_to_the_reactor() -> None:
    """A signal handler that logs can wait for ever on the log file's lock its own thread
    holds (Twisted's did). This one logs nothing and takes no lock until the reactor's turn."""
    from twisted.logger import globalLogPublisher

    from gateway.shutdown import GracefulShutdown

    reactor = _Reactor()
    service = GracefulShutdown(None, 60.0, reactor)  # type: ignore[arg-type]
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service._on_first_signal(signal.SIGTERM, None)
        assert events == [] and reactor.stopped == 0  # nothing in the handler itself
        ((stop, args),) = reactor.from_thread
        stop(*args)  # the reactor's turn
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert reactor.stopped == 1 and reactor._exitSignal == signal.SIGTERM
    assert [event.get("event") for event in events] == ["stop_requested"]
