"""Hostile input against a live gateway: each case runs a real gateway process (forward mode,
so one gateway serves hostile and honest upstreams alike) and checks

- a clear FTP reply with the right code, or a clean close;
- the gateway process still running and its log saying what happened;
- a normal session opened before the attack (the bystander) still working afterwards, and a
  new one too: other sessions are unaffected;
- where the attack is about volume, bounded memory (`RSS_SLACK_KIB`) and no leaked file
  descriptors.

Clients are real sockets or ftplib; honest upstreams are pyftpdlib; hostile ones are
`hostile_upstream.HostileUpstream`.
"""

from __future__ import annotations

import ftplib
import io
import os
import random
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import clients
import pytest
from clients import reset
from gateway_process import GatewayProcess, StartGateway
from hostile_upstream import HostileUpstream, Mode
from servers import RunningServer, start_server

MIB = 1024 * 1024
TIMEOUT = 30.0
HEALTH = "health.bin"
HEALTH_DATA = random.Random(959).randbytes(MIB)
PAYLOAD = random.Random(2577).randbytes(4 * MIB)  # what hostile upstreams serve

# Memory. The gateway bounds what one session may hold: control lines to `max_line` (4 KiB),
# upstream replies to `max_reply_bytes` (256 KiB), queued commands to `max_pending_commands`
# (32), and data moves with producer/consumer back-pressure, so one attack session costs well
# under 1 MiB. 16 MiB leaves room for the allocator and Twisted's 64 KiB reads, and is still
# far below what the volume attacks would cost if they were buffered: the long line streams
# 32 MiB, the endless replies never end.
RSS_SLACK_KIB = 16 * 1024
# 1,000 sessions open at once cost their Python objects (protocol, session, reader, timers,
# transport: tens of KiB each); 50 MiB allows about 50 KiB per session.
RSS_SLACK_MANY_SESSIONS_KIB = 50 * 1024
# File descriptors the gateway may open or close for reasons of its own (log rotation, a
# resolver thread): small slack, far below the 1,000 a leak per connection would show.
FD_SLACK = 4

CONFIG = """\
allow_upstream = ["127.0.0.0/8"]
[timeouts]
data_connect = 2
"""
DATA_CONNECT_TIMEOUT = 2.0

_REPLY_LINE = re.compile(rb"([1-5][0-9][0-9])([ -])")


# ---------------------------------------------------------------------------------- fixtures


SERVED = {HEALTH: HEALTH_DATA}


@pytest.fixture
def gateway(gateways: StartGateway) -> GatewayProcess:
    return gateways(config=CONFIG)


# ----------------------------------------------------------------------------------- helpers


def connect(gw: GatewayProcess, source: str | None = None) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(gw.host, gw.port, source_address=(source, 0) if source else None)
    return ftp


def control(ftp: ftplib.FTP) -> socket.socket:
    """The control socket of a connected ftplib session, to write raw bytes to."""
    assert ftp.sock is not None
    return ftp.sock


def login(gw: GatewayProcess, server: RunningServer) -> ftplib.FTP:
    """A normal forward-mode session: USER name@host:port through the gateway."""
    user = f"{server.user}@{server.host}:{server.port}"
    return clients.login(gw.host, gw.port, user, server.password, timeout=TIMEOUT)


def login_hostile(gw: GatewayProcess, upstream: HostileUpstream) -> ftplib.FTP:
    user = f"anon@{upstream.host}:{upstream.port}"
    return clients.login(gw.host, gw.port, user, "secret", timeout=TIMEOUT)


def assert_download_works(ftp: ftplib.FTP) -> None:
    data, final = clients.retr_passive(ftp, HEALTH, TIMEOUT)
    assert final.startswith("226"), final
    assert data == HEALTH_DATA


def fd_count(gw: GatewayProcess) -> int:
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


