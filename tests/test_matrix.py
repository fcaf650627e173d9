"""Interoperability matrix: clients x servers x data modes x operations, through the gateway.

Every cell is one real client program (Python ftplib, curl, lftp) doing one operation (LIST,
RETR, STOR) in one client data mode (PASV, EPSV, PORT, EPRT) through a gateway process in front
of one real server (pyftpdlib, vsftpd, pure-ftpd, proftpd), all on loopback. A cell passes only
if:

- the client sent exactly the data command of its cell and no other: a client that silently
  falls back from EPSV to PASV, or from EPRT to PORT, fails the EPSV or EPRT cell;
- the operation's result is checked at the far end: the listing names the file, the download's
  sha256 matches the file on the server's disk, the upload's sha256 is read back from the
  server's disk;
- the gateway's own log shows which data command it sent upstream for that cell.

The servers behind the main gateway refuse active mode (all but pure-ftpd, which has no switch
for it), so each PORT and EPRT cell also shows the headline: an active client is served while
the upstream is only ever asked for passive connections.

Sections:

- `test_client_mode_matrix`: clients x servers x {PASV, EPSV, PORT, EPRT} x {LIST, RETR, STOR},
  IPv4 client to IPv4 server. lftp sends EPRT only on an IPv6 control connection (it has no
  setting for it on IPv4), so its EPRT cells run from ::1 to the IPv4 server.
- `test_address_family_crossings`: an IPv6 client on ::1 to an IPv4 server (EPSV, EPRT: a client
  on IPv6 cannot say PASV or PORT, RFC 2428 section 1) and an IPv4 client to a server on ::1
  (every mode), for every client and server.
- `test_upstream_mode_matrix`: every `data.upstream_mode` (pasv, epsv, active, client) against
  every client mode, for every server, with ftplib. For upstream active mode the server refuses
  passive connections (pure-ftpd: `--natmode`), so the transfer can only have worked actively.
"""

from __future__ import annotations

import ftplib
import io
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
from clients import curl, file_sha256, lftp, lftp_sent, sent_commands, sha256
from gateway_process import GatewayProcess, free_port, start_gateway, wait_for_port
from servers import KINDS, RunningServer, start_server

CLIENTS: Final = ("ftplib", "curl", "lftp")
MODES: Final = ("PASV", "EPSV", "PORT", "EPRT")
OPERATIONS: Final = ("LIST", "RETR", "STOR")
DATA_VERBS: Final = frozenset(MODES) | {"LPSV", "LPRT"}
UPSTREAM_MODES: Final = ("pasv", "epsv", "active", "client")

V4: Final = "127.0.0.1"
V6: Final = "::1"
FILE: Final = "matrix.bin"
PAYLOAD: Final = os.urandom((1 << 20) + 4321)  # a few socket buffers, no round size
TIMEOUT: Final = 30.0


# --- the servers and gateways of one server kind --------------------------------------------------


@dataclass
class Site:
    """The servers and gateways for one server kind, started on first use, stopped together."""

    kind: str
    workdir: Path
    servers: dict[str, RunningServer] = field(default_factory=dict)
    gateways: dict[tuple[str, ...], tuple[GatewayProcess, int]] = field(default_factory=dict)

    def server(self, name: str) -> RunningServer:
        """'v4' refuses active mode where the server can; 'v6' is on ::1; 'v4-active' refuses
        passive mode."""
        if name not in self.servers:
            host = V6 if name == "v6" else V4
            options = {"passive": False} if name == "v4-active" else {}
            if name == "v4" and self.kind != "pure-ftpd":
                options = {"active": False}
            server = start_server(self.kind, self.workdir / f"server-{name}", host=host, **options)
            self.servers[name] = server
            target = server.root / FILE
            target.write_bytes(PAYLOAD)
            target.chmod(0o644)
        return self.servers[name]

    def gateway(self, server_name: str, *args: str, family: int = 4) -> tuple[GatewayProcess, int]:
        """The gateway in front of `server_name` started with `args`, and the port it listens on
        for clients of `family`: each gateway listens on both 127.0.0.1 and ::1."""
        key = (server_name, *args)
        if key not in self.gateways:
            server = self.server(server_name)
            port6 = free_port(V6)
            workdir = self.workdir / f"gateway-{len(self.gateways)}"
            workdir.mkdir()
            gateway = start_gateway(
                workdir,
                "--upstream",
                f"[{server.host}]:{server.port}"
                if ":" in server.host
                else f"{server.host}:{server.port}",
                "--listen",
                f"tcp6:{port6}:interface=\\:\\:1",
                "--log-level=debug",  # UpstreamLog reads the commands sent upstream
                *args,
            )
            # start_gateway waits for the first listener; the second binds a moment later,
            # and on a busy machine a client can come in between.
            wait_for_port(V6, port6, proc=gateway.proc)
            self.gateways[key] = (gateway, port6)
        gateway, port6 = self.gateways[key]
        return gateway, port6 if family == 6 else gateway.port

    def close(self) -> None:
        for gateway, _ in self.gateways.values():
            gateway.stop()
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module", params=KINDS)
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    site = Site(request.param, tmp_path_factory.mktemp(f"matrix-{request.param}"))
    yield site
    site.close()


