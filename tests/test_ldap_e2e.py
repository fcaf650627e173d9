"""Proxy logins against a real OpenLDAP slapd (tests/slapd.py: our own instance on loopback, with
a throwaway database), through a real gateway process in forward mode with real clients.

Covers LDAPS with search-then-bind and a required group, StartTLS with a DN template, names
that must be escaped in filters and DNs, empty passwords (an anonymous bind is no login), the
per-IP throttle, a directory that refuses connections or never answers (421 with a sentence,
no hang), a directory certificate from the wrong CA, and no password in the gateway's log."""

from __future__ import annotations

import ftplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import lftp
from gateway_process import GatewayProcess, free_port, start_gateway
from pki import Pki
from servers import RunningServer
from slapd import GROUP_DN, SERVICE_DN, SERVICE_PASSWORD, SUFFIX, USERS, RunningSlapd, start_slapd

CONTENT = b"behind a directory login\n"
ALICE = USERS["alice"]


SERVED = {"f.txt": CONTENT}


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RunningSlapd]:
    server = start_slapd(tmp_path_factory.mktemp("slapd"), pki)
    yield server
    server.stop()


def gateway(tmp: Path, ldap: str, *, max_failed: int = 100) -> GatewayProcess:
    config = tmp / "gateway.toml"
    config.write_text(
        'proxy_auth = ["ldap:"]\nallow_upstream = ["127.0.0.0/8"]\n'
        f"[limits]\nmax_failed_logins = {max_failed}\n[ldap]\n{ldap}"
    )
    return start_gateway(tmp, "--config", str(config))


def search_then_bind(tmp: Path, url: str, pki: Pki) -> str:
    secret = tmp / "ldap-service-password"
    secret.write_text(SERVICE_PASSWORD + "\n")
    secret.chmod(0o600)
    return (
        f'url = "{url}"\nca_file = "{pki.ca_cert}"\n'
        f'bind_dn = "{SERVICE_DN}"\nbind_password_file = "{secret}"\n'
        f'base_dn = "ou=people,{SUFFIX}"\nfilter = "(&(objectClass=inetOrgPerson)(uid={{user}}))"\n'
        f'require_group = "{GROUP_DN}"\ntimeout = 5\n'
    )


def proxy_login(gw: GatewayProcess, user: str, password: str) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", gw.port)
    ftp.login(user, password)
    return ftp


def refused(gw: GatewayProcess, user: str, password: str) -> None:
    with pytest.raises(ftplib.error_perm, match="530 Proxy login incorrect"):
        proxy_login(gw, user, password)


def assert_no_password_logged(gw: GatewayProcess) -> None:
    log = gw.log()
    assert "Proxy login" in log or "Proxy user" in log  # the right log, and written
    for password in (*USERS.values(), SERVICE_PASSWORD, "wrong-password"):
        assert password not in log


def test_ldaps_search_then_bind_with_required_group(
    tmp_path: Path, directory: RunningSlapd, pki: Pki, server: RunningServer
) -> None:
    gw = gateway(tmp_path, search_then_bind(tmp_path, directory.ldaps_url, pki))
    try:
        out = tmp_path / "f.txt"
        result = lftp(
            f"set ftp:proxy ftp://alice:{ALICE}@127.0.0.1:{gw.port}; "
            "set ftp:proxy-auth-type user; "
            f"open -u {server.user},{server.password} -p {server.port} 127.0.0.1; "
            f"get f.txt -o {out}"
        )
        assert result.returncode == 0, result.stderr.decode() + gw.log()[-3000:]
        assert out.read_bytes() == CONTENT
        # A name with a comma and an apostrophe, found through an escaped filter.
        ftp = proxy_login(gw, "o'brien, jr", USERS["o'brien, jr"])
        ftp.sendcmd(f"USER {server.user}@127.0.0.1:{server.port}")
        assert ftp.sendcmd(f"PASS {server.password}").startswith("230")
        ftp.quit()
        refused(gw, "alice", "wrong-password")
        refused(gw, "bob", USERS["bob"])  # right password, not in the group
        refused(gw, "*", ALICE)  # a wildcard matches no one: the name is escaped
        refused(gw, "al*", ALICE)
        refused(gw, "alice", "")  # never an anonymous bind
        refused(gw, "nobody", ALICE)
        log = gw.log()
        assert "Proxy user alice authenticated" in log
        assert f"Proxy user bob is not a member of {GROUP_DN}" in log
        assert log.count("Proxy login failed for") == 6
        assert_no_password_logged(gw)
    finally:
        gw.stop()


