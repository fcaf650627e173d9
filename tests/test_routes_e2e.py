"""Per-user routes behind one gateway process, with vsftpd and pure-ftpd as backends and real
ftplib clients: name rewriting, the default 530, upstream accounts behind a proxy login (also by
the directory group of an LDAP login, with a real slapd), routes files in CSV and TOML re-read on
SIGHUP, and a routes file with passwords that others may read refused at start."""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_process import PROJECT, GatewayProcess, free_port, start_gateway
from pki import make_pki
from servers import RunningServer, start_server
from slapd import GROUP_DN, SUFFIX, USERS, start_slapd

TIMEOUT = 30.0
PAYLOAD = os.urandom(64 * 1024 + 7)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer]]:
    started = {
        "vs": start_server("vsftpd", tmp_path_factory.mktemp("vs")),
        "pure": start_server("pure-ftpd", tmp_path_factory.mktemp("pure")),
    }
    for name, server in started.items():
        (server.root / "which.txt").write_bytes(name.encode())
    yield started
    for server in started.values():
        server.stop()


def backends(servers: dict[str, RunningServer]) -> str:
    tables = [
        f'[[backends]]\nname = "{name}"\naddress = "{server.host}:{server.port}"\n'
        f'group = "{name}-group"\n'
        for name, server in servers.items()
    ]
    return "\n".join(tables) + '\n[tls]\nupstream = "off"\n[health]\ninterval = 1\n'


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


def start(tmp_path: Path, gateways: list[GatewayProcess], text: str) -> GatewayProcess:
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    gateway = start_gateway(tmp_path, "--config", str(config))
    gateways.append(gateway)
    return gateway


def which(gateway: GatewayProcess, user: str, password: str) -> str:
    """Log in through the gateway and read which.txt: the backend the session went to."""
    ftp = ftplib.FTP(timeout=TIMEOUT)
    try:
        greeting = ftp.connect("127.0.0.1", gateway.port)
        assert greeting.startswith("220 FTP gateway ready"), greeting
        ftp.login(user, password)
        buffer = io.BytesIO()
        ftp.retrbinary("RETR which.txt", buffer.write)
        ftp.quit()
        return buffer.getvalue().decode()
    finally:
        ftp.close()


