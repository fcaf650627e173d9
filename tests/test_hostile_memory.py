"""Memory stays bounded whatever a peer sends or refuses to read: live attacks on a real gateway
process, in the style of `test_hostile.py` (whose helpers they share), each running for
several seconds while the gateway's RSS is sampled.

- a client writing into its own download connection, an upstream writing into its upload
  connection: the receiving side of a transfer carries nothing towards the gateway;
- a client that pipelines commands and reads none of the replies, whether the gateway answers
  them itself before login or a large STAT reply comes from the upstream: the gateway stops
  reading it and closes the session once `timeouts.control_send` has passed;
- an upstream that stops reading (and answering) its control connection while a client
  aborts transfer after transfer: 421 once it owes too many replies, not a growing backlog;
- an upstream flooding replies nobody asked for: 421, and two log lines, not one per reply.
"""

from __future__ import annotations

import contextlib
import ftplib
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import clients
import pytest
from gateway_process import GatewayProcess, StartGateway, start_gateway
from hostile_upstream import BIG_STAT_BYTES, JUNK_SECONDS, HostileUpstream, Mode
from servers import RunningServer
from test_hostile import (
    HEALTH,
    HEALTH_DATA,
    RSS_SLACK_KIB,
    TIMEOUT,
    after_attack,
    before_attack,
    login,
    login_hostile,
    tail,
    wait_for_log,
)

MIB = 1024 * 1024
CONTROL_SEND_TIMEOUT = 3.0
CONFIG = f"""\
allow_upstream = ["127.0.0.0/8"]
[timeouts]
data_connect = 2
control_send = {CONTROL_SEND_TIMEOUT:g}
"""
BIG = "big.bin"
BIG_DATA = random.Random(426).randbytes(8 * MIB)
ATTACK_SECONDS = 5.0
# What an attack may send at most: enough to show unbounded buffering many times over the
# RSS bound, little enough not to exhaust a shared test machine when the bound is missing.
ATTACK_BYTES = 160 * MIB


SERVED = {HEALTH: HEALTH_DATA, BIG: BIG_DATA}


@pytest.fixture
def gateway(gateways: StartGateway) -> GatewayProcess:
    return gateways(config=CONFIG)


class Peak:
    """The gateway's largest RSS growth over `base_kib`, sampled as an attack runs."""

    def __init__(self, gw: GatewayProcess, base_kib: int) -> None:
        self.gw = gw
        self.base_kib = base_kib
        self.grown_kib = 0

    def sample(self) -> None:
        self.grown_kib = max(self.grown_kib, self.gw.rss_kib() - self.base_kib)

    def check(self) -> None:
        self.sample()
        assert self.grown_kib < RSS_SLACK_KIB, (
            f"gateway RSS grew by {self.grown_kib} KiB during the attack (bound {RSS_SLACK_KIB})"
        )


def flood(
    sock: socket.socket,
    chunk: bytes | Callable[[], bytes],
    peak: Peak,
    *,
    seconds: float = ATTACK_SECONDS,
    most: int = ATTACK_BYTES,
    pause: float = 0.0,
) -> tuple[int, bool]:
    """Write `chunk` to `sock` for `seconds`, reading nothing, sampling the gateway's memory;
    (bytes written, whether the gateway closed the connection). The pace is at most `most`
    bytes over the `seconds`, so the attack lasts."""
    sock.setblocking(False)
    sent = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            if sent >= most * elapsed / seconds:
                time.sleep(0.002)
                continue
            _, writable, _ = select.select([], [sock], [], 0.1)
            peak.sample()
            if writable:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(chunk() if callable(chunk) else chunk)
            if pause:
                time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError):
        return sent, True
    finally:
        sock.setblocking(True)
    return sent, False