def test_starttls_with_a_dn_template(
    tmp_path: Path, directory: RunningSlapd, pki: Pki, server: RunningServer
) -> None:
    ldap = (
        f'url = "{directory.url}"\nstarttls = true\nca_file = "{pki.ca_cert}"\n'
        f'user_dn_template = "uid={{user}},ou=people,{SUFFIX}"\n'
    )
    gw = gateway(tmp_path, ldap)
    try:
        ftp = proxy_login(gw, "alice", ALICE)
        ftp.sendcmd(f"USER {server.user}@127.0.0.1:{server.port}")
        assert ftp.sendcmd(f"PASS {server.password}").startswith("230")
        assert ftp.nlst() == ["f.txt"]
        ftp.quit()
        proxy_login(gw, "o'brien, jr", USERS["o'brien, jr"]).quit()  # the comma is escaped
        proxy_login(gw, "bob", USERS["bob"]).quit()  # no require_group here
        refused(gw, "bob", ALICE)
        refused(gw, "alice,ou=people", ALICE)  # cannot name another DN
        refused(gw, "alice", "")
        assert_no_password_logged(gw)
    finally:
        gw.stop()


def test_failed_directory_logins_are_throttled(
    tmp_path: Path, directory: RunningSlapd, pki: Pki
) -> None:
    gw = gateway(tmp_path, search_then_bind(tmp_path, directory.ldaps_url, pki), max_failed=3)
    try:
        refused(gw, "alice", "wrong-password")
        refused(gw, "bob", USERS["bob"])
        refused(gw, "alice", "wrong-password")
        with pytest.raises(ftplib.error_temp, match="421 Too many failed logins"):
            proxy_login(gw, "alice", ALICE)
        assert_no_password_logged(gw)
    finally:
        gw.stop()


def test_a_directory_that_is_down_gets_421(tmp_path: Path, pki: Pki) -> None:
    closed = free_port()  # nothing listens here
    silent = socket.socket()  # accepts connections (in the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for port, reason in (
            (closed, "refused the connection"),
            (silent.getsockname()[1], "did not answer in time"),
        ):
            workdir = tmp_path / str(port)
            workdir.mkdir()
            ldap = (
                f'url = "ldaps://127.0.0.1:{port}"\nca_file = "{pki.ca_cert}"\n'
                f'user_dn_template = "uid={{user}},ou=people,{SUFFIX}"\ntimeout = 2\n'
            )
            gw = gateway(workdir, ldap, max_failed=1)
            try:
                for _ in range(2):  # not counted as failed logins: the throttle stays open
                    with pytest.raises(
                        ftplib.error_temp, match="421 Proxy login cannot be checked"
                    ):
                        # ftplib's own 30 s timeout would raise socket.timeout on a hang.
                        proxy_login(gw, "alice", ALICE)
                log = gw.log()
                assert f"Proxy login for alice could not be checked: the directory {reason}" in log
                assert ALICE not in log
            finally:
                gw.stop()
    finally:
        silent.close()


def test_starttls_with_the_wrong_ca_is_refused(
    tmp_path: Path, directory: RunningSlapd, pki: Pki
) -> None:
    ldap = (
        f'url = "{directory.url}"\nstarttls = true\nca_file = "{pki.untrusted_ca_cert}"\n'
        f'user_dn_template = "uid={{user}},ou=people,{SUFFIX}"\n'
    )
    gw = gateway(tmp_path, ldap)
    try:
        with pytest.raises(ftplib.error_temp, match="421 Proxy login cannot be checked"):
            proxy_login(gw, "alice", ALICE)
        log = gw.log()
        assert "the directory's TLS certificate could not be verified" in log
        assert ALICE not in log
    finally:
        gw.stop()
    # The same over LDAPS.
    ldap = ldap.replace(
        f'url = "{directory.url}"\nstarttls = true', f'url = "{directory.ldaps_url}"'
    )
    workdir = tmp_path / "ldaps"
    workdir.mkdir()
    gw = gateway(workdir, ldap)
    try:
        with pytest.raises(ftplib.error_temp, match="421 Proxy login cannot be checked"):
            proxy_login(gw, "alice", ALICE)
        assert "the directory's TLS certificate could not be verified" in gw.log()
    finally:
        gw.stop()


def test_anonymous_search_and_a_refused_service_account(
    tmp_path: Path, directory: RunningSlapd, pki: Pki
) -> None:
    anonymous = (
        f'url = "{directory.url}"\nstarttls = true\nca_file = "{pki.ca_cert}"\n'
        f'base_dn = "ou=people,{SUFFIX}"\n'
    )
    gw = gateway(tmp_path, anonymous)
    try:
        proxy_login(gw, "bob", USERS["bob"]).quit()  # default filter (uid={user}), no group
        refused(gw, "bob", "wrong-password")
        assert_no_password_logged(gw)
    finally:
        gw.stop()
    # A service account the directory refuses is the gateway's problem, not the client's.
    workdir = tmp_path / "bad-service"
    workdir.mkdir()
    ldap = anonymous + f'bind_dn = "{SERVICE_DN}"\nbind_password = "not-the-service-password"\n'
    gw = gateway(workdir, ldap, max_failed=1)
    try:
        for _ in range(2):  # not counted against the client
            with pytest.raises(ftplib.error_temp, match="421 Proxy login cannot be checked"):
                proxy_login(gw, "alice", ALICE)
        log = gw.log()
        assert "the directory refused the service account's bind" in log
        assert "not-the-service-password" not in log and ALICE not in log
    finally:
        gw.stop()
