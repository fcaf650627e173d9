"""Security policy with real parts: proxy logins in every style lftp speaks, the throttle on
failed logins, client ACL and session limits, command rules, timeouts and loops."""

from __future__ import annotations

import ftplib
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import curl, lftp, lftp_sent
from gateway_process import PROJECT, GatewayProcess, start_gateway, wait_for_port
from servers import RunningServer

CONTENT = b"through the proxy\n"


SERVED = {"f.txt": CONTENT}


def config(tmp: Path, text: str) -> str:
    path = tmp / f"c{len(list(tmp.glob('c*.toml')))}.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def auth_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("auth")
    users = tmp / "proxy-users"
    users.write_text("fileuser:filepass\n")
    text = (
        f'proxy_auth = ["memory:proxy:secret", "file:{users}"]\n'
        'allow_upstream = ["127.0.0.0/8"]\n[limits]\nmax_failed_logins = 3\n'
    )
    gw = start_gateway(tmp, "--config", config(tmp, text))
    yield gw
    gw.stop()


@pytest.mark.parametrize("style", ["user", "joined", "joined-acct", "open", "proxy-user@host"])
def test_lftp_proxy_auth_styles(
    auth_gateway: GatewayProcess, server: RunningServer, tmp_path: Path, style: str
) -> None:
    out = tmp_path / "f.txt"
    log = tmp_path / "lftp.log"
    result = lftp(
        f"set ftp:proxy ftp://proxy:secret@127.0.0.1:{auth_gateway.port}; "
        f"set ftp:proxy-auth-type {style}; "
        f"open -u {server.user},{server.password} -p {server.port} 127.0.0.1; "
        f"get f.txt -o {out}",
        log=log,
    )
    assert result.returncode == 0, result.stderr.decode() + log.read_text()[-2000:]
    assert out.read_bytes() == CONTENT
    sent = lftp_sent(log)
    assert {"ACCT": "joined-acct", "OPEN": "open"}.get(
        next((v for v in sent if v in ("ACCT", "OPEN")), ""), style
    ) == style
    assert "secret" not in auth_gateway.log()  # credentials are never logged


def test_file_checker_and_wrong_password(
    auth_gateway: GatewayProcess, server: RunningServer
) -> None:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", auth_gateway.port)
    ftp.login("fileuser", "filepass")
    ftp.sendcmd(f"USER {server.user}@127.0.0.1:{server.port}")
    assert ftp.sendcmd(f"PASS {server.password}").startswith("230")
    ftp.quit()
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", auth_gateway.port)
    with pytest.raises(ftplib.error_perm, match="530 Proxy login incorrect"):
        ftp.login("proxy", "wrong")
    ftp.close()


def test_unauthenticated_client_cannot_reach_any_upstream(
    auth_gateway: GatewayProcess, server: RunningServer
) -> None:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", auth_gateway.port)
    ftp.sendcmd(f"USER {server.user}@127.0.0.1:{server.port}")
    with pytest.raises(ftplib.error_perm):
        ftp.sendcmd(f"PASS {server.password}")  # taken as the proxy password: refused
    with pytest.raises(ftplib.error_perm, match="530"):
        ftp.sendcmd("OPEN 127.0.0.1")
    ftp.close()


def test_failed_proxy_logins_are_throttled_per_address(tmp_path: Path) -> None:
    text = 'proxy_auth = ["memory:proxy:secret"]\n[limits]\nmax_failed_logins = 3\n'
    gw = start_gateway(tmp_path, "--config", config(tmp_path, text))
    try:
        for _ in range(3):
            ftp = ftplib.FTP(timeout=30)
            ftp.connect("127.0.0.1", gw.port)
            with pytest.raises(ftplib.error_perm):
                ftp.login("proxy", "guess")
            ftp.close()
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", gw.port)
        with pytest.raises(ftplib.error_temp, match="421 Too many failed logins"):
            ftp.login("proxy", "secret")  # even the right password, for a while
        ftp.close()
    finally:
        gw.stop()


def test_client_acl_refuses_with_421(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, "--config", config(tmp_path, 'deny_clients = ["127.0.0.0/8"]\n'))
    try:
        with pytest.raises(ftplib.error_temp, match="421 Access denied"):
            ftplib.FTP(timeout=30).connect("127.0.0.1", gw.port)
    finally:
        gw.stop()
    assert "Refused client" in gw.log()


