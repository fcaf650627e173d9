"""Behind a load balancer: real HAProxy (Debian's haproxy, in the foreground) in front of two
gateway processes with `haproxy:` listeners, proxying to a real pyftpdlib server.

The HAProxy configuration is etc/examples/haproxy.cfg with only its addresses substituted, so
the shipped example is what runs here. The client is bound to 127.W.0.5, HAProxy listens on
127.W.0.20 and the gateways on 127.W.0.11 and 127.W.0.12: every address in the logs says which
hop it belongs to. W is one more than the pytest-xdist worker's number: the example binds the
same passive port ranges for every farm, and HAProxy binds with SO_REUSEPORT, so two workers'
farms on one address would take each other's data connections.

Also here: `upstream_proxy_protocol` against a scripted upstream that parses the header with
Twisted's parsers, and against real HAProxy reading it (`accept-proxy`) in front of a real
server (proftpd's mod_proxy_protocol is not among Debian's proftpd modules).
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import curl, sent_commands
from gateway_process import PROJECT, GatewayProcess, free_port, start_gateway, wait_for_port
from pki import Pki, make_pki
from servers import RunningServer
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from gateway.addresses import HostPort
from gateway.proxyproto import header

TIMEOUT = 30.0
_NET = f"127.{int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0').removeprefix('gw') or 0) + 1}.0"
CLIENT = f"{_NET}.5"
BALANCER = f"{_NET}.20"
INSTANCES = (f"{_NET}.11", f"{_NET}.12")
RANGES = ("40100-40149", "40150-40199")
EXAMPLE = PROJECT / "etc" / "examples" / "haproxy.cfg"
PAYLOAD = os.urandom(300_000)
GATEWAY_CONFIG = "timeouts.data_connect = 10\n"


def haproxy_config(frontend: int, ports: tuple[int, int]) -> str:
    """etc/examples/haproxy.cfg with its example addresses replaced by loopback ones; every
    substituted line must be in the example as shipped, so the example cannot drift."""
    text = EXAMPLE.read_text()
    substitutions = {
        "bind 203.0.113.10:21": f"bind {BALANCER}:{frontend}",
        "server gw1 10.0.0.11:2121": f"server gw1 {INSTANCES[0]}:{ports[0]}",
        "server gw2 10.0.0.12:2121": f"server gw2 {INSTANCES[1]}:{ports[1]}",
        "inter 10s": "inter 1s",
        "bind 203.0.113.10:30000-30999": f"bind {BALANCER}:{RANGES[0]}",
        "bind 203.0.113.10:31000-31999": f"bind {BALANCER}:{RANGES[1]}",
        "server gw1 10.0.0.11 send-proxy-v2": f"server gw1 {INSTANCES[0]} send-proxy-v2",
        "server gw2 10.0.0.12 send-proxy-v2": f"server gw2 {INSTANCES[1]} send-proxy-v2",
    }
    for line in (
        "mode tcp",
        "tcp-check expect string 220",
        "default-server send-proxy-v2 check inter 10s fall 3 rise 2",
        "balance leastconn",
    ):
        assert re.search(rf"^\s*{re.escape(line)}\s*$", text, re.M), line
    for old, new in substitutions.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


class Balancer:
    def __init__(self, workdir: Path, config: str, port: int, host: str = BALANCER) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise FileNotFoundError("haproxy is not installed (scripts/install-test-deps)")
        path = workdir / "haproxy.cfg"
        path.write_text(config)
        self.output = workdir / "haproxy.out"
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(path)],
            stdout=self.output.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.port = port
        wait_for_port(host, port, proc=self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


SERVED = {"file.bin": PAYLOAD}


@pytest.fixture(scope="module")
def farm_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def farm(
    server: RunningServer, farm_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Balancer, list[GatewayProcess]]]:
    workdir = tmp_path_factory.mktemp("farm")
    pki = farm_pki
    tls = (
        f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n'
        'client = "optional"\nupstream = "off"\n'
    )
    gateways: list[GatewayProcess] = []
    balancer = None
    try:
        for host, ports in zip(INSTANCES, RANGES, strict=True):
            config = workdir / f"gateway-{host}.toml"
            xferlog = workdir / f"xferlog-{host}"
            config.write_text(f'{GATEWAY_CONFIG}[log]\ntransfer_log = "{xferlog}"\n{tls}')
            gateways.append(
                start_gateway(
                    workdir,
                    "--config",
                    str(config),
                    "--upstream",
                    f"{server.host}:{server.port}",
                    "--passive-ports",
                    ports,
                    host=host,
                    listen_prefix="haproxy:",
                )
            )
        frontend = free_port(BALANCER)
        config = haproxy_config(frontend, (gateways[0].port, gateways[1].port))
        balancer = Balancer(workdir, config, frontend)
        yield balancer, gateways
    finally:
        if balancer is not None:
            balancer.stop()
        for gateway in gateways:
            gateway.stop()


def client(follow_227: bool = True) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=TIMEOUT, source_address=(CLIENT, 0))
    # Following the 227 address reaches the instance directly; ftplib's default (not
    # following it) reaches the balancer, which forwards the instance's range with a header.
    ftp.trust_server_pasv_ipv4_address = follow_227
    return ftp


def sessions_from(gateway: GatewayProcess, host: str) -> int:
    return len(re.findall(rf"Session started: client {re.escape(host)}:\d+", gateway.log()))


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_transfers_through_haproxy_reach_both_instances_with_the_real_address(
    farm: tuple[Balancer, list[GatewayProcess]], server: RunningServer
) -> None:
    balancer, gateways = farm
    uploads: list[str] = []
    for i in range(4):
        for passive, follow_227 in ((True, True), (True, False), (False, True)):
            ftp = client(follow_227)
            ftp.connect(BALANCER, balancer.port)
            try:
                ftp.login(server.user, server.password)
                ftp.set_pasv(passive)
                data = io.BytesIO()
                ftp.retrbinary("RETR file.bin", data.write)
                assert data.getvalue() == PAYLOAD
                name = f"up-{i}-{'pasv' if passive else 'port'}-{follow_227}.bin"
                assert ftp.storbinary(f"STOR {name}", io.BytesIO(PAYLOAD)).startswith("226")
                uploads.append(name)
                ftp.quit()
            finally:
                ftp.close()
    for name in uploads:
        assert (server.root / name).read_bytes() == PAYLOAD, name
    # curl's defaults: EPSV (no address: to the balancer's forwarded range); PASV with the
    # 227 address skipped (curl 7.74 and later: the balancer again); PASV following it
    # (directly to the instance); active mode.
    for args, verb in (
        ((), "EPSV"),
        (("--disable-epsv",), "PASV"),
        (("--disable-epsv", "--no-ftp-skip-pasv-ip"), "PASV"),
        (("--ftp-port", CLIENT), "EPRT"),
    ):
        for _ in range(2):
            url = f"ftp://{server.user}:{server.password}@{BALANCER}:{balancer.port}/file.bin"
            result = curl(url, "--interface", CLIENT, *args)
            assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
            assert result.stdout == PAYLOAD
            assert verb in sent_commands(result.stderr)
    # Both instances served sessions, and each logged the client's real address.
    for gateway in gateways:
        wait_for(lambda g=gateway: sessions_from(g, CLIENT) >= 2, "sessions in both logs")
        log = gateway.log()
        assert "Transfer download complete" in log and "Transfer upload complete" in log
        # xferlog(5): the remote host (after the date and the duration) is the client.
        xferlog = (gateway.log_path.parent / f"xferlog-{gateway.host}").read_text()
        hosts = {line.split()[6] for line in xferlog.splitlines()}
        assert hosts == {CLIENT}, xferlog
        # The only other sessions are HAProxy's own health checks (PROXY v2 LOCAL, section
        # 2.2), which keep the balancer's connection address; clients never appear as it.
        for host in re.findall(r"Session started: client ([0-9.]+):\d+", log):
            assert host in (CLIENT, "127.0.0.1", BALANCER), log[-3000:]
    assert sum(sessions_from(g, CLIENT) for g in gateways) == 20
    # The forwarded data connections were checked against the client too.
    assert "Dropped" not in "".join(g.log() for g in gateways)


def test_port_naming_the_balancer_is_refused_as_a_bounce(
    farm: tuple[Balancer, list[GatewayProcess]], server: RunningServer
) -> None:
    balancer, _ = farm
    ftp = client()
    ftp.connect(BALANCER, balancer.port)
    try:
        ftp.login(server.user, server.password)
        for host in (BALANCER, "127.0.0.1"):
            numbers = host.replace(".", ",")
            with pytest.raises(ftplib.error_perm) as refused:
                ftp.sendcmd(f"PORT {numbers},156,64")
            assert "not your own address" in str(refused.value), refused.value
        # The client's own address is fine: the check compares with the real one.
        assert ftp.sendcmd(f"PORT {CLIENT.replace('.', ',')},156,64").startswith("200")
    finally:
        ftp.close()


def test_connection_without_header_is_closed_and_logged(
    farm: tuple[Balancer, list[GatewayProcess]],
) -> None:
    _, gateways = farm
    gateway = gateways[0]
    with socket.create_connection(
        (gateway.host, gateway.port), timeout=TIMEOUT, source_address=(CLIENT, 0)
    ) as sock:
        sock.sendall(b"USER anonymous\r\n")
        received = b""
        with contextlib.suppress(ConnectionResetError):  # closed with unread bytes: a reset
            while chunk := sock.recv(4096):
                received += chunk
    assert received == b""  # no greeting, no session
    wait_for(lambda: "invalid PROXY header" in gateway.log(), "the refusal line")
    line = next(line for line in gateway.log().splitlines() if "invalid PROXY header" in line)
    assert f"Refused connection from {CLIENT}:" in line
    assert "#warn" in line or "warn" in line.lower(), line


# ------------------------------------------------------------------ PROXY towards upstreams


class HeaderUpstream:
    """A scripted FTP server that expects a PROXY header first and records what it names."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.headers: list[tuple[str, int, str, int]] = []
        self.errors: list[str] = []
        self.quits = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # The gateway's start-up probe (tests/gateway_process.py) may open a session too.
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            parser = V1Parser() if self.version == "v1" else V2Parser()
            buffer = b""
            info = None
            rest = b""
            while info is None:
                chunk = conn.recv(4096)
                if not chunk:  # the start-up probe's session, cancelled while connecting
                    return
                buffer += chunk
                if self.version == "v2" and len(buffer) < 16:
                    continue
                info, rest = parser.feed(buffer)
                buffer = b""
            assert info.source is not None and info.destination is not None
            self.headers.append(
                (info.source.host, info.source.port, info.destination.host, info.destination.port)  # type: ignore[attr-defined]
            )
            if rest:
                self.errors.append(f"bytes before the greeting: {rest!r}")
            # The start-up probe's session is dropped by the gateway (a reset) at any point.
            with contextlib.suppress(OSError):
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.sendall(b"220 scripted\r\n")
        for line in conn.makefile("rb"):
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"USER":
                conn.sendall(b"331 password\r\n")
            elif verb == b"PASS":
                conn.sendall(b"230 in\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                self.quits += 1
                return
            else:
                conn.sendall(b"502 no\r\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self.thread.join(timeout=TIMEOUT)


def header_sender(tmp_path: Path, version: str, upstream: str) -> GatewayProcess:
    """A gateway on the first instance's address sending `upstream` a PROXY header."""
    (tmp_path / "gateway.toml").write_text(f'upstream_proxy_protocol = "{version}"\n')
    return start_gateway(
        tmp_path,
        "--config",
        str(tmp_path / "gateway.toml"),
        "--upstream",
        upstream,
        host=INSTANCES[0],
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upstream_proxy_protocol_names_the_client(version: str, tmp_path: Path) -> None:
    upstream = HeaderUpstream(version)
    gateway = header_sender(tmp_path, version, f"127.0.0.1:{upstream.port}")
    try:
        ftp = client()
        ftp.connect(gateway.host, gateway.port)
        local_port = ftp.sock.getsockname()[1]
        assert ftp.login("user", "secret").startswith("230")
        ftp.quit()
        wait_for(lambda: upstream.quits == 1, "the session's QUIT upstream")
        assert upstream.errors == []
        assert (CLIENT, local_port, INSTANCES[0], gateway.port) in upstream.headers
        # Every session's header names its client, the probe's too: none names the gateway.
        assert all(host != INSTANCES[0] for host, *_ in upstream.headers), upstream.headers
    finally:
        upstream.close()
        gateway.stop()


#: HAProxy in front of the upstream, reading the gateway's header as an FTP server with PROXY
#: protocol support would: `accept-proxy` takes the client's address from it, and tcplog
#: writes that address first on the line of each connection.
HEADER_READER = """\
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend upstream-in
    bind {host}:{port} accept-proxy
    default_backend server
backend server
    server ftp {server}
"""
READER_HOST = f"{_NET}.21"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_reads_the_upstream_header_and_the_session_works(
    version: str, tmp_path: Path, server: RunningServer
) -> None:
    port = free_port(READER_HOST)
    config = HEADER_READER.format(
        host=READER_HOST, port=port, server=f"{server.host}:{server.port}"
    )
    reader = Balancer(tmp_path, config, port, host=READER_HOST)
    gateway = header_sender(tmp_path, version, f"{READER_HOST}:{port}")
    try:
        ftp = client()
        ftp.connect(gateway.host, gateway.port)
        local_port = ftp.sock.getsockname()[1]
        # The control connection only: a data connection would not pass HAProxy (an upstream
        # behind a TCP proxy needs its passive range forwarded, as in etc/examples/haproxy.cfg),
        # and the server's own data connections come from an address the gateway refuses.
        assert ftp.login(server.user, server.password).startswith("230")
        assert ftp.pwd() == "/"
        assert ftp.quit().startswith("221")
        ftp.close()
        # HAProxy logs each connection as it ends, under the address the header gave it.
        wait_for(
            lambda: f"{CLIENT}:{local_port} " in reader.output.read_text(errors="replace"),
            "HAProxy's line for the session, under the client's address",
        )
        log = reader.output.read_text(errors="replace")
        assert "upstream-in server/ftp" in log, log
        assert f"{INSTANCES[0]}:" not in log, log  # never the gateway's own address
    finally:
        gateway.stop()
        reader.stop()


def test_real_address_passes_from_haproxy_listener_to_upstream_header(tmp_path: Path) -> None:
    """A `haproxy:` listener and `upstream_proxy_protocol`: the upstream sees the address the
    balancer's header named, not the balancer's."""
    upstream = HeaderUpstream("v2")
    (tmp_path / "gateway.toml").write_text('upstream_proxy_protocol = "v2"\n')
    gateway = start_gateway(
        tmp_path,
        "--config",
        str(tmp_path / "gateway.toml"),
        "--upstream",
        f"127.0.0.1:{upstream.port}",
        host=INSTANCES[1],
        listen_prefix="haproxy:",
    )
    try:
        with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.77 198.51.100.1 50123 21\r\n")
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            sock.sendall(b"QUIT\r\n")
            assert reader.readline().startswith(b"221")
        wait_for(lambda: upstream.quits == 1, "the session's QUIT upstream")
        assert upstream.errors == []
        assert ("192.0.2.77", 50123, INSTANCES[1], gateway.port) in upstream.headers
        assert "Session started: client 192.0.2.77:50123" in gateway.log()
    finally:
        upstream.close()
        gateway.stop()


def test_explicit_ftps_through_a_haproxy_listener(server: RunningServer, tmp_path: Path) -> None:
    """AUTH TLS after the PROXY header: TLS starts under the header wrapper, the data
    connection is protected too, and the passive peer check still uses the header's client."""
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "gateway.toml").write_text(
        f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n'
        'client = "required"\nupstream = "off"\n'
    )
    gateway = start_gateway(
        tmp_path,
        "--config",
        str(tmp_path / "gateway.toml"),
        "--upstream",
        f"{server.host}:{server.port}",
        host=INSTANCES[0],
        listen_prefix="haproxy:",
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.check_hostname = False
        ftp = ftplib.FTP_TLS(context=context, timeout=TIMEOUT, source_address=(CLIENT, 0))
        ftp.trust_server_pasv_ipv4_address = True
        sock = socket.create_connection(
            (gateway.host, gateway.port), timeout=TIMEOUT, source_address=(CLIENT, 0)
        )
        # The balancer's part: the header, naming the client's own address.
        client_port = sock.getsockname()[1]
        sock.sendall(header("v2", HostPort.of(CLIENT, client_port), HostPort.of(BALANCER, 21)))
        ftp.sock, ftp.af, ftp.host = sock, sock.family, gateway.host
        ftp.file = sock.makefile("r", encoding="latin-1")
        assert ftp.getresp().startswith("220")
        ftp.auth()
        ftp.login(server.user, server.password)
        ftp.prot_p()
        data = io.BytesIO()
        ftp.retrbinary("RETR file.bin", data.write)
        assert data.getvalue() == PAYLOAD
        ftp.quit()
        assert f"Session started: client {CLIENT}:{client_port}" in gateway.log()
    finally:
        gateway.stop()


def test_passive_peer_check_uses_the_real_client(
    farm: tuple[Balancer, list[GatewayProcess]], server: RunningServer
) -> None:
    """Port theft behind the balancer: a connection from a third address, and one from the
    balancer's side whose PROXY header names someone else, are both dropped; the client,
    named by the control connection's header, still gets its file."""
    balancer, gateways = farm
    ftp = client()
    ftp.connect(BALANCER, balancer.port)
    try:
        ftp.login(server.user, server.password)
        ftp.voidcmd("TYPE I")
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        assert host in INSTANCES  # the instance's own address, not the balancer's
        thief_header = header("v1", HostPort.of("127.0.0.66", 40000), HostPort.of(host, port))
        for source, first in (("127.0.0.7", b""), ("127.0.0.1", thief_header)):
            with socket.create_connection(
                (host, port), timeout=TIMEOUT, source_address=(source, 0)
            ) as thief:
                thief.sendall(first)
                with contextlib.suppress(ConnectionResetError):
                    assert thief.recv(1) == b""  # closed without a byte
        data = socket.create_connection((host, port), timeout=TIMEOUT, source_address=(CLIENT, 0))
        with data:
            ftp.sendcmd("RETR file.bin")
            received = b""
            while chunk := data.recv(65536):
                received += chunk
        assert ftp.voidresp().startswith("226")
        assert received == PAYLOAD
    finally:
        ftp.close()
    logs = "".join(g.log() for g in gateways)
    assert f"Dropped data connection from 127.0.0.7 on a listener for {CLIENT}" in logs
    assert f"Dropped data connection from 127.0.0.66 on a listener for {CLIENT}" in logs


def test_forwarded_data_connection_without_header_is_dropped(
    farm: tuple[Balancer, list[GatewayProcess]], server: RunningServer
) -> None:
    """From the balancer's address, a data connection must start with a header: one that
    sends anything else is dropped and logged, and the port stays open for the client."""
    balancer, gateways = farm
    ftp = client(follow_227=False)
    ftp.connect(BALANCER, balancer.port)
    try:
        ftp.login(server.user, server.password)
        ftp.voidcmd("TYPE I")
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        assert host in INSTANCES
        with socket.create_connection(
            (host, port), timeout=TIMEOUT, source_address=("127.0.0.1", 0)
        ) as thief:
            thief.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert thief.recv(1) == b""
        data = io.BytesIO()
        ftp.retrbinary("RETR file.bin", data.write)  # via the balancer, with a header
        assert data.getvalue() == PAYLOAD
    finally:
        ftp.close()
    logs = "".join(g.log() for g in gateways)
    assert "Dropped forwarded data connection from 127.0.0.1" in logs


@pytest.mark.parametrize("follow_227", [True, False])
def test_ftps_data_through_the_balancer(
    farm: tuple[Balancer, list[GatewayProcess]],
    server: RunningServer,
    farm_pki: Pki,
    follow_227: bool,
) -> None:
    """Explicit FTPS behind HAProxy: TLS on the control connection under the header wrapper,
    and protected data connections both directly and forwarded by the balancer (where the
    socket is handed to the data connection after the header)."""
    balancer, _ = farm
    context = ssl.create_default_context(cafile=str(farm_pki.ca_cert))
    context.check_hostname = False
    ftp = ftplib.FTP_TLS(context=context, timeout=TIMEOUT, source_address=(CLIENT, 0))
    ftp.trust_server_pasv_ipv4_address = follow_227
    ftp.connect(BALANCER, balancer.port)
    try:
        ftp.auth()
        ftp.login(server.user, server.password)
        ftp.prot_p()
        data = io.BytesIO()
        ftp.retrbinary("RETR file.bin", data.write)
        assert data.getvalue() == PAYLOAD
        name = f"tls-{follow_227}.bin"
        assert ftp.storbinary(f"STOR {name}", io.BytesIO(PAYLOAD)).startswith("226")
        ftp.quit()
    finally:
        ftp.close()
    assert (server.root / name).read_bytes() == PAYLOAD


def test_tls_client_hello_in_the_same_segment_as_the_forwarded_header(
    farm: tuple[Balancer, list[GatewayProcess]], server: RunningServer, farm_pki: Pki
) -> None:
    """HAProxy sends a forwarded data connection's header and what the client already sent
    in one segment when the client was quicker than HAProxy's connection to the instance:
    for a protected upload that is the TLS ClientHello. Sent here exactly that way, as
    HAProxy would (from its address, 127.0.0.1), the upload completes byte for byte."""
    balancer, _ = farm
    context = ssl.create_default_context(cafile=str(farm_pki.ca_cert))
    context.check_hostname = False
    ftp = ftplib.FTP_TLS(context=context, timeout=TIMEOUT, source_address=(CLIENT, 0))
    ftp.connect(BALANCER, balancer.port)
    try:
        ftp.auth()
        ftp.login(server.user, server.password)
        ftp.prot_p()
        ftp.voidcmd("TYPE I")
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, session=ftp.sock.session)  # type: ignore[union-attr]
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        client_hello = outgoing.read()
        client_port = ftp.sock.getsockname()[1]  # type: ignore[union-attr]
        forwarded = header("v2", HostPort.of(CLIENT, client_port), HostPort.of(BALANCER, port))
        with socket.create_connection((host, port), timeout=TIMEOUT) as data:
            data.sendall(forwarded + client_hello)  # one segment, as HAProxy may send it
            ftp.putcmd("STOR hello.bin")
            assert ftp.getresp()[:3] in ("125", "150")
            while True:  # the rest of the handshake
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    data.sendall(outgoing.read())
                    chunk = data.recv(65536)
                    assert chunk, "the gateway closed the data connection in the handshake"
                    incoming.write(chunk)
            tls.write(PAYLOAD)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()
            data.sendall(outgoing.read())
            data.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                while data.recv(65536):
                    pass
        assert ftp.voidresp().startswith("226")
        ftp.quit()
    finally:
        ftp.close()
    assert (server.root / "hello.bin").read_bytes() == PAYLOAD
