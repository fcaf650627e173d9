"""Policy gaps tried as an attacker would, against a live gateway process: loops into the
gateway itself (nested sessions through a listener no client used yet, a PORT or an upstream's
227 naming the gateway's own control port), special-purpose upstream addresses, writes
through a read-only gateway, numbers in other scripts, and peer text that would forge or hide
log lines.

Upstreams are real pyftpdlib servers, or `ScriptedUpstream` where the upstream itself is the
attacker (a reply text or a passive address no real server sends on demand).
"""

from __future__ import annotations

import contextlib
import ftplib
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from gateway_process import GatewayProcess, free_port, start_gateway
from servers import RunningServer

from gateway.listeners import interface_addresses

TIMEOUT = 20.0
CONTENT = b"honest file\n"


SERVED = {"f.txt": CONTENT}


def config(tmp: Path, text: str) -> str:
    path = tmp / f"c{len(list(tmp.glob('c*.toml')))}.toml"
    path.write_text(text)
    return str(path)


class ScriptedUpstream:
    """An FTP server that answers each verb with the bytes `replies` gives for it (any other
    verb: "500 x"), after a normal login. Threads, one per connection; bounded by TIMEOUT."""

    def __init__(self, replies: dict[str, bytes]) -> None:
        self.replies = {
            "USER": b"331 password please\r\n",
            "PASS": b"230 logged in\r\n",
            "FEAT": b"211-Features:\r\n UTF8\r\n211 End\r\n",
            "TYPE": b"200 ok\r\n",
            "EPSV": b"500 no EPSV\r\n",
            "QUIT": b"221 bye\r\n",
            **replies,
        }
        self.commands: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(TIMEOUT)
            conn.sendall(b"220 scripted\r\n")
            for line in conn.makefile("rb"):
                self.commands.append(line)
                verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
                conn.sendall(self.replies.get(verb, b"500 x\r\n"))
                if verb == "QUIT":
                    return


class RawClient:
    """A client on a plain socket, for command lines ftplib refuses to send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.reply()  # the greeting

    def reply(self) -> bytes:
        first = self.file.readline()
        assert first, "the gateway closed the connection"
        lines = [first]
        if first[3:4] == b"-":
            while not (lines[-1][:3] == first[:3] and lines[-1][3:4] == b" "):
                lines.append(self.file.readline())
        return b"".join(lines)

    def send(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def sessions_started(gw: GatewayProcess) -> int:
    """Client sessions the gateway has started, from its log."""
    return len(re.findall(r"Session started: client \S+,", gw.log()))


def settled_sessions(gw: GatewayProcess, at_least: int = 1) -> int:
    """Sessions started so far, once there are `at_least` (start_gateway's probe connection
    is one, logged a moment after it is gone) and every one has ended; waits at most 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = gw.log()
        started = len(re.findall(r"Session started: client \S+,", log))
        if started >= at_least and started == log.count("Session ended: client "):
            return started
        time.sleep(0.05)
    raise AssertionError("sessions did not end within 10 s:\n" + gw.log())


# ------------------------------------------------------------------------------ loops


@pytest.mark.parametrize("interface", ["127.0.0.1", "0.0.0.0"])
def test_nested_login_through_a_second_listener_is_refused(
    tmp_path: Path, server: RunningServer, interface: str
) -> None:
    # The second listener has had no client yet; with 0.0.0.0 the target is a loopback
    # address and an interface address it never named.
    second = free_port(interface)
    gw = start_gateway(
        tmp_path,
        "--allow-upstream",
        "0.0.0.0/0",
        "--listen",
        f"tcp:{second}:interface={interface}",
    )
    others = sorted(a for a in interface_addresses() if "." in a and not a.startswith("127."))
    targets = ["127.0.0.1"] if interface == "127.0.0.1" else ["127.0.0.3", *others[:1]]
    try:
        for target in targets:
            ftp = ftplib.FTP(timeout=TIMEOUT)
            ftp.connect("127.0.0.1", gw.port)
            nested = f"{server.user}@127.0.0.1:{server.port}@{target}:{second}"
            with pytest.raises(ftplib.error_perm) as refused:
                ftp.login(nested, server.password)
            assert str(refused.value).startswith("530") and "loop" in str(refused.value)
            ftp.close()
        ftp = ftplib.FTP(timeout=TIMEOUT)  # and the gateway still works
        ftp.connect("127.0.0.1", gw.port)
        ftp.login(f"{server.user}@127.0.0.1:{server.port}", server.password)
        ftp.quit()
        # Only that last session reached an upstream: none was nested inside the gateway.
        assert gw.log().count("Connected to upstream") == 1
    finally:
        gw.stop()