def wait_for_log(gw: GatewayProcess, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = gw.log()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the gateway log; its end:\n{tail(gw)}")
        time.sleep(0.05)


def assert_listener_closes(host: str, port: int, timeout: float = 2.0) -> None:
    """The listener at host:port stops accepting within `timeout` (Twisted closes a stopped
    port's socket on its next reactor turn, so allow a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as late:
                assert clients.read_until_closed(late) == b"", "a late connection was given data"
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"{host}:{port} still accepts connections"
        time.sleep(0.05)


def tail(gw: GatewayProcess, size: int = 3000) -> str:
    return gw.log()[-size:]


def nothing_connected(listener: socket.socket, wait: float = 0.5) -> bool:
    """True when no connection is waiting in `listener`'s accept queue."""
    readable, _, _ = select.select([listener], [], [], wait)
    return not readable


@dataclass
class Baseline:
    """The state before an attack: a working bystander session and the gateway's memory."""

    gw: GatewayProcess
    server: RunningServer
    bystander: ftplib.FTP
    rss_kib: int


def before_attack(gw: GatewayProcess, server: RunningServer) -> Baseline:
    bystander = login(gw, server)
    assert_download_works(bystander)  # also warms up the gateway before measuring its memory
    return Baseline(gw, server, bystander, gw.rss_kib())


def after_attack(base: Baseline, rss_slack_kib: int = RSS_SLACK_KIB) -> None:
    """The gateway survived: still running, the bystander and a new session both work, and
    memory grew by less than `rss_slack_kib`."""
    gw = base.gw
    assert gw.proc.poll() is None, f"the gateway died:\n{tail(gw)}"
    assert base.bystander.voidcmd("NOOP").startswith("200")
    assert_download_works(base.bystander)
    fresh = login(gw, base.server)
    assert_download_works(fresh)
    fresh.quit()
    base.bystander.quit()
    grown = gw.rss_kib() - base.rss_kib
    assert grown < rss_slack_kib, f"gateway RSS grew by {grown} KiB (bound {rss_slack_kib})"
    assert gw.proc.poll() is None


# ------------------------------------------------------------------- random command streams

# Verbs the stream draws from. Left out on purpose: QUIT (ends the stream), PASV/EPSV (each
# unused listener costs `data_connect` seconds; tested on its own below), NOOP (the stream's
# sentinel); before login USER, OPEN and SITE (they would resolve random host names), after
# login USER, PASS and REIN (pyftpdlib delays each failed login by 3 seconds).
_COMMON = [
    "ACCT",
    "CWD",
    "CDUP",
    "PWD",
    "TYPE",
    "MODE",
    "STRU",
    "RETR",
    "STOR",
    "STOU",
    "APPE",
    "LIST",
    "NLST",
    "MLSD",
    "PORT",
    "EPRT",
    "LPRT",
    "LPSV",
    "REST",
    "ABOR",
    "FEAT",
    "SYST",
    "HELP",
    "STAT",
    "AUTH",
    "PBSZ",
    "PROT",
    "CCC",
    "MKD",
    "RMD",
    "DELE",
    "RNFR",
    "RNTO",
    "SIZE",
    "MDTM",
    "MLST",
    "ALLO",
    "OPTS",
]
VERBS_BEFORE_LOGIN = [*_COMMON, "PASS"]
VERBS_AFTER_LOGIN = [*_COMMON, "OPEN", "SITE", "XPWD", "XMKD"]
STREAM_TIMEOUT = 10.0
_PRINTABLE = bytes(range(0x20, 0x7F))
_ANY_BUT_LF = bytes(b for b in range(256) if b != 0x0A)


def _closed_port(host: str) -> int:
    """A port of `host` that is bound and never listens, held for the whole run, so a data
    connection to it is refused at once. The random streams' PORT and EPRT name it instead of a
    random port, where another process (an FTP server of another test) may be listening and
    make a transfer wait for its stall timeout."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = socket.socket(family, socket.SOCK_STREAM)
    held.bind((host, 0))
    _HELD_PORTS.append(held)
    return int(held.getsockname()[1])


_HELD_PORTS: list[socket.socket] = []
_CLOSED = {"127.0.0.1": _closed_port("127.0.0.1"), "::1": _closed_port("::1")}


def _random_arg(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.25:
        return b""
    if kind < 0.45:
        return bytes(rng.choices(_PRINTABLE, k=rng.randint(1, 40)))
    if kind < 0.55:
        numbers = ",".join(str(rng.randint(0, 300)) for _ in range(rng.randint(1, 7)))
        return numbers.encode()
    if kind < 0.62:  # the client's own address: a PORT the gateway accepts (refused port)
        rng.randint(4, 255), rng.randint(0, 255)  # keep the stream as it was
        port = _CLOSED["127.0.0.1"]
        return f"127,0,0,1,{port >> 8},{port & 0xFF}".encode()
    if kind < 0.7:
        family, host = rng.choice([("1", "127.0.0.1"), ("2", "::1"), ("x", "h"), ("1", "")])
        port = rng.randint(0, 70000)
        if host in _CLOSED and 1024 <= port <= 65535:
            port = _CLOSED[host]
        return f"|{family}|{host}|{port}|".encode()
    if kind < 0.93:  # anything but LF: CR, NUL, Telnet IAC, invalid UTF-8
        return bytes(rng.choices(_ANY_BUT_LF, k=rng.randint(1, 60)))
    # Around the gateway's max_line (4096): relayed below it, refused with 500 above it.
    return b"x" * rng.randint(4000, 6000)


def _random_line(rng: random.Random, verbs: list[str]) -> bytes:
    if rng.random() < 0.15:
        body = bytes(rng.choices(_ANY_BUT_LF, k=rng.randint(0, 100)))
    else:
        verb = rng.choice(verbs)
        verb = verb.lower() if rng.random() < 0.2 else verb
        arg = _random_arg(rng)
        body = verb.encode() + (b" " + arg if arg else b"")
    return body + rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n"])


def read_reply(stream: io.BufferedReader) -> bytes | None:
    """One complete reply (RFC 959 section 4.2), or None at end of stream; asserts that every
    reply is well formed: a code from 100 to 599, a multi-line reply ended by its own code."""
    first = stream.readline(65536)
    if not first:
        return None
    match = _REPLY_LINE.match(first)
    assert match is not None, f"malformed reply line {first[:200]!r}"
    if match.group(2) == b" ":
        return first
    lines = [first]
    while True:
        line = stream.readline(65536)
        assert line, f"end of stream inside a multi-line reply {b''.join(lines)[:500]!r}"
        lines.append(line)
        if line.startswith(match.group(1) + b" "):
            return b"".join(lines)


class StreamClient:
    """A raw control connection that sends a chunk of lines and a NOOP sentinel, then reads
    replies up to the sentinel's: every line must be answered before the sentinel is."""

    def __init__(self, gw: GatewayProcess, server: RunningServer, logged_in: bool) -> None:
        self.gw = gw
        self.sock = socket.create_connection((gw.host, gw.port), timeout=STREAM_TIMEOUT)
        self.file = self.sock.makefile("rb")
        greeting = read_reply(self.file)
        assert greeting is not None and greeting.startswith(b"220")
        if logged_in:
            self.sock.sendall(f"USER {server.user}@{server.host}:{server.port}\r\n".encode())
            assert (read_reply(self.file) or b"").startswith(b"331")
            self.sock.sendall(f"PASS {server.password}\r\nTYPE I\r\n".encode())
            assert (read_reply(self.file) or b"").startswith(b"230")
            assert (read_reply(self.file) or b"").startswith(b"200")
        self.sock.sendall(b"NOOP\r\n")
        self.sentinel = read_reply(self.file)
        assert self.sentinel is not None and self.sentinel.startswith(b"200")

    def exchange(self, chunk: bytes) -> list[bytes] | None:
        """The replies to `chunk`, or None when the gateway closed the session (after 421)."""
        replies: list[bytes] = []
        try:
            # A chunk may end inside a Telnet option (IAC WILL, then its option byte): the
            # leading CRLF makes sure the sentinel starts a line of its own.
            self.sock.sendall(chunk + b"\r\nNOOP\r\n")
            while (answer := read_reply(self.file)) != self.sentinel:
                if answer is None:
                    assert replies and replies[-1].startswith(b"421"), (
                        f"session closed without a 421; last replies {replies[-3:]}"
                    )
                    return None
                replies.append(answer)
        except (BrokenPipeError, ConnectionResetError):
            return None
        except TimeoutError:
            unsolicited = [
                line for line in self.gw.log().splitlines() if "Unsolicited upstream reply" in line
            ]
            sent = [line[:80] for line in chunk.split(b"\n")]
            raise AssertionError(
                f"no reply to the sentinel NOOP within {STREAM_TIMEOUT:g} s.\n"
                f"lines sent: {sent}\n"
                f"replies: {[r[:80] for r in replies]}\ngateway: {unsolicited}"
            ) from None
        return replies

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_command_streams(gateway: GatewayProcess, server: RunningServer, seed: int) -> None:
    base = before_attack(gateway, server)
    rng = random.Random(seed)
    lines = closes = 0
    for logged_in, verbs, chunks in (
        (False, VERBS_BEFORE_LOGIN, 10),
        (True, VERBS_AFTER_LOGIN, 30),
    ):
        client = StreamClient(gateway, server, logged_in)
        for _ in range(chunks):
            batch = [_random_line(rng, verbs) for _ in range(rng.randint(1, 16))]
            lines += len(batch)
            if client.exchange(b"".join(batch)) is None:
                closes += 1
                client.close()
                client = StreamClient(gateway, server, logged_in)
        client.close()
    assert lines > 250
    assert closes <= 2, f"{closes} sessions closed by the gateway during the random streams"
    after_attack(base)


@pytest.fixture(scope="module", params=["vsftpd", "pure-ftpd", "proftpd"])
def other_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with start_server(request.param, tmp_path_factory.mktemp(request.param)) as running:
        for name, data in SERVED.items():
            (running.root / name).write_bytes(data)
            (running.root / name).chmod(0o644)
        yield running


@pytest.mark.parametrize("seed", [4, 5])
def test_random_command_streams_against_other_servers(
    gateway: GatewayProcess, other_server: RunningServer, seed: int
) -> None:
    """The same streams with vsftpd, pure-ftpd and proftpd upstream: each answers the odd
    commands, ABOR and the refused data connections its own way."""
    test_random_command_streams(gateway, other_server, seed)


# ------------------------------------------------------------------------ hostile clients


def test_megabyte_line_without_crlf_gets_500_and_is_not_buffered(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    ftp = login(gateway, server)
    control(ftp).sendall(b"NOOP " + b"A" * MIB)  # 1 MiB and no line end
    # The 500 comes as soon as the line passes max_line, long before it ends.
    answer = ftp.getline()
    assert answer.startswith("500") and "too long" in answer, answer
    try:
        # 31 MiB more of the same line: a gateway buffering it would now hold 32 MiB.
        for _ in range(31):
            control(ftp).sendall(b"B" * MIB)
        control(ftp).sendall(b"\r\n")
        still_open = True
    except (BrokenPipeError, ConnectionResetError):
        still_open = False  # closing the session is an acceptable answer too
    if still_open:
        # One 500 for the whole line, and the session carries on where the line ended.
        assert ftp.voidcmd("NOOP").startswith("200")
        assert_download_works(ftp)
        ftp.quit()
    after_attack(base)


def test_nul_and_non_utf8_bytes(gateway: GatewayProcess, server: RunningServer) -> None:
    base = before_attack(gateway, server)
    ftp = login(gateway, server)
    client_port = control(ftp).getsockname()[1]
    cases = [
        (b"NOOP\x00\r\n", "500"),  # NUL: the gateway refuses, nothing reaches the upstream
        (b"\x00\x00\x00\r\n", "500"),
        (b"RETR a\x00b\r\n", "500"),
        (b"\xc3\x28\xa0\xa1 x\r\n", "500"),  # not UTF-8, and not a verb
        (b"\x80\x81\x82\r\n", "500"),
        (b"CWD \xc3\x28\xa0\xa1\xfe\x80\r\n", "550"),  # relayed byte for byte: no such directory
        (b"NOOP\r\n", "200"),
    ]
    control(ftp).sendall(b"".join(line for line, _ in cases))
    answers = [ftp.getmultiline() for _ in cases]
    assert [a[:3] for a in answers] == [code for _, code in cases], answers
    assert_download_works(ftp)
    ftp.quit()
    # The log still works after logging those bytes (it records the session's end).
    wait_for_log(gateway, f"Session ended: client 127.0.0.1:{client_port},")
    after_attack(base)


@pytest.mark.parametrize(
    ("name", "flood", "expected"),
    [
        pytest.param("IAC NOP", b"\xff\xf1" * (MIB // 2), ["200"], id="IAC-NOP"),
        pytest.param("IAC WILL", b"\xff\xfb\x01" * (MIB // 3), ["200"], id="IAC-WILL"),
        # IAC IAC is a data byte 255: a 1 MiB line of them is too long, then NOOP works.
        pytest.param("IAC IAC", b"\xff\xff" * (MIB // 2) + b"\r\n", ["500", "200"], id="IAC-IAC"),
    ],
)
def test_telnet_iac_flood(
    gateway: GatewayProcess, server: RunningServer, name: str, flood: bytes, expected: list[str]
) -> None:
    base = before_attack(gateway, server)
    ftp = login(gateway, server)
    started = time.monotonic()
    control(ftp).sendall(flood + b"NOOP\r\n")
    answers = [ftp.getmultiline() for _ in expected]
    assert [a[:3] for a in answers] == expected, answers
    assert time.monotonic() - started < 15, f"{name}: 1 MiB flood took too long to digest"
    assert ftp.voidcmd("NOOP").startswith("200")  # nothing else was owed
    ftp.quit()
    after_attack(base)


def test_slowloris_clients_do_not_hold_up_other_sessions(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    slow = [connect(gateway, source=f"127.0.3.{i}") for i in range(1, 11)]
    message = b"NOOP\r\n"
    done = threading.Event()

    def dribble() -> None:  # one byte a second to every slow client, for five seconds
        for i, byte in enumerate(message):
            if i:
                time.sleep(1.0)
            for ftp in slow:
                control(ftp).sendall(bytes([byte]))
        done.set()

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    transfers = 0
    while not done.is_set():
        started = time.monotonic()
        assert_download_works(base.bystander)
        assert time.monotonic() - started < 2.0, "a transfer was held up by the slow clients"
        transfers += 1
    thread.join()
    assert transfers >= 3
    for ftp in slow:  # the slow clients are served too, once their line is complete
        assert ftp.getline().startswith("200")
        ftp.close()
    after_attack(base)


def test_thousand_connections_opened_and_dropped(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    fds_before = fd_count(gateway)
    started = time.monotonic()
    held: list[socket.socket] = []
    for i in range(1000):
        # 40 source addresses, 25 connections each: under max_sessions_per_ip (50), so the
        # gateway really holds (up to max_sessions of) them at once.
        source = (f"127.0.4.{1 + i % 40}", 0)
        sock = socket.create_connection((gateway.host, gateway.port), TIMEOUT, source)
        if i % 4 == 1:
            sock.recv(100)  # the greeting (or 421 once max_sessions is reached)
        elif i % 4 == 2:
            sock.sendall(b"USER anon")  # half a command
        elif i % 4 == 3:
            sock.sendall(bytes(random.Random(i).choices(_ANY_BUT_LF, k=200)))
        held.append(sock)
    deadline = time.monotonic() + 10
    while (count := fd_count(gateway)) < fds_before + 900:  # it really holds them at once
        assert time.monotonic() < deadline, f"the gateway holds only {count} descriptors"
        time.sleep(0.05)
    for i, sock in enumerate(held):  # drop: FIN or RST, with or without unread data
        if i % 2:
            reset(sock)
        else:
            sock.close()
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"1,000 connections took {elapsed:.1f} s"
    assert gateway.proc.poll() is None

    def settle(what: str) -> None:
        deadline = time.monotonic() + 10
        while (count := fd_count(gateway)) > fds_before + FD_SLACK:
            assert time.monotonic() < deadline, (
                f"{what}: the gateway holds {count} file descriptors, {fds_before} before"
            )
            time.sleep(0.1)

    settle("after dropping 1,000 connections")
    # Per-address session counts came back down: 50 more from one of those addresses are
    # all admitted (a leak of its 25 would refuse some with 421).
    again = [connect(gateway, source="127.0.4.1") for _ in range(50)]
    assert all(ftp.getwelcome().startswith("220") for ftp in again)
    for ftp in again:
        ftp.close()
    settle("after 50 more sessions")
    after_attack(base, RSS_SLACK_MANY_SESSIONS_KIB)


def test_pasv_port_never_connected_gets_425(gateway: GatewayProcess, server: RunningServer) -> None:
    base = before_attack(gateway, server)
    ftp = login(gateway, server)
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    started = time.monotonic()
    ftp.putcmd(f"RETR {HEALTH}")
    answers = [ftp.getmultiline()]
    while answers[-1].startswith("1"):  # the upstream's 150 may come first
        answers.append(ftp.getmultiline())
    elapsed = time.monotonic() - started
    assert answers[-1].startswith("425"), answers
    assert elapsed < DATA_CONNECT_TIMEOUT + 3, f"425 only after {elapsed:.1f} s"
    wait_for_log(gateway, f"no data connection within {DATA_CONNECT_TIMEOUT:g} seconds")
    assert_listener_closes(host, port)
    assert ftp.voidcmd("NOOP").startswith("200")
    assert_download_works(ftp)
    ftp.quit()
    after_attack(base)


def test_second_host_on_pasv_port_is_dropped(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    ftp = login(gateway, server)
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    ftp.putcmd(f"RETR {HEALTH}")
    assert ftp.getmultiline().startswith("1")  # the transfer is under way, data waiting
    # Another host races the client to the advertised port (RFC 2577 section 5).
    thief = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.2", 0))
    stolen = clients.read_until_closed(thief)
    thief.close()
    assert stolen == b"", f"a second host got {len(stolen)} bytes of the client's file"
    with socket.create_connection((host, port), timeout=TIMEOUT) as data:
        received = clients.read_until_closed(data)
    assert ftp.getmultiline().startswith("226")
    assert received == HEALTH_DATA
    log = wait_for_log(gateway, "possible data-port theft")
    assert "127.0.0.2" in log
    # Logged with the session's id, so the victim's session can be found.
    assert re.search(r"#warn\] \[[0-9a-f]{8}\] Dropped data connection from 127\.0\.0\.2", log)
    assert_listener_closes(host, port)  # one connection per listener, then it closes
    ftp.quit()
    after_attack(base)


@pytest.mark.parametrize(
    ("command", "code", "foreign"),
    [
        ("PORT 127,0,0,2,{p1},{p2}", "500", True),  # another host's address
        ("PORT 192,0,2,1,{p1},{p2}", "500", False),  # a remote address
        ("PORT 127,0,0,1,0,21", "504", False),  # the client's own address, privileged port
        ("EPRT |1|127.0.0.2|{port}|", "500", True),
        ("EPRT |1|127.0.0.1|25|", "504", False),
    ],
)
def test_port_and_eprt_bounce_is_refused(
    gateway: GatewayProcess, server: RunningServer, command: str, code: str, foreign: bool
) -> None:
    base = before_attack(gateway, server)
    # The third host the bounce aims at: it must never see a connection.
    with socket.create_server(("127.0.0.2", 0)) as victim:
        port = victim.getsockname()[1]
        ftp = login(gateway, server)
        line = command.format(p1=port >> 8, p2=port & 0xFF, port=port)
        ftp.putcmd(line)
        try:
            answer = ftp.getmultiline()
        except EOFError:
            pytest.fail(
                f"the gateway closed the session instead of answering {line!r}:\n{tail(gateway)}"
            )
        assert answer.startswith(code), answer
        ftp.putcmd(f"RETR {HEALTH}")  # the refused PORT left no data target behind
        assert ftp.getmultiline().startswith("425")
        if foreign:
            assert nothing_connected(victim), "the gateway connected to the bounce target"
    wait_for_log(gateway, "bounce")
    ftp.set_pasv(False)  # a legitimate PORT still works in the same session
    assert_download_works_active(ftp)
    ftp.quit()
    after_attack(base)


def assert_download_works_active(ftp: ftplib.FTP) -> None:
    chunks: list[bytes] = []
    assert ftp.retrbinary(f"RETR {HEALTH}", chunks.append).startswith("226")
    assert b"".join(chunks) == HEALTH_DATA


# ----------------------------------------------------------------------- hostile upstreams


def test_hostile_upstream_harness_serves_a_normal_transfer(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    """The harness itself is sound, so the failures below are the hostile behaviour's."""
    with HostileUpstream(Mode.NORMAL, payload=PAYLOAD) as upstream:
        ftp = login_hostile(gateway, upstream)
        data, final = clients.retr_passive(ftp, "file", TIMEOUT)
        assert final.startswith("226"), final
        assert data == PAYLOAD
        ftp.quit()


def _third_host_listener() -> socket.socket:
    """A listener on 127.0.0.2 whose port is also free on 127.0.0.1, where the hostile upstream
    listens "at the same port" (another process on a busy machine may hold it there)."""
    for _ in range(50):
        third_host = socket.create_server(("127.0.0.2", 0))
        try:
            socket.create_server(("127.0.0.1", third_host.getsockname()[1])).close()
        except OSError:
            third_host.close()
            continue
        return third_host
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def test_upstream_227_naming_a_third_host_is_not_followed(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    with _third_host_listener() as third_host:
        named = ("127.0.0.2", third_host.getsockname()[1])
        with HostileUpstream(Mode.THIRD_HOST_PASV, payload=PAYLOAD, pasv_address=named) as up:
            ftp = login_hostile(gateway, up)
            data, final = clients.retr_passive(ftp, "file", TIMEOUT)
            assert final.startswith("226"), final
            assert data == PAYLOAD  # from the control peer's address, at the named port
            assert up.data_peers == ["127.0.0.1"]
            assert "227 named 127.0.0.2:" + str(named[1]) in up.events
            ftp.quit()
        assert nothing_connected(third_host), "the gateway followed the 227 to a third host"
    wait_for_log(gateway, "possible reverse bounce")
    after_attack(base)


_GREETING_ATTACKS = (Mode.ENDLESS_GREETING, Mode.ENDLESS_1XX_GREETING, Mode.BAD_CODE)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        (Mode.ENDLESS_GREETING, "reply of more than 1000 lines"),
        (Mode.ENDLESS_1XX_GREETING, "reply of more than 1000 lines"),
        (Mode.ENDLESS_REPLY, "reply of more than 1000 lines"),
        (Mode.LONG_LINE, "reply line longer than 4096 bytes"),
        (Mode.BAD_CODE, "not an FTP reply"),
        (Mode.GARBAGE_REPLY, "not an FTP reply"),
    ],
)
def test_upstream_breaking_the_reply_grammar_ends_the_session_with_421(
    gateway: GatewayProcess, server: RunningServer, mode: Mode, reason: str
) -> None:
    base = before_attack(gateway, server)
    with HostileUpstream(mode) as up:
        ftp = connect(gateway)
        if mode in _GREETING_ATTACKS:  # the greeting is the attack
            ftp.putcmd(f"USER anon@{up.host}:{up.port}")
        else:  # a reply in the middle of a session is
            ftp.login(f"anon@{up.host}:{up.port}", "secret")
            ftp.putcmd("PWD")
        started = time.monotonic()
        answer = ftp.getmultiline()
        assert answer.startswith("421") and reason in answer, answer
        with pytest.raises((EOFError, ConnectionResetError)):
            ftp.getline()  # and the session is closed
        assert time.monotonic() - started < 10
        ftp.close()
        wait_for_log(gateway, f"Upstream protocol error: {reason}")
        if mode in (Mode.ENDLESS_GREETING, Mode.ENDLESS_1XX_GREETING, Mode.ENDLESS_REPLY):
            deadline = time.monotonic() + 5
            while not any("cut off" in event for event in up.events):
                assert time.monotonic() < deadline, f"the gateway kept reading: {up.events}"
                time.sleep(0.05)
    after_attack(base)


def test_endless_1xx_replies_to_a_command_end_the_session_with_421(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    """Single-line 1yz replies count towards the bounds of the reply to the same command, as
    in the greeting: an upstream answering PWD with "150" lines forever is cut off at
    `limits.max_reply_lines`, though the client is shown the 1yz lines that came before."""
    base = before_attack(gateway, server)
    with HostileUpstream(Mode.ENDLESS_1XX_REPLY) as up:
        ftp = login_hostile(gateway, up)
        ftp.putcmd("PWD")
        started = time.monotonic()
        preliminary = 0
        while (answer := ftp.getline()).startswith("1"):
            preliminary += 1
            assert preliminary <= 1000, "more 1yz lines than limits.max_reply_lines"
            assert time.monotonic() - started < 10
        reason = "reply of more than 1000 lines"
        assert answer.startswith("421") and reason in answer, answer
        with pytest.raises((EOFError, ConnectionResetError)):
            ftp.getline()  # and the session is closed
        ftp.close()
        wait_for_log(gateway, f"Upstream protocol error: {reason}")
        deadline = time.monotonic() + 5
        while not any("cut off" in event for event in up.events):
            assert time.monotonic() < deadline, f"the gateway kept reading: {up.events}"
            time.sleep(0.05)
    after_attack(base)


def test_upstream_reset_mid_retr_gives_426_not_its_226(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    with HostileUpstream(Mode.RESET_MID_RETR, payload=PAYLOAD) as up:
        ftp = login_hostile(gateway, up)
        data, final = clients.retr_passive(ftp, "file", TIMEOUT)
        assert final.startswith("426"), final  # the upstream claimed 226 after its reset
        assert len(data) < len(PAYLOAD) and PAYLOAD.startswith(data)
        assert any("reset the data connection" in event for event in up.events)
        wait_for_log(gateway, "Transfer download failed")
        assert ftp.voidcmd("NOOP").startswith("200")  # the session and its pairing survive
        ftp.quit()
    after_attack(base)


def test_upstream_early_close_then_426_reaches_client_as_4xx(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    base = before_attack(gateway, server)
    with HostileUpstream(Mode.EARLY_CLOSE_426, payload=PAYLOAD) as up:
        ftp = login_hostile(gateway, up)
        data, final = clients.retr_passive(ftp, "file", TIMEOUT)
        assert final.startswith("4"), final  # the upstream's 426, not a 226
        assert data == PAYLOAD[: len(PAYLOAD) // 4]  # what the upstream sent, relayed as is
        assert ftp.voidcmd("NOOP").startswith("200")
        ftp.quit()
    after_attack(base)


def test_unsolicited_upstream_reply_is_not_paired_with_the_next_command(
    gateway: GatewayProcess, server: RunningServer
) -> None:
    """An upstream answering one command twice must not shift the pairing of replies: the
    extra reply arrived before the gateway sent the next command, so it cannot be its reply."""
    base = before_attack(gateway, server)
    with HostileUpstream(Mode.DOUBLE_REPLY) as up:
        ftp = login_hostile(gateway, up)
        control(ftp).sendall(b"NOOP\r\nPWD\r\n")  # pipelined: PWD waits in the gateway's queue
        first, second = ftp.getmultiline(), ftp.getmultiline()
        assert first.startswith("200"), first
        assert second.startswith(("257", "421")), f"PWD was answered with {second!r}"
        if second.startswith("257"):
            assert ftp.voidcmd("PWD").startswith("257")  # still in step
            ftp.quit()
        else:
            ftp.close()
    after_attack(base)
