"""Transparent mode on a NAT edge, in network namespaces the test builds and removes:

    client 198.18.0.2 ── 198.18.0.1 edge 198.19.0.1 ── 198.19.0.2 server

The edge does not forward packets. nftables on the edge redirects the client's connections to
the server's FTP port to the gateway, which reads the original destination and proxies to it.
Every byte between the two sides can only have crossed through the gateway: the client talks to
"the server" in passive and active mode without knowing a gateway is there, and the server only
ever sees the edge's address.
"""

from __future__ import annotations

import ftplib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clients import sha256
from gateway_process import GatewayProcess, start_gateway
from netns import Namespace, link
from servers import RunningServer, start_server

PAYLOAD = os.urandom(2 * 1024 * 1024 + 3)
CLIENT, EDGE_INSIDE, EDGE_OUTSIDE, SERVER = "198.18.0.2", "198.18.0.1", "198.19.0.1", "198.19.0.2"
PASSIVE_PORTS = "30000-30099"
TIMEOUT = 30.0


@dataclass
class Edge:
    client: Namespace
    edge: Namespace
    server_ns: Namespace
    server: RunningServer
    gateway: GatewayProcess


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    tag = f"{os.getpid() % 100000}"
    spaces: list[Namespace] = []
    started: list[tuple[Namespace, RunningServer | GatewayProcess]] = []
    try:
        client, edge_ns, server_ns = (Namespace(f"gw{tag}{role}") for role in "ces")
        spaces += [client, edge_ns, server_ns]
        link(client, "eth0", f"{CLIENT}/24", edge_ns, "inside", f"{EDGE_INSIDE}/24")
        link(edge_ns, "outside", f"{EDGE_OUTSIDE}/24", server_ns, "eth0", f"{SERVER}/24")
        client.ip("route", "add", "default", "via", EDGE_INSIDE)
        server_ns.ip("route", "add", "default", "via", EDGE_OUTSIDE)

        server = server_ns.call(start_server, "pyftpdlib", tmp_path / "server", host=SERVER)
        started.append((server_ns, server))
        (server.root / "data.bin").write_bytes(PAYLOAD)
        gateway = edge_ns.call(
            start_gateway,
            tmp_path,
            "--transparent",
            "--allow-upstream",
            "198.19.0.0/24",
            "--passive-ports",
            PASSIVE_PORTS,
            host=EDGE_INSIDE,
        )
        started.append((edge_ns, gateway))
        # The control port goes to the gateway's port, the passive range to the same ports on
        # the edge: clients connect to "the server's" address for passive data (ftplib ignores
        # the address in 227, EPSV has none). Port 21 to the edge itself is redirected too:
        # its original destination is a reserved address the policy does not allow.
        edge_ns.nft(
            "table ip transparent_test {\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat;\n"
            f'    iifname "inside" tcp dport {{ 21, {server.port} }} redirect to :{gateway.port}\n'
            f'    iifname "inside" tcp dport {PASSIVE_PORTS} redirect\n'
            "  }\n"
            "}\n"
        )
        yield Edge(client, edge_ns, server_ns, server, gateway)
    finally:
        for namespace, process in reversed(started):
            namespace.call(process.stop)
        for namespace in spaces:
            namespace.delete()


def transfer(port: int, user: str, password: str, passive: bool) -> tuple[bytes, str]:
    """From the client: log in to "the server", download, upload; the download and the reply
    to the upload."""
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect(SERVER, port)
    ftp.login(user, password)
    ftp.set_pasv(passive)
    received = io.BytesIO()
    ftp.retrbinary("RETR data.bin", received.write)
    stored = ftp.storbinary(f"STOR up-{passive}.bin", io.BytesIO(PAYLOAD))
    ftp.quit()
    return received.getvalue(), stored


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_redirected_client_reaches_its_server_through_the_gateway(
    edge: Edge, passive: bool
) -> None:
    server = edge.server
    received, stored = edge.client.call(
        transfer, server.port, server.user, server.password, passive
    )
    assert sha256(received) == sha256(PAYLOAD)
    assert stored.startswith("226")
    assert sha256((server.root / f"up-{passive}.bin").read_bytes()) == sha256(PAYLOAD)
    # The server only ever saw the edge, and the gateway knew where the client meant to go.
    peers = set(re.findall(r"([0-9.]+):\d+-\[ftptest\]", server.output_path.read_text()))
    assert peers == {EDGE_OUTSIDE}
    assert f"Connected to upstream {SERVER}:{server.port}" in edge.gateway.log()


def greeting(host: str, port: int) -> str:
    ftp = ftplib.FTP(timeout=TIMEOUT)
    try:
        return ftp.connect(host, port)
    except ftplib.Error as e:
        return str(e)
    finally:
        ftp.close()


def test_unredirected_and_denied_connections_are_refused(edge: Edge) -> None:
    direct = edge.client.call(greeting, EDGE_INSIDE, edge.gateway.port)
    assert direct.startswith("421") and "redirected connections only" in direct
    denied = edge.client.call(greeting, EDGE_INSIDE, 21)
    assert denied.startswith("421") and "denied by policy" in denied
    assert edge.gateway.proc.poll() is None