@pytest.mark.parametrize("verb", ["PORT", "EPRT"])
def test_port_naming_the_gateways_own_control_port_is_refused(
    tmp_path: Path, server: RunningServer, verb: str
) -> None:
    gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{server.port}")
    before = settled_sessions(gw)
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        ftp.connect("127.0.0.1", gw.port)
        ftp.login(server.user, server.password)
        p = gw.port
        arg = f"127,0,0,1,{p >> 8},{p & 0xFF}" if verb == "PORT" else f"|1|127.0.0.1|{p}|"
        with pytest.raises(ftplib.error_perm) as refused:
            ftp.sendcmd(f"{verb} {arg}")
        assert str(refused.value).startswith("504") and "own listener" in str(refused.value)
        with pytest.raises(ftplib.error_temp, match=r"^425"):
            ftp.sendcmd("RETR f.txt")  # no data address was accepted
        assert ftp.voidcmd("NOOP").startswith("200")
        ftp.quit()
        assert sessions_started(gw) - before == 1
    finally:
        gw.stop()


def test_upstream_227_naming_the_gateways_own_port_is_refused(tmp_path: Path) -> None:
    replies = {"RETR": b"150 here it comes\r\n226 done\r\n"}
    with ScriptedUpstream(replies) as hostile:
        gw = start_gateway(
            tmp_path, "--upstream", f"127.0.0.1:{hostile.port}", "--upstream-data-mode", "pasv"
        )
        # The 227 names the gateway's own control port, on the upstream's own address.
        hostile.replies["PASV"] = (
            f"227 Entering Passive Mode (127,0,0,1,{gw.port >> 8},{gw.port & 0xFF}).\r\n"
        ).encode()
        before = settled_sessions(gw)
        try:
            ftp = ftplib.FTP(timeout=TIMEOUT)
            ftp.connect("127.0.0.1", gw.port)
            ftp.login("u", "p")
            received: list[bytes] = []
            with pytest.raises(ftplib.error_temp, match=r"^425"):
                ftp.retrbinary("RETR f.txt", received.append)
            assert b"".join(received) == b""  # not the gateway's own greeting as "data"
            assert not any(c.startswith(b"RETR") for c in hostile.commands)
            assert "Refused a data connection" in gw.log()
            assert sessions_started(gw) - before == 1  # no session from itself
            ftp.close()
        finally:
            gw.stop()


# ------------------------------------------------------------------ special addresses


@pytest.mark.parametrize(
    "target",
    [
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of the cloud metadata address
        "[64:ff9b::7f00:1]",  # NAT64 of loopback
        "[2002:a00:1::1]",  # 6to4 of 10.0.0.1
        "[::10.0.0.1]",  # IPv4-compatible
        "[fec0::1]",
        "[100::1]",
        "192.0.0.8",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "192.88.99.1",
    ],
)
def test_special_purpose_upstreams_are_refused_before_connecting(
    tmp_path: Path, target: str
) -> None:
    gw = start_gateway(tmp_path)
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        ftp.connect("127.0.0.1", gw.port)
        with pytest.raises(ftplib.error_perm) as refused:
            ftp.login(f"anonymous@{target}:21", "pw")
        assert "denied by policy" in str(refused.value) and "not a public address" in str(
            refused.value
        )
        ftp.close()
        assert "Cannot connect" not in gw.log()  # refused before any connection attempt
    finally:
        gw.stop()


def test_host_name_rules_match_a_trailing_dot_and_any_case(
    tmp_path: Path, server: RunningServer
) -> None:
    text = (
        '[[upstream_rules]]\naction = "deny"\nhost = "LocalHost."\n'
        '[[upstream_rules]]\naction = "allow"\ncidr = "127.0.0.0/8"\n'
    )
    gw = start_gateway(tmp_path, "--config", config(tmp_path, text))
    try:
        for name in ("localhost", "LOCALHOST"):
            ftp = ftplib.FTP(timeout=TIMEOUT)
            ftp.connect("127.0.0.1", gw.port)
            with pytest.raises(ftplib.error_perm, match="denied by"):
                ftp.login(f"{server.user}@{name}:{server.port}", server.password)
            ftp.close()
    finally:
        gw.stop()


# ---------------------------------------------------------------- read-only, numbers