# --- what a cell did ------------------------------------------------------------------------------


@dataclass
class Outcome:
    sent: list[str]
    """The verbs the client sent, in order."""
    listing: str = ""
    downloaded: bytes = b""


class UpstreamLog:
    """The data commands a gateway sent upstream since this object was made."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.start = len(gateway.log())

    def verbs(self) -> set[str]:
        new = self.gateway.log()[self.start :]
        return set(re.findall(r"To upstream: (PASV|EPSV|PORT|EPRT)\b", new))


# --- the three clients ----------------------------------------------------------------------------


class RecordingFTP(ftplib.FTP):
    """ftplib, told which data command to use, recording every command it sends.

    ftplib on its own picks PASV/PORT on IPv4 and EPSV/EPRT on IPv6; the overrides make it use
    the cell's command on either family, and trust the address in a 227 reply so that the
    gateway's advertised address is what the data connection really goes to.
    """

    def __init__(self, mode: str) -> None:
        super().__init__(timeout=TIMEOUT)
        self.mode = mode
        self.sent: list[str] = []
        self.trust_server_pasv_ipv4_address = True

    def putcmd(self, line: str) -> None:
        self.sent.append(line.split(" ", 1)[0].upper())
        super().putcmd(line)

    def makepasv(self) -> tuple[str, int]:
        if self.mode == "EPSV":
            return ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        return ftplib.parse227(self.sendcmd("PASV"))

    def makeport(self) -> socket.socket:
        local = self.sock.getsockname()[0]
        listener = socket.create_server((local, 0), family=self.af, backlog=1)
        port = listener.getsockname()[1]
        if self.mode == "EPRT":
            self.sendeprt(local, port)
        else:
            self.sendport(local, port)
        listener.settimeout(TIMEOUT)
        return listener


def run_ftplib(
    host: str, port: int, server: RunningServer, mode: str, operation: str, target: str, tmp: Path
) -> Outcome:
    ftp = RecordingFTP(mode)
    ftp.connect(host, port)
    try:
        ftp.login(server.user, server.password)
        ftp.set_pasv(mode in ("PASV", "EPSV"))
        outcome = Outcome(ftp.sent)
        if operation == "LIST":
            lines: list[str] = []
            ftp.retrlines("LIST", lines.append)
            outcome.listing = "\n".join(lines)
        elif operation == "RETR":
            buffer = io.BytesIO()
            ftp.retrbinary(f"RETR {FILE}", buffer.write)
            outcome.downloaded = buffer.getvalue()
        else:
            reply = ftp.storbinary(f"STOR {target}", io.BytesIO(PAYLOAD))
            assert reply.startswith("226"), reply
        ftp.quit()
    finally:
        ftp.close()
    return outcome


CURL_MODES: Final = {
    "PASV": ("--ftp-pasv", "--disable-epsv"),
    "EPSV": ("--ftp-pasv",),
    "PORT": ("--ftp-port", "-", "--disable-eprt"),
    "EPRT": ("--ftp-port", "-"),
}


def run_curl(
    host: str, port: int, server: RunningServer, mode: str, operation: str, target: str, tmp: Path
) -> Outcome:
    literal = f"[{host}]" if ":" in host else host
    base = f"ftp://{server.user}:{server.password}@{literal}:{port}/"
    options = CURL_MODES[mode]
    if operation == "LIST":
        result = curl(base, *options, timeout=TIMEOUT)
    elif operation == "RETR":
        result = curl(base + FILE, *options, timeout=TIMEOUT)
    else:
        source = tmp / "upload.bin"
        source.write_bytes(PAYLOAD)
        result = curl(base + target, *options, "-T", str(source), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    outcome = Outcome(sent_commands(result.stderr))
    if operation == "LIST":
        outcome.listing = result.stdout.decode(errors="replace")
    elif operation == "RETR":
        outcome.downloaded = result.stdout
    return outcome


LFTP_MODES: Final = {
    "PASV": "set ftp:passive-mode on; set ftp:prefer-epsv no; ",
    "EPSV": "set ftp:passive-mode on; set ftp:prefer-epsv yes; ",
    # On IPv4 lftp sends PORT, on IPv6 EPRT; it never switches to passive with these settings.
    "PORT": "set ftp:passive-mode off; set ftp:auto-passive-mode no; ",
    "EPRT": "set ftp:passive-mode off; set ftp:auto-passive-mode no; ",
}


def run_lftp(
    host: str, port: int, server: RunningServer, mode: str, operation: str, target: str, tmp: Path
) -> Outcome:
    literal = f"[{host}]" if ":" in host else host
    trace = tmp / "lftp.trace"
    login = f"open -u {server.user},{server.password} ftp://{literal}:{port}; "
    local = tmp / "lftp.bin"
    if operation == "LIST":
        command = "ls"
    elif operation == "RETR":
        command = f"get {FILE} -o {local}"
    else:
        local.write_bytes(PAYLOAD)
        command = f"put {local} -o {target}"
    result = lftp(LFTP_MODES[mode] + login + command, log=trace, timeout=TIMEOUT)
    assert result.returncode == 0, (
        result.stderr.decode(errors="replace") + trace.read_text(errors="replace")[-4000:]
    )
    outcome = Outcome(lftp_sent(trace))
    if operation == "LIST":
        outcome.listing = result.stdout.decode(errors="replace")
    elif operation == "RETR":
        outcome.downloaded = local.read_bytes()
    return outcome


RUNNERS: Final = {"ftplib": run_ftplib, "curl": run_curl, "lftp": run_lftp}


# --- checking a cell ------------------------------------------------------------------------------


def run_cell(
    client: str,
    gateway: GatewayProcess,
    host: str,
    port: int,
    server: RunningServer,
    mode: str,
    operation: str,
    tmp: Path,
) -> set[str]:
    """Run one cell and check it end to end; returns the data verbs the gateway sent upstream."""
    upstream = UpstreamLog(gateway)
    target = f"up-{client}-{mode}-{tmp.name}.bin"
    outcome = RUNNERS[client](host, port, server, mode, operation, target, tmp)

    data_verbs = [verb for verb in outcome.sent if verb in DATA_VERBS]
    assert data_verbs and set(data_verbs) == {mode}, f"{client} sent {outcome.sent}"
    if operation == "LIST":
        assert FILE in outcome.listing, outcome.listing
    elif operation == "RETR":
        assert len(outcome.downloaded) == len(PAYLOAD)
        assert sha256(outcome.downloaded) == sha256(PAYLOAD)
    else:
        stored = server.root / target
        assert stored.exists(), f"{target} is not on the server's disk"
        assert file_sha256(stored) == sha256(PAYLOAD)
        stored.unlink()
    return upstream.verbs()


# --- the matrices ------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client", CLIENTS)
def test_client_mode_matrix(
    site: Site, client: str, mode: str, operation: str, tmp_path: Path
) -> None:
    family = 6 if client == "lftp" and mode == "EPRT" else 4
    gateway, port = site.gateway("v4", family=family)
    host = V6 if family == 6 else V4
    upstream = run_cell(client, gateway, host, port, site.server("v4"), mode, operation, tmp_path)
    # The gateway's default upstream mode: EPSV, which every one of these servers accepts.
    assert upstream == {"EPSV"}, gateway.log()[-3000:]


CROSSINGS: Final = [
    (client, route, mode)
    for client in CLIENTS
    for route, modes in (("v6-to-v4", ("EPSV", "EPRT")), ("v4-to-v6", MODES))
    for mode in modes
    # lftp sends EPRT only over IPv6: its v6-to-v4 EPRT cells are in test_client_mode_matrix,
    # and it has no v4-to-v6 EPRT cell.
    if not (client == "lftp" and mode == "EPRT")
]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize(("client", "route", "mode"), CROSSINGS)
def test_address_family_crossings(
    site: Site, client: str, route: str, mode: str, operation: str, tmp_path: Path
) -> None:
    if route == "v6-to-v4":
        server = site.server("v4")
        gateway, port = site.gateway("v4", family=6)
        host = V6
    else:
        server = site.server("v6")
        gateway, port = site.gateway("v6")
        host = V4
    upstream = run_cell(client, gateway, host, port, server, mode, operation, tmp_path)
    assert upstream == {"EPSV"}, gateway.log()[-3000:]


def expected_upstream(upstream_mode: str, client_mode: str) -> str:
    if upstream_mode == "client":
        return client_mode
    return {"pasv": "PASV", "epsv": "EPSV", "active": "PORT"}[upstream_mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upstream_mode", UPSTREAM_MODES)
def test_upstream_mode_matrix(site: Site, upstream_mode: str, mode: str, tmp_path: Path) -> None:
    expected = expected_upstream(upstream_mode, mode)
    server_name = "v4-active" if expected in ("PORT", "EPRT") else "v4"
    gateway, port = site.gateway(server_name, "--upstream-data-mode", upstream_mode)
    server = site.server(server_name)
    for operation in ("RETR", "STOR"):
        upstream = run_cell("ftplib", gateway, V4, port, server, mode, operation, tmp_path)
        assert upstream == {expected}, gateway.log()[-3000:]


# --- everything else a transfer session uses ------------------------------------------------------


def login(host: str, port: int, server: RunningServer) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(host, port)
    ftp.login(server.user, server.password)
    return ftp


def observe(ftp: ftplib.FTP, name: str) -> dict[str, object]:
    """What a client sees of the test file and the directory, by the commands the server has."""
    features = ftp.sendcmd("FEAT")
    ftp.sendcmd("TYPE I")  # SIZE counts bytes only in binary mode on some servers
    seen: dict[str, object] = {
        "SIZE": ftp.sendcmd(f"SIZE {FILE}"),
        "MDTM": ftp.sendcmd(f"MDTM {FILE}"),
        "NLST": sorted(ftp.nlst()),
        "MODE S": ftp.sendcmd("MODE S")[:3],
        "TYPE A": ftp.sendcmd("TYPE A")[:3],
    }
    lines: list[str] = []
    ftp.retrlines(f"RETR {name}", lines.append)  # ASCII: line ends converted by the server
    seen["RETR in ASCII"] = lines
    ftp.sendcmd("TYPE I")
    if " MLST" in features:
        seen["MLST"] = ftp.sendcmd(f"MLST {FILE}").splitlines()[1].strip()
        seen["MLSD"] = sorted(entry for entry, _ in ftp.mlsd())
    return seen


def test_commands_pass_through(site: Site, tmp_path: Path) -> None:
    """APPE, STOU, REST with RETR and STOR, TYPE A, MODE S, SIZE, MDTM, NLST, MLST and MLSD
    (where the server has them) give through the gateway what they give directly."""
    server = site.server("v4")
    _, port = site.gateway("v4")
    text = "first line\nsecond line\n"
    (server.root / "text.txt").write_text(text)
    (server.root / "text.txt").chmod(0o644)

    direct = login(server.host, server.port, server)
    proxied = login(V4, port, server)
    try:
        assert observe(proxied, "text.txt") == observe(direct, "text.txt")

        # APPE adds to what is there.
        half = len(PAYLOAD) // 2
        proxied.storbinary("STOR appended.bin", io.BytesIO(PAYLOAD[:half]))
        assert proxied.storbinary("APPE appended.bin", io.BytesIO(PAYLOAD[half:])).startswith("2")
        assert file_sha256(server.root / "appended.bin") == sha256(PAYLOAD)

        # REST with STOR resumes an upload, REST with RETR a download.
        proxied.storbinary("STOR resumed.bin", io.BytesIO(PAYLOAD[:half]))
        proxied.storbinary("STOR resumed.bin", io.BytesIO(PAYLOAD[half:]), rest=half)
        assert file_sha256(server.root / "resumed.bin") == sha256(PAYLOAD)
        tail = io.BytesIO()
        proxied.retrbinary(f"RETR {FILE}", tail.write, rest=half)
        assert tail.getvalue() == PAYLOAD[half:]

        # STOU: the server picks the name and says it in the 150 or 226 reply.
        before = {path.name for path in server.root.iterdir()}
        connection, _ = proxied.ntransfercmd("STOU")
        with connection:
            connection.sendall(PAYLOAD)
        assert proxied.voidresp().startswith("226")
        created = [path for path in server.root.iterdir() if path.name not in before]
        assert len(created) == 1 and file_sha256(created[0]) == sha256(PAYLOAD)

        # ASCII upload: the server stores its own line ends, the same either way.
        proxied.storlines("STOR ascii-proxied.txt", io.BytesIO(text.encode()))
        direct.storlines("STOR ascii-direct.txt", io.BytesIO(text.encode()))
        proxied_bytes = (server.root / "ascii-proxied.txt").read_bytes()
        assert proxied_bytes == (server.root / "ascii-direct.txt").read_bytes()
        assert proxied_bytes.replace(b"\r\n", b"\n") == text.encode()
    finally:
        direct.close()
        proxied.close()
