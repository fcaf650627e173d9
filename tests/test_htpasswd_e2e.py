"""Proxy logins against an htpasswd file, through a real gateway process in forward mode with
real clients (lftp's proxy login, ftplib): bcrypt entries from Apache's `htpasswd -B`, argon2
entries from `ftp-gateway passwd`, the per-IP throttle, changes picked up without a restart,
weak files refused at start, and no password in the log."""

from __future__ import annotations

import ftplib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clients import lftp
from gateway_process import PROJECT, GatewayProcess, start_gateway
from servers import RunningServer
from test_reload import hang_up

CONTENT = b"behind an htpasswd proxy login\n"
PASSWORDS = {"alice": "alice-bcrypt-pw", "bob": "bob-argon2-pw", "carol": "carol-later-pw"}


SERVED = {"f.txt": CONTENT}


def passwd(path: Path, user: str, password: str, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "passwd", "--stdin", *extra, str(path), user],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def make_users(directory: Path) -> Path:
    path = directory / "proxy-users"
    subprocess.run(
        ["htpasswd", "-B", "-c", "-b", str(path), "alice", PASSWORDS["alice"]],
        check=True,
        capture_output=True,
        timeout=30,
    )
    passwd(path, "bob", PASSWORDS["bob"], "--scheme", "argon2")
    return path


def start(tmp: Path, users: Path, max_failed: int = 3) -> GatewayProcess:
    config = tmp / "gateway.toml"
    config.write_text(
        f'proxy_auth = ["htpasswd:{users}"]\nallow_upstream = ["127.0.0.0/8"]\n'
        f"[limits]\nmax_failed_logins = {max_failed}\n"
    )
    return start_gateway(tmp, "--config", str(config))


def proxy_login(gw: GatewayProcess, user: str, password: str) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", gw.port)
    ftp.login(user, password)
    return ftp


def assert_no_password_logged(gw: GatewayProcess) -> None:
    log = gw.log()
    assert "Proxy user" in log  # the log is the gateway's, and it was written
    for password in (*PASSWORDS.values(), "wrong-password"):
        assert password not in log


def test_bcrypt_user_downloads_through_lftp_proxy_login(
    tmp_path: Path, server: RunningServer
) -> None:
    gw = start(tmp_path, make_users(tmp_path))
    try:
        out = tmp_path / "f.txt"
        result = lftp(
            f"set ftp:proxy ftp://alice:{PASSWORDS['alice']}@127.0.0.1:{gw.port}; "
            "set ftp:proxy-auth-type user; "
            f"open -u {server.user},{server.password} -p {server.port} 127.0.0.1; "
            f"get f.txt -o {out}"
        )
        assert result.returncode == 0, result.stderr.decode() + gw.log()[-2000:]
        assert out.read_bytes() == CONTENT
        # argon2 entry, ftplib, USER name@host after the proxy login.
        ftp = proxy_login(gw, "bob", PASSWORDS["bob"])
        ftp.sendcmd(f"USER {server.user}@127.0.0.1:{server.port}")
        assert ftp.sendcmd(f"PASS {server.password}").startswith("230")
        assert ftp.nlst() == ["f.txt"]
        ftp.quit()
        assert "Proxy user alice authenticated" in gw.log()
        assert_no_password_logged(gw)
    finally:
        gw.stop()


def test_wrong_passwords_get_530_and_count_towards_the_throttle(tmp_path: Path) -> None:
    gw = start(tmp_path, make_users(tmp_path), max_failed=3)
    try:
        for user, password in (("alice", "wrong-password"), ("nobody", "x"), ("bob", "")):
            with pytest.raises(ftplib.error_perm, match="530 Proxy login incorrect"):
                proxy_login(gw, user, password)
        with pytest.raises(ftplib.error_temp, match="421 Too many failed logins"):
            proxy_login(gw, "alice", PASSWORDS["alice"])  # even the right password, for now
        log = gw.log()
        assert log.count("Proxy login failed for") == 3
        for password in (*PASSWORDS.values(), "wrong-password"):
            assert password not in log
    finally:
        gw.stop()


def test_changes_to_the_file_apply_at_the_next_login(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    gw = start(tmp_path, users, max_failed=100)
    try:
        with pytest.raises(ftplib.error_perm, match="530"):
            proxy_login(gw, "carol", PASSWORDS["carol"])
        passwd(users, "carol", PASSWORDS["carol"])
        proxy_login(gw, "carol", PASSWORDS["carol"]).quit()  # no restart, no SIGHUP
        passwd(users, "alice", "alice-changed-pw")
        with pytest.raises(ftplib.error_perm, match="530"):
            proxy_login(gw, "alice", PASSWORDS["alice"])
        proxy_login(gw, "alice", "alice-changed-pw").quit()
        # A broken edit fails closed: nobody logs in through the file until it is fixed.
        with users.open("a") as f:
            f.write("dave:$apr1$abcdefgh$0123456789abcdefghijkl\n")
        with pytest.raises(ftplib.error_perm, match="530"):
            proxy_login(gw, "bob", PASSWORDS["bob"])
        deadline = time.monotonic() + 10
        while f"{users}:4: user 'dave': MD5" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"{users}:4: user 'dave': MD5" in gw.log()
        users.write_text("\n".join(users.read_text().splitlines()[:3]) + "\n")
        proxy_login(gw, "bob", PASSWORDS["bob"]).quit()
    finally:
        gw.stop()


def test_a_file_with_weak_hashes_stops_start_up(tmp_path: Path) -> None:
    users = make_users(tmp_path)
    subprocess.run(
        ["htpasswd", "-s", "-b", str(users), "sha", "pw"], check=True, capture_output=True
    )
    config = tmp_path / "gateway.toml"
    config.write_text(f'proxy_auth = ["htpasswd:{users}"]\n')
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "--listen", "tcp:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert f"{users}:3: user 'sha': unsalted SHA-1" in result.stderr


def test_sighup_switches_files_and_keeps_the_running_one_if_the_new_one_is_weak(
    tmp_path: Path,
) -> None:
    users = make_users(tmp_path)
    gw = start(tmp_path, users, max_failed=100)
    config = tmp_path / "gateway.toml"
    try:
        other = tmp_path / "other-users"
        passwd(other, "carol", PASSWORDS["carol"])
        config.write_text(config.read_text().replace(str(users), str(other)))
        hang_up(gw, "Configuration reloaded")
        proxy_login(gw, "carol", PASSWORDS["carol"]).quit()
        with pytest.raises(ftplib.error_perm, match="530"):
            proxy_login(gw, "alice", PASSWORDS["alice"])
        weak = tmp_path / "weak-users"
        weak.write_text("eve:plain-text-password\n")
        config.write_text(config.read_text().replace(str(other), str(weak)))
        hang_up(gw, "Reload failed")
        assert f"{weak}:1: user 'eve': plain text" in gw.log()
        proxy_login(gw, "carol", PASSWORDS["carol"]).quit()  # the running file stays in use
        assert "plain-text-password" not in gw.log()
    finally:
        gw.stop()