def test_suffix_routes_rewrite_the_name_and_an_unrouted_name_gets_530(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    vs, pure = servers["vs"], servers["pure"]
    gateway = start(
        tmp_path,
        gateways,
        backends(servers)
        + '[[routes]]\nuser = "*@site-vs"\nbackend = "vs"\nupstream_user = "{local}"\n'
        + '[[routes]]\nuser = "*@site-pure"\nbackend_group = "pure-group"\n'
        + 'upstream_user = "{local}"\n',
    )
    assert which(gateway, f"{vs.user}@site-vs", vs.password) == "vs"
    assert which(gateway, f"{pure.user}@site-pure", pure.password) == "pure"
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect("127.0.0.1", gateway.port)
    with pytest.raises(ftplib.error_perm) as refused:
        ftp.sendcmd(f"USER {vs.user}@elsewhere")
    assert str(refused.value) == "530 No route for this user on this gateway."
    # The session goes on: the client may try a name that is routed.
    assert ftp.sendcmd(f"USER {vs.user}@site-vs").startswith("331")
    ftp.close()
    assert f"No route for user {vs.user}@elsewhere" in gateway.log()


def test_a_default_route_catches_every_other_name(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    pure = servers["pure"]
    gateway = start(
        tmp_path,
        gateways,
        backends(servers)
        + '[[routes]]\nuser = "nobody-here"\nbackend = "vs"\n'
        + '[[routes]]\nuser = "*"\nbackend = "pure"\n',
    )
    assert which(gateway, pure.user, pure.password) == "pure"


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_route_credentials_log_in_upstream_behind_a_proxy_login(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    pure = servers["pure"]
    routes = write_private(
        tmp_path / "routes.csv",
        f"user,backend,upstream_user,upstream_password\nalice,pure,{pure.user},{pure.password}\n",
    )
    gateway = start(
        tmp_path,
        gateways,
        f'proxy_auth = ["memory:alice:alice-proxy-pw"]\nroutes_file = "{routes}"\n'
        + backends(servers),
    )
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect("127.0.0.1", gateway.port)
    assert ftp.sendcmd("USER alice").startswith("331")
    assert ftp.sendcmd("PASS alice-proxy-pw").startswith("230")
    buffer = io.BytesIO()
    ftp.retrbinary("RETR which.txt", buffer.write)
    assert buffer.getvalue() == b"pure"
    assert ftp.storbinary("STOR from-alice.bin", io.BytesIO(PAYLOAD)).startswith("226")
    ftp.quit()
    assert (pure.root / "from-alice.bin").read_bytes() == PAYLOAD
    # A wrong proxy password never reaches the backend.
    ftp = ftplib.FTP(timeout=TIMEOUT)
    ftp.connect("127.0.0.1", gateway.port)
    ftp.sendcmd("USER alice")
    with pytest.raises(ftplib.error_perm, match="530 Proxy login incorrect"):
        ftp.sendcmd("PASS guess")
    ftp.close()
    log = gateway.log()
    assert "Proxy user alice authenticated" in log
    assert pure.password not in log and "alice-proxy-pw" not in log


def test_routes_file_is_re_read_on_sighup_csv_then_toml(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    vs, pure = servers["vs"], servers["pure"]
    csv_routes = tmp_path / "routes.csv"
    csv_routes.write_text("user,backend\n*,vs\n")
    config = f'routes_file = "{csv_routes}"\n' + backends(servers)
    gateway = start(tmp_path, gateways, config)
    assert which(gateway, vs.user, vs.password) == "vs"
    toml_routes = tmp_path / "routes.toml"
    toml_routes.write_text('[[routes]]\nuser = "*"\nbackend = "pure"\n')
    (tmp_path / "gateway.toml").write_text(f'routes_file = "{toml_routes}"\n' + backends(servers))
    hang_up(gateway)
    assert which(gateway, pure.user, pure.password) == "pure"
    # An edit of the file itself counts at the next SIGHUP too.
    toml_routes.write_text('[[routes]]\nuser = "*"\nbackend_group = "vs-group"\n')
    hang_up(gateway)
    assert which(gateway, vs.user, vs.password) == "vs"


def hang_up(gateway: GatewayProcess) -> None:
    expect = "Configuration reloaded"
    before = gateway.log().count(expect)
    gateway.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gateway.log().count(expect) <= before:
        assert gateway.proc.poll() is None, gateway.log()[-2000:]
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        time.sleep(0.05)


def test_a_routes_file_with_passwords_that_others_may_read_stops_the_start(
    tmp_path: Path, servers: dict[str, RunningServer]
) -> None:
    routes = write_private(
        tmp_path / "routes.csv",
        "user,backend,upstream_user,upstream_password\nalice,pure,svc,secret-pw\n",
        mode=0o644,
    )
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'proxy_auth = ["memory:alice:pw"]\nroutes_file = "{routes}"\n' + backends(servers)
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(config),
            "--listen",
            f"tcp:{free_port()}:interface=127.0.0.1",
        ],
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"ftp-gateway: configuration error: routes_file: {routes}: holds upstream passwords "
        "but others may read it (mode 0644); chmod o-rwx it"
    ]
    assert "secret-pw" not in result.stderr + result.stdout


def test_routes_match_the_directory_group_of_an_ldap_proxy_login(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    """alice logs in through the directory and is found in its group, carol through a
    memory checker with no group: the group decides which backend account each gets."""
    pki = make_pki(tmp_path / "pki")
    directory = start_slapd(tmp_path / "slapd", pki)
    try:
        vs, pure = servers["vs"], servers["pure"]
        routes = write_private(
            tmp_path / "routes.csv",
            "user,proxy_group,backend,upstream_user,upstream_password\n"
            f'*,"{GROUP_DN}",vs,{vs.user},{vs.password}\n'
            f"*,,pure,{pure.user},{pure.password}\n",
        )
        gateway = start(
            tmp_path,
            gateways,
            f'proxy_auth = ["ldap:", "memory:carol:carol-pw"]\nroutes_file = "{routes}"\n'
            + backends(servers)
            + f'[ldap]\nurl = "{directory.ldaps_url}"\nca_file = "{pki.ca_cert}"\n'
            f'user_dn_template = "uid={{user}},ou=people,{SUFFIX}"\n'
            f'require_group = "{GROUP_DN}"\n',
        )
        assert which(gateway, "alice", USERS["alice"]) == "vs"
        assert which(gateway, "carol", "carol-pw") == "pure"
        log = gateway.log()
        assert vs.password not in log and pure.password not in log
        assert USERS["alice"] not in log
    finally:
        directory.stop()


def test_a_directory_login_spelled_differently_is_refused_not_routed_elsewhere(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    """LDAP compares uid without case and ignores spaces, so "ALICE" or " alice" binds as
    alice; routes (and rate_per_user) compare names exactly. A login is accepted only under
    the directory's own spelling, so no spelling escapes alice's route (here: to pure) into
    the default route (to vs), with a DN template and with search-then-bind."""
    pki = make_pki(tmp_path / "pki")
    directory = start_slapd(tmp_path / "slapd", pki)
    try:
        vs, pure = servers["vs"], servers["pure"]
        routes = write_private(
            tmp_path / "routes.csv",
            "user,backend,upstream_user,upstream_password\n"
            f"alice,pure,{pure.user},{pure.password}\n"
            f"*,vs,{vs.user},{vs.password}\n",
        )
        ldap = f'[ldap]\nurl = "{directory.ldaps_url}"\nca_file = "{pki.ca_cert}"\n'
        ways = {
            "template": f'user_dn_template = "uid={{user}},ou=people,{SUFFIX}"\n',
            "search": f'base_dn = "ou=people,{SUFFIX}"\nfilter = "(uid={{user}})"\n',
        }
        for way, settings in ways.items():
            gateway = start(
                tmp_path,
                gateways,
                f'proxy_auth = ["ldap:"]\nroutes_file = "{routes}"\n'
                + backends(servers)
                + ldap
                + settings,
            )
            assert which(gateway, "alice", USERS["alice"]) == "pure", way
            for spelling in ("ALICE", "Alice", "alice "):
                with pytest.raises(ftplib.error_perm, match="530 Proxy login incorrect"):
                    which(gateway, spelling, USERS["alice"])
            log = gateway.log()
            assert "routed to vs" not in log, way
            assert "Proxy user ALICE is not spelled as the directory spells it" in log, way
            assert USERS["alice"] not in log and pure.password not in log
            gateway.stop()
    finally:
        directory.stop()


def test_a_routes_file_opened_to_others_or_swapped_after_start_is_refused_at_sighup(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    """After start, the routes file holding a password is made world-readable, then replaced
    by a symlink to a world-readable file that sends alice to another account: each SIGHUP
    is refused with one line, and alice keeps the route she had."""
    vs, pure = servers["vs"], servers["pure"]
    routes = write_private(
        tmp_path / "routes.csv",
        f"user,backend,upstream_user,upstream_password\nalice,pure,{pure.user},{pure.password}\n",
    )
    gateway = start(
        tmp_path,
        gateways,
        f'proxy_auth = ["memory:alice:alice-proxy-pw"]\nroutes_file = "{routes}"\n'
        + backends(servers),
    )
    assert which(gateway, "alice", "alice-proxy-pw") == "pure"
    refusal = (
        f"Reload failed, keeping the running configuration: routes_file: {routes}: holds "
        "upstream passwords but others may read it (mode 0644); chmod o-rwx it"
    )
    os.chmod(routes, 0o644)
    refused_reload(gateway, refusal, 1)
    assert which(gateway, "alice", "alice-proxy-pw") == "pure"
    swapped = write_private(
        tmp_path / "elsewhere.csv",
        f"user,backend,upstream_user,upstream_password\nalice,vs,{vs.user},{vs.password}\n",
        0o644,
    )
    routes.unlink()
    routes.symlink_to(swapped)
    refused_reload(gateway, refusal, 2)
    assert which(gateway, "alice", "alice-proxy-pw") == "pure"
    log = gateway.log()
    assert pure.password not in log and vs.password not in log


def refused_reload(gateway: GatewayProcess, line: str, count: int) -> None:
    gateway.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gateway.log().count(line) < count:
        assert gateway.proc.poll() is None, gateway.log()[-2000:]
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        time.sleep(0.05)


def test_failed_proxy_logins_in_front_of_routes_count_towards_the_throttle(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    """Reverse mode with routes behind a proxy login: wrong proxy passwords get 530, reach
    no backend, count for the client's address, and then even the right one gets 421."""
    pure = servers["pure"]
    routes = write_private(
        tmp_path / "routes.csv",
        f"user,backend,upstream_user,upstream_password\nalice,pure,{pure.user},{pure.password}\n",
    )
    gateway = start(
        tmp_path,
        gateways,
        f'proxy_auth = ["memory:alice:alice-proxy-pw"]\nroutes_file = "{routes}"\n'
        + backends(servers)
        + "[limits]\nmax_failed_logins = 2\n",
    )
    for guess in ("guess-1", "guess-2"):
        with pytest.raises(ftplib.error_perm, match="530 Proxy login incorrect"):
            which(gateway, "alice", guess)
    with pytest.raises(ftplib.error_temp, match="421 Too many failed logins"):
        which(gateway, "alice", "alice-proxy-pw")
    log = gateway.log()
    assert log.count("Proxy login failed for alice") == 2
    assert "routed to" not in log and "sent to backend" not in log
    assert "guess-1" not in log and "alice-proxy-pw" not in log and pure.password not in log


def test_after_a_routed_login_no_other_account_can_be_tried(
    tmp_path: Path, servers: dict[str, RunningServer], gateways: list[GatewayProcess]
) -> None:
    """Behind a proxy login with a route account on pure-ftpd, the client tries USER (also
    in lower case, also after REIN) to log in as pure-ftpd's other account: refused by the
    gateway every time, and the session still works as the route's account."""
    pure = servers["pure"]
    routes = write_private(
        tmp_path / "routes.csv",
        f"user,backend,upstream_user,upstream_password\nalice,pure,{pure.user},{pure.password}\n",
    )
    gateway = start(
        tmp_path,
        gateways,
        f'proxy_auth = ["memory:alice:alice-proxy-pw"]\nroutes_file = "{routes}"\n'
        + backends(servers),
    )
    ftp = ftplib.FTP(timeout=TIMEOUT)
    try:
        ftp.connect("127.0.0.1", gateway.port)
        ftp.login("alice", "alice-proxy-pw")
        for verb in ("USER", "user"):
            with pytest.raises(ftplib.error_perm, match="530 Reconnect to log in as another"):
                ftp.sendcmd(f"{verb} root")
        buffer = io.BytesIO()
        ftp.retrbinary("RETR which.txt", buffer.write)
        assert buffer.getvalue() == b"pure"
        # pure-ftpd may not implement REIN; what matters is the USER after it.
        with contextlib.suppress(ftplib.error_perm):
            ftp.sendcmd("REIN")
        with pytest.raises(ftplib.error_perm, match="530 Reconnect to log in as another"):
            ftp.sendcmd("USER root")
    finally:
        ftp.close()
    assert "User root" not in gateway.log()