def test_per_ip_session_limit(tmp_path: Path) -> None:
    gw = start_gateway(
        tmp_path, "--config", config(tmp_path, "[limits]\nmax_sessions_per_ip = 2\n")
    )
    try:
        # start_gateway's probe connection is a session too: wait until it has ended.
        deadline = time.monotonic() + 10
        while "Session ended" not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.05)
        held = [ftplib.FTP(timeout=30) for _ in range(2)]
        for ftp in held:
            assert ftp.connect("127.0.0.1", gw.port).startswith("220")
        with pytest.raises(ftplib.error_temp, match="421 Too many sessions from your address"):
            ftplib.FTP(timeout=30).connect("127.0.0.1", gw.port)
        held[0].close()
        deadline = time.monotonic() + 10
        while True:  # the slot frees once the gateway has seen the close
            try:
                assert ftplib.FTP(timeout=30).connect("127.0.0.1", gw.port).startswith("220")
                break
            except ftplib.error_temp:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        gw.stop()


def test_read_only_preset_and_deny_list(tmp_path: Path, server: RunningServer) -> None:
    text = '[commands]\nread_only = true\ndeny = ["MDTM"]\n'
    gw = start_gateway(
        tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", config(tmp_path, text)
    )
    try:
        src = tmp_path / "up.txt"
        src.write_bytes(b"nope")
        result = curl(
            f"ftp://{server.user}:{server.password}@127.0.0.1:{gw.port}/x.txt", "-T", str(src)
        )
        assert result.returncode != 0
        assert b"550 STOR is not allowed: this gateway is read-only." in result.stderr
        assert not (server.root / "x.txt").exists()
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", gw.port)
        ftp.login(server.user, server.password)
        with pytest.raises(ftplib.error_perm, match="502"):
            ftp.sendcmd("MDTM f.txt")
        with pytest.raises(ftplib.error_perm, match="550"):
            ftp.mkd("newdir")
        ftp.voidcmd("TYPE I")
        assert ftp.size("f.txt") == len(CONTENT)
        ftp.quit()
    finally:
        gw.stop()


def test_login_and_idle_timeouts(tmp_path: Path, server: RunningServer) -> None:
    text = "[timeouts]\nlogin = 1\nidle = 2\n"
    gw = start_gateway(
        tmp_path, "--upstream", f"127.0.0.1:{server.port}", "--config", config(tmp_path, text)
    )
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            f = sock.makefile("rb")
            assert f.readline().startswith(b"220")
            assert f.readline().startswith(b"421 Login timed out")
            assert f.readline() == b""  # closed
        ftp = ftplib.FTP(timeout=10)
        ftp.connect("127.0.0.1", gw.port)
        ftp.login(server.user, server.password)
        time.sleep(3)
        with pytest.raises((ftplib.error_temp, EOFError, OSError)) as closed:
            ftp.voidcmd("NOOP")
        assert "421" in str(closed.value) or isinstance(closed.value, EOFError | OSError)
    finally:
        gw.stop()


def test_gateway_refuses_to_proxy_to_itself(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, "--allow-upstream", "127.0.0.0/8")
    try:
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", gw.port)
        with pytest.raises(ftplib.Error) as refused:
            ftp.login(f"x@127.0.0.1:{gw.port}", "pw")
        assert "loop" in str(refused.value).lower()
    finally:
        gw.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 21 and dropping privileges need root")
def test_binds_port_21_as_root_then_runs_unprivileged(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # the log file is written after the privileges are gone
    user = pwd.getpwnam("ftptest")
    command = [
        sys.executable,
        "-m",
        "gateway",
        f"--uid={user.pw_uid}",
        f"--gid={user.pw_gid}",
        f"--logfile={tmp_path / 'gw.log'}",
        "--listen",
        "tcp:21:interface=127.0.0.21",
    ]
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    proc = subprocess.Popen(command, cwd=tmp_path, env=env)
    try:
        wait_for_port("127.0.0.21", 21, proc=proc)
        assert ftplib.FTP(timeout=10).connect("127.0.0.21", 21).startswith("220")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(user.pw_uid)] * 4  # real, effective, saved and filesystem
    finally:
        proc.terminate()
        proc.wait(timeout=10)