def assert_closed_soon(sock: socket.socket, timeout: float = 10.0) -> None:
    """The gateway closes (or resets) `sock` within `timeout`; what it sent is not read."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while sock.recv(1 << 20):
            assert time.monotonic() < deadline, "the gateway did not close the connection"
    except (ConnectionResetError, BrokenPipeError):
        pass


# ---------------------------------------------------------------- receiving side of a transfer


def test_client_writing_into_its_download_connection_is_not_stored(
    gateway: GatewayProcess,
    server: RunningServer,
) -> None:
    """RETR: the client's data connection carries nothing towards the gateway. A client that
    writes into it as fast as it can, while it reads nothing, does not grow the gateway; the
    download still completes, byte for byte, with 226."""
    base = before_attack(gateway, server)
    peak = Peak(gateway, base.rss_kib)
    ftp = login(gateway, server)
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    with socket.create_connection((host, port), timeout=TIMEOUT) as data:
        ftp.putcmd(f"RETR {BIG}")
        assert ftp.getmultiline().startswith("1")
        sent, closed = flood(data, b"\0" * 65536, peak)
        assert not closed, "the gateway gave up on a download that could still complete"
        assert sent > 4 * RSS_SLACK_KIB * 1024, f"the gateway read only {sent} bytes"
        peak.check()
        time.sleep(0.5)  # let the gateway read (and drop) the last of them
        received = clients.read_until_closed(data)
    assert ftp.getmultiline().startswith("226")
    assert received == BIG_DATA
    wait_for_log(gateway, "sent by the receiving side")
    ftp.quit()
    after_attack(base)


def test_upstream_writing_into_its_upload_connection_is_not_stored(
    gateway: GatewayProcess,
    server: RunningServer,
) -> None:
    """STOR: the upstream's data connection carries nothing towards the gateway; an upstream
    writing into it while the client uploads does not grow the gateway."""
    base = before_attack(gateway, server)
    peak = Peak(gateway, base.rss_kib)
    upload = random.Random(959).randbytes(2 * MIB)
    with HostileUpstream(Mode.JUNK_INTO_STOR) as up:
        ftp = login_hostile(gateway, up)
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        with socket.create_connection((host, port), timeout=TIMEOUT) as data:
            ftp.putcmd("STOR file")
            assert ftp.getmultiline().startswith("1")
            # Slowly, so the upload outlasts the upstream's writing into it.
            step = 32 * 1024
            pace = (JUNK_SECONDS + 1) / (len(upload) / step)
            for offset in range(0, len(upload), step):
                data.sendall(upload[offset : offset + step])
                peak.sample()
                time.sleep(pace)
            data.shutdown(socket.SHUT_WR)
            clients.read_until_closed(data)
        assert ftp.getmultiline().startswith("226")
        assert up.received == upload
        wrote = [event for event in up.events if event.startswith("wrote ")]
        assert wrote and int(wrote[0].split()[1]) > 4 * RSS_SLACK_KIB * 1024, wrote
        peak.check()
        ftp.quit()
    wait_for_log(gateway, "sent by the receiving side")
    after_attack(base)


# ------------------------------------------------------------------- control back-pressure


def test_client_not_reading_pre_login_replies_is_not_read_and_is_closed(
    gateway: GatewayProcess,
    server: RunningServer,
) -> None:
    """Before any login, a client pipelines USER lines whose 501 replies echo their long
    argument, and reads nothing: the gateway stops reading it once its replies fill the
    buffer, and closes it after `timeouts.control_send`."""
    base = before_attack(gateway, server)
    peak = Peak(gateway, base.rss_kib)
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT) as sock:
        assert sock.recv(4096).startswith(b"220")
        line = b"USER a@host:" + b"9" * 1800 + b"\r\n"
        _, closed = flood(sock, line * 32, peak, seconds=CONTROL_SEND_TIMEOUT + 5)
        peak.check()
        assert closed, "the gateway did not close a client that read nothing for long"
        assert_closed_soon(sock)
    wait_for_log(gateway, "left its control connection unread")
    after_attack(base)


def test_client_not_reading_large_stat_replies_pauses_the_upstream(
    gateway: GatewayProcess,
    server: RunningServer,
) -> None:
    """A client that sends STAT after STAT and reads none of the large replies: the gateway
    stops reading the upstream and the client, holds about one reply, and ends the session
    after `timeouts.control_send`."""
    base = before_attack(gateway, server)
    peak = Peak(gateway, base.rss_kib)
    with HostileUpstream(Mode.BIG_STAT) as up:
        ftp = login_hostile(gateway, up)
        sock = ftp.sock
        assert sock is not None
        # One STAT every 20 ms: slow enough that the session never has many queued, and
        # 50 replies (12 MiB) a second if the gateway took them all.
        limit = 200 * BIG_STAT_BYTES
        flood(sock, b"STAT\r\n", peak, seconds=CONTROL_SEND_TIMEOUT + 3, most=limit, pause=0.02)
        peak.check()
        assert_closed_soon(sock)
        ftp.close()
        stats = [event for event in up.events if event == "command STAT"]
        assert len(stats) < 20, f"the upstream was asked {len(stats)} times"
    wait_for_log(gateway, "left its control connection unread")
    after_attack(base)


def test_aborts_while_the_upstream_stops_reading_end_with_421(
    gateway: GatewayProcess,
    server: RunningServer,
) -> None:
    """After login the upstream stops reading its control connection and answers nothing. The
    client starts a transfer and aborts it, over and over, reading every reply: each cycle
    has the gateway send EPSV and ABOR upstream and answer the client at once (200, 426,
    226). The gateway must not keep sending, and remembering, commands that are never
    answered: once the upstream owes a few dozen replies the session ends with 421."""
    base = before_attack(gateway, server)
    peak = Peak(gateway, base.rss_kib)
    with HostileUpstream(Mode.DEAF_AFTER_LOGIN) as up:
        ftp = login_hostile(gateway, up)
        sock = ftp.sock
        assert sock is not None
        replies = bytearray()

        def read_replies() -> None:
            with contextlib.suppress(OSError):
                while (chunk := sock.recv(1 << 16)) and len(replies) < 1 << 20:
                    replies.extend(chunk)

        reader = threading.Thread(target=read_replies, daemon=True)
        reader.start()
        cycle = b"PORT 127,0,0,1,200,1\r\nRETR file\r\nABOR\r\n" * 64
        sent, closed = 0, False
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < ATTACK_SECONDS and reader.is_alive():
                sock.sendall(cycle)
                sent += 1
                peak.sample()
        reader.join(timeout=10)
        closed = not reader.is_alive()
        assert closed, f"the gateway kept the session after {sent * 64} aborted transfers"
        text = bytes(replies).decode("latin-1")
        assert "421 The upstream server left" in text, text[-300:]
        peak.check()
        ftp.close()
    wait_for_log(gateway, "commands unanswered")
    after_attack(base)


def test_upstream_answering_without_reading_stops_the_client_being_read(
    tmp_path: Path,
    server: RunningServer,
) -> None:
    """After login the upstream stops reading its control connection but still answers each
    command (as the test allows it, once the gateway has sent that command). A client that
    keeps sending 64 KiB NOOP lines would have the gateway write them towards the upstream
    without bound; instead, once 64 KiB wait unsent, the gateway stops reading the client, and
    after `timeouts.control_send` the session ends with 421."""
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG + "[limits]\nmax_line = 65536\n")
    gw = start_gateway(tmp_path, "--config", str(config))
    try:
        base = before_attack(gw, server)
        peak = Peak(gw, base.rss_kib)
        with HostileUpstream(Mode.ANSWERS_WITHOUT_READING) as up:
            ftp = login_hostile(gw, up)
            sock = ftp.sock
            assert sock is not None
            noop = b"NOOP " + b"x" * (65536 - 8) + b"\r\n"
            depth = 4  # commands sent ahead, so the next is queued when a reply arrives
            sock.sendall(noop * depth)
            time.sleep(0.5)  # the gateway has sent the first one on
            up.allow_reply()
            sent, answered, last = depth, 0, ""
            started = time.monotonic()
            while time.monotonic() - started < ATTACK_SECONDS + CONTROL_SEND_TIMEOUT + 5:
                last = ftp.getline()
                peak.sample()
                if not last.startswith("200"):
                    break
                answered += 1
                up.allow_reply()  # the gateway sent the next command before this reply
                if sent * len(noop) < ATTACK_BYTES:
                    sock.sendall(noop)
                    sent += 1
            assert last.startswith("421"), f"{answered} of {sent} answered, then {last!r}"
            peak.check()
            ftp.close()
        wait_for_log(gw, "The upstream left its control connection unread")
        after_attack(base)
    finally:
        gw.stop()


# --------------------------------------------------------------------- unsolicited replies


def test_unsolicited_reply_flood_ends_with_421_and_two_log_lines(
    gateway: GatewayProcess,
    server: RunningServer,
) -> None:
    base = before_attack(gateway, server)
    with HostileUpstream(Mode.UNSOLICITED_FLOOD) as up:
        ftp = login_hostile(gateway, up)
        assert ftp.sendcmd("NOOP").startswith("200")
        started = time.monotonic()
        answer = ftp.getmultiline()
        assert answer.startswith("421") and "unsolicited" in answer, answer
        assert time.monotonic() - started < 10
        ftp.close()
        deadline = time.monotonic() + 5
        while not any("cut off" in event for event in up.events):
            assert time.monotonic() < deadline, f"the gateway kept reading: {up.events}"
            time.sleep(0.05)
    log = wait_for_log(gateway, "unsolicited replies in all")
    assert log.count("Unsolicited upstream reply") == 1, tail(gateway)
    assert len(log) < 64 * 1024, f"{len(log)} bytes of log"
    after_attack(base)