def test_read_only_gateway_refuses_every_way_to_set_a_time(
    tmp_path: Path, server: RunningServer
) -> None:
    text = "[commands]\nread_only = true\n"
    gw = start_gateway(
        tmp_path, "--config", config(tmp_path, text), "--upstream", f"127.0.0.1:{server.port}"
    )
    path = server.root / "f.txt"
    before = path.stat().st_mtime
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        ftp.connect("127.0.0.1", gw.port)
        ftp.login(server.user, server.password)
        for command in (
            "MFMT 20000101000000 f.txt",
            "MDTM 20000101000000 f.txt",
            "MFF modify=20000101000000; f.txt",
            "MFCT 20000101000000 f.txt",
            "SITE UTIME f.txt 20000101000000",
            "SITE CHMOD 777 f.txt",
            "mfmt 20000101000000 f.txt",  # verbs in any case
            "Mdtm 20000101000000 f.txt",
            "site utime f.txt 20000101000000",
        ):
            with pytest.raises(ftplib.error_perm, match=r"^550 .*read-only"):
                ftp.sendcmd(command)
        assert ftp.sendcmd("MDTM f.txt").startswith("213")  # reading a time still works
        ftp.quit()
    finally:
        gw.stop()
    assert path.stat().st_mtime == before


def test_rest_and_allo_in_other_scripts_digits_never_reach_the_upstream(
    tmp_path: Path,
) -> None:
    with ScriptedUpstream({"REST": b"350 ok\r\n", "ALLO": b"200 ok\r\n"}) as hostile:
        gw = start_gateway(tmp_path, "--upstream", f"127.0.0.1:{hostile.port}")
        try:
            client = RawClient(gw.port)
            client.send(b"USER u")
            assert client.send(b"PASS p").startswith(b"230")
            arabic_100 = "\u0661\u0660\u0660".encode()
            assert client.send(b"REST " + arabic_100).startswith(b"501")
            assert client.send(b"ALLO " + arabic_100).startswith(b"501")
            assert client.send(b"ALLO 100").startswith(b"200")
            client.close()
            assert not any(arabic_100 in c for c in hostile.commands)
            assert b"ALLO 100\r\n" in hostile.commands
        finally:
            gw.stop()


# ------------------------------------------------------------------------------ logs

# What a peer sends to forge or hide a log line: a line start after NEL, LINE SEPARATOR or
# (from an upstream, whose reply lines may hold one) CR, and ANSI escapes (ESC) that erase the
# line and move the cursor up over the one before.
EVIL = "a\u00852026-01-01T00:00:00+0000 [gateway] forged\x1b[2K\x1b[1A\u2028c\u2029d"
UPSTREAM_EVIL = "\r2026-01-01T00:00:00+0000 [gateway] forged" + EVIL
RAW = [b"\r", b"\x1b", b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9"]
LINE_START = re.compile(rb"^(\d{4}-\d\d-\d\dT|\t)")


def test_peer_text_cannot_forge_or_hide_log_lines(tmp_path: Path) -> None:
    evil = EVIL.encode()
    reply = b"500 refused " + UPSTREAM_EVIL.encode() + b"\r\n"
    with ScriptedUpstream({"PASV": reply, "EPSV": reply}) as hostile:
        text = 'proxy_auth = ["memory:proxy:secret"]\nallow_upstream = ["127.0.0.0/8"]\n'
        gw = start_gateway(tmp_path, "--config", config(tmp_path, text))
        try:
            client = RawClient(gw.port)
            # As a client: a proxy user name that is logged when its login fails.
            assert client.send(b"USER " + evil).startswith(b"331")
            assert client.send(b"PASS wrong").startswith(b"530")
            # As a client (a path) and as an upstream (the reply text of a refused PASV).
            client.send(b"USER proxy")
            assert client.send(b"PASS secret").startswith(b"230")
            assert client.send(f"USER u@127.0.0.1:{hostile.port}".encode()).startswith(b"331")
            assert client.send(b"PASS p").startswith(b"230")
            assert client.send(b"PASV").startswith(b"227")
            assert client.send(b"RETR /x" + evil).startswith(b"425")
            client.send(b"QUIT")
            client.close()
        finally:
            gw.stop()
    log = gw.log_path.read_bytes()
    for raw in RAW:
        assert raw not in log, raw
    lines = log.splitlines()
    assert all(LINE_START.match(line) for line in lines), [
        line for line in lines if not LINE_START.match(line)
    ]
    failed = [line for line in lines if b"Proxy login failed" in line]
    transfer = [line for line in lines if b"Transfer RETR" in line]
    assert len(failed) == 1 and b"\\x852026-01-01" in failed[0] and b"\\u2028" in failed[0]
    assert len(transfer) == 1 and b"\\x0d2026-01-01" in transfer[0]  # the upstream's CR
    assert transfer[0].count(b"\\x1b[2K") == 2  # the client's path and the upstream's reply
    assert sum(b"forged" in line for line in lines) == 2  # escaped, inside those two lines
