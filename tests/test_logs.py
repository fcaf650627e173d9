"""`[log]` level, format and transfer_log, through a real gateway process and real clients:
the log file's content is what an administrator reads, so the assertions are on it."""

from __future__ import annotations

import ftplib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gateway_process import PROJECT, GatewayProcess, free_port, start_gateway
from servers import RunningServer

TIMEOUT = 30.0
PAYLOAD = bytes(range(256)) * 400  # 102400 bytes


SERVED = {"data.bin": PAYLOAD}


def reverse_gateway(tmp_path: Path, server: RunningServer, config: str) -> GatewayProcess:
    path = tmp_path / "gateway.toml"
    path.write_text(f'upstream = "{server.host}:{server.port}"\n{config}')
    return start_gateway(tmp_path, "--config", str(path))


def download_and_upload(
    gateway: GatewayProcess, server: RunningServer, name: str, source: str = "127.0.0.1"
) -> None:
    """One passive download and one passive upload with ftplib from `source`, then QUIT."""
    ftp = ftplib.FTP(timeout=TIMEOUT, source_address=(source, 0))
    ftp.connect(gateway.host, gateway.port)
    ftp.login(server.user, server.password)
    received = io.BytesIO()
    ftp.retrbinary("RETR data.bin", received.write)
    assert received.getvalue() == PAYLOAD
    ftp.storbinary(f"STOR {name}", io.BytesIO(b"uploaded\n"))
    ftp.quit()


def wait_for(gateway: GatewayProcess, text: str, count: int = 1) -> str:
    """The gateway's log once `text` appears in it `count` times (bounded wait). Counts of
    sessions include start_gateway's probe connection."""
    deadline = time.monotonic() + 15
    while gateway.log().count(text) < count:
        assert gateway.proc.poll() is None, gateway.log()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{gateway.log()[-3000:]}"
        time.sleep(0.05)
    return gateway.log()


def curl_list(gateway: GatewayProcess, server: RunningServer) -> None:
    """A directory listing with curl's default passive mode (EPSV: a passive listener)."""
    url = f"ftp://{gateway.host}:{gateway.port}/"
    subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-u", f"{server.user}:{server.password}", url],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )


def test_info_level_has_no_debug_lines_nor_listener_noise(
    tmp_path: Path, server: RunningServer
) -> None:
    gateway = reverse_gateway(tmp_path, server, "")  # info is the default
    try:
        curl_list(gateway, server)
        download_and_upload(gateway, server, "info.txt")
        log = wait_for(gateway, "Session ended", 3)
    finally:
        gateway.stop()
    assert "#info" in log
    assert "#debug" not in log, log
    assert "_OneShotFactory" not in log, log
    assert not re.search(r"\(TCP Port \d+ Closed\)", log), log


def test_info_level_has_no_twisted_lines_per_listener_nor_per_scrape(
    tmp_path: Path, server: RunningServer
) -> None:
    """A `haproxy:` listener and the metrics listener, each started, scraped and stopped: the
    start-up lines name them, and Twisted's own `... starting on PORT`, `Starting factory`,
    `Stopping factory` and per-request access lines stay out of an info log."""
    metrics_port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'upstream = "{server.host}:{server.port}"\n'
        f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    )
    gateway = start_gateway(tmp_path, "--config", str(path), listen_prefix="haproxy:")
    try:
        wait_for(gateway, "Prometheus metrics at /metrics")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        for _ in range(2):
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                assert b"ftp_gateway_sessions" in response.read()
    finally:
        gateway.stop()
    assert gateway.proc.returncode == 0
    log = gateway.log()
    assert "Shutdown complete" in log  # the stop's own lines were written
    assert f"Listening on haproxy:tcp:{gateway.port}" in log, log
    assert f"Listening on tcp:{metrics_port}" in log, log
    for noise in ("starting on", "Starting factory", "Stopping factory", "GET /metrics"):
        assert noise not in log, log


def test_debug_level_shows_replies_and_listener_lines(
    tmp_path: Path, server: RunningServer
) -> None:
    gateway = reverse_gateway(tmp_path, server, '[log]\nlevel = "debug"\n')
    try:
        curl_list(gateway, server)
        log = wait_for(gateway, "Session ended", 2)
    finally:
        gateway.stop()
    assert "[gateway.session#debug" in log and "To client: 226" in log
    assert "_OneShotFactory starting on" in log


def test_warn_level_leaves_out_info_lines(tmp_path: Path, server: RunningServer) -> None:
    gateway = reverse_gateway(tmp_path, server, '[log]\nlevel = "warn"\n')
    try:
        download_and_upload(gateway, server, "warn.txt")
        ftp = ftplib.FTP(timeout=TIMEOUT)
        ftp.connect(gateway.host, gateway.port)
        ftp.login(server.user, server.password)
        with pytest.raises(ftplib.error_perm):
            ftp.retrbinary("RETR missing.bin", lambda _: None)  # a failed transfer: warn
        ftp.quit()
        log = wait_for(gateway, "Transfer RETR missing.bin")
    finally:
        gateway.stop()
    assert "#warn" in log
    assert "Session started" not in log and "#info" not in log, log


def test_json_lines_carry_event_fields_and_one_session_id(
    tmp_path: Path, server: RunningServer
) -> None:
    gateway = reverse_gateway(tmp_path, server, '[log]\nformat = "json"\n')
    try:
        download_and_upload(gateway, server, "json.txt")
        download_and_upload(gateway, server, "json2.txt")
        wait_for(gateway, '"session_ended"', 3)
    finally:
        gateway.stop()
    records = [json.loads(line) for line in gateway.log().splitlines() if line.strip()]
    for record in records:
        assert {"time", "level", "namespace", "message"} <= set(record), record
    sessions = [r for r in records if r["namespace"] == "gateway.session"]
    # start_gateway's probe connection is a session too; the two logged in.
    started = [r for r in sessions if r.get("event") == "session_started"]
    assert len(started) == 3
    assert all(re.fullmatch(r"[0-9a-f]{8}", r["session"]) for r in started)
    ids = {r["session"] for r in sessions if r.get("event") == "logged_in"}
    assert len(ids) == 2 and ids < {r["session"] for r in started}
    for session_id in ids:
        lines = [r for r in sessions if r.get("session") == session_id]
        events = [r.get("event") for r in lines]
        assert events[0] == "session_started" and events[-1] == "session_ended", events
        assert events.count("transfer_finished") == 2, events
        assert "logged_in" in events
        clients = {r["client"] for r in lines if "client" in r}
        assert len(clients) == 1, clients  # every line of the session is about one client
        start, end = lines[0], lines[-1]
        assert start["mode"] == "reverse" and start["upstream"] == f"127.0.0.1:{server.port}"
        assert end["user"] == server.user and end["upstream"] == f"127.0.0.1:{server.port}"
        retr = next(r for r in lines if r.get("verb") == "RETR")
        assert retr["code"] == 226 and retr["bytes"] == len(PAYLOAD) and retr["level"] == "info"
    # Every session line carries a session id.
    assert all("session" in r for r in sessions), [r for r in sessions if "session" not in r]


def test_text_lines_carry_the_session_id_and_the_user(
    tmp_path: Path, server: RunningServer
) -> None:
    gateway = reverse_gateway(tmp_path, server, "")
    try:
        download_and_upload(gateway, server, "text.txt")
        log = wait_for(gateway, "Session ended", 2)
    finally:
        gateway.stop()
    session_lines = [line for line in log.splitlines() if "[gateway.session#" in line]
    pattern = re.compile(r"\[gateway\.session#\w+\] \[([0-9a-f]{8})\] (.*)")
    tagged = [pattern.search(line) for line in session_lines]
    assert None not in tagged, session_lines  # every session line has an id
    by_id: dict[str, list[str]] = {}
    for match in tagged:
        assert match is not None
        by_id.setdefault(match.group(1), []).append(match.group(2))
    # start_gateway's probe connection is one session; the ftplib one is the other.
    (lines,) = [lines for lines in by_id.values() if f"User {server.user} logged in" in lines]
    assert lines[0].startswith("Session started: client 127.0.0.1:")
    assert f"reverse mode, upstream 127.0.0.1:{server.port}" in lines[0]
    assert any(line.startswith("Transfer RETR data.bin") for line in lines)
    assert lines[-1].startswith("Session ended: client 127.0.0.1:")
    assert lines[-1].endswith(f"upstream 127.0.0.1:{server.port}, user {server.user}")


def test_demo_server_lines_at_their_own_level(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, "--demo")
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        ftp.connect(gateway.host, gateway.port)
        ftp.login()
        data = io.BytesIO()
        ftp.retrbinary("RETR pub/hello.txt", data.write)
        ftp.quit()
        log = wait_for(gateway, "Session ended", 2)
    finally:
        gateway.stop()
    assert data.getvalue() == b"Hello through the gateway!\n"
    assert "stderr" not in log, log
    assert re.search(r"\[gateway\.demo#info\] .*FTP session opened", log), log


def xferlog_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


#: The clients of the transfer-log test connect from here; the gateway reaches the upstream
#: from 127.0.0.1, so the remote-host field tells the two apart.
CLIENT = "127.0.0.5"


def check_xferlog_fields(fields: list[str], server: RunningServer) -> None:
    assert len(fields) == 18, fields  # the time is 5 fields: "Sat Nov 28 08:48:51 2026"
    time.strptime(" ".join(fields[:5]), "%a %b %d %H:%M:%S %Y")
    assert int(fields[5]) >= 1  # transfer-time, whole seconds
    assert fields[6] == CLIENT  # the client, not the gateway's upstream address
    assert fields[10] == "_"
    assert fields[12] == "r" and fields[13] == server.user
    assert fields[14:17] == ["ftp", "0", "*"]


def test_transfer_log_has_one_xferlog_line_per_file_transfer(
    tmp_path: Path, server: RunningServer
) -> None:
    xferlog = tmp_path / "xferlog"
    gateway = reverse_gateway(tmp_path, server, f'[log]\ntransfer_log = "{xferlog}"\n')
    try:
        download_and_upload(gateway, server, "xfer up.txt", source=CLIENT)
        ftp = ftplib.FTP(timeout=TIMEOUT, source_address=(CLIENT, 0))
        ftp.connect(gateway.host, gateway.port)
        ftp.login(server.user, server.password)
        with pytest.raises(ftplib.error_perm):
            ftp.retrbinary("RETR missing.bin", lambda _: None)
        ftp.quit()
        wait_for(gateway, "Session ended", 3)
    finally:
        gateway.stop()
    lines = xferlog_lines(xferlog)
    assert len(lines) == 3, lines  # RETR, STOR, the failed RETR; no listing
    download, upload, failed = lines
    for fields in lines:
        check_xferlog_fields(fields, server)
    assert download[7:12] == [str(len(PAYLOAD)), "data.bin", "b", "_", "o"]
    assert download[17] == "c"
    assert upload[7:12] == ["9", "xfer_up.txt", "b", "_", "i"] and upload[17] == "c"
    assert failed[8] == "missing.bin" and failed[17] == "i"


def test_logrotate_example_rotates_the_transfer_log(tmp_path: Path, server: RunningServer) -> None:
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert os.path.exists(logrotate), "logrotate is not installed (scripts/install-test-deps)"
    xferlog = tmp_path / "xferlog"
    gateway = reverse_gateway(tmp_path, server, f'[log]\ntransfer_log = "{xferlog}"\n')
    try:
        download_and_upload(gateway, server, "before.txt")
        wait_for(gateway, "Session ended", 2)
        assert len(xferlog_lines(xferlog)) == 2
        example = (PROJECT / "etc" / "examples" / "logrotate").read_text()
        signal_command = "systemctl kill -s USR1 --kill-whom=main ftp-gateway.service"
        assert "/var/log/ftp-gateway/xferlog {" in example and signal_command in example
        config = tmp_path / "logrotate.conf"
        config.write_text(
            example.replace("/var/log/ftp-gateway/xferlog", str(xferlog)).replace(
                signal_command, f"kill -USR1 {gateway.proc.pid}"
            )
        )
        state = tmp_path / "logrotate.state"
        done = subprocess.run(
            [logrotate, "--force", "--state", str(state), str(config)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        wait_for(gateway, "Log files reopened")
        rotated = tmp_path / "xferlog.1"  # delaycompress: the newest rotation stays plain
        assert len(xferlog_lines(rotated)) == 2
        download_and_upload(gateway, server, "after.txt")
        wait_for(gateway, "Session ended", 3)
    finally:
        gateway.stop()
    assert len(xferlog_lines(rotated)) == 2  # nothing more went to the renamed file
    after = xferlog_lines(xferlog)
    assert [fields[8] for fields in after] == ["data.bin", "after.txt"]


def test_sigusr1_reopens_renamed_log_files(tmp_path: Path, server: RunningServer) -> None:
    """What the logrotate example does, by hand: rename, signal, the next line is in a new
    file; for the transfer log and for the main log (--logfile) alike."""
    xferlog = tmp_path / "xferlog"
    gateway = reverse_gateway(tmp_path, server, f'[log]\ntransfer_log = "{xferlog}"\n')
    try:
        download_and_upload(gateway, server, "one.txt")
        wait_for(gateway, "Session ended", 2)
        xferlog.rename(tmp_path / "xferlog.old")
        main_log = gateway.log_path.rename(tmp_path / "gateway.log.old")
        gateway.proc.send_signal(signal.SIGUSR1)
        wait_for(gateway, "Log files reopened")  # read from a new file at the old name
        download_and_upload(gateway, server, "two.txt")
        wait_for(gateway, "Session ended")
    finally:
        gateway.stop()
    old_main = main_log.read_text()
    assert "Log files reopened" not in old_main and "Session ended" in old_main
    assert "two.txt" not in old_main and "Transfer STOR two.txt" in gateway.log()
    assert [f[8] for f in xferlog_lines(tmp_path / "xferlog.old")] == ["data.bin", "one.txt"]
    assert [f[8] for f in xferlog_lines(xferlog)] == ["data.bin", "two.txt"]


def test_unwritable_transfer_log_is_one_line_at_start(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[log]\ntransfer_log = "{tmp_path}/missing/xferlog"\n')
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config)],
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"ftp-gateway: configuration error: log.transfer_log: cannot open "
        f"{tmp_path}/missing/xferlog: No such directory {tmp_path}/missing"
    ]


def test_unknown_log_level_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[log]\nlevel = "verbose"\n')
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config)],
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2 and "log.level: expected one of debug, info, warn, error" in (
        done.stderr
    )


def test_a_proxy_login_is_named_in_the_session_line_and_the_transfer_log(
    tmp_path: Path, server: RunningServer
) -> None:
    # Forward mode with proxy authentication, joined style: alice logs in to the gateway and
    # as the server's own user upstream. The upstream's xferlog can only name its account;
    # the gateway's names alice.
    xferlog = tmp_path / "xferlog"
    config = tmp_path / "gateway.toml"
    config.write_text(
        'allow_upstream = ["127.0.0.0/8"]\nproxy_auth = ["memory:alice:proxy-secret"]\n'
        f'[log]\ntransfer_log = "{xferlog}"\n'
    )
    gateway = start_gateway(tmp_path, "--config", str(config))
    try:
        ftp = ftplib.FTP(timeout=TIMEOUT)
        ftp.connect(gateway.host, gateway.port)
        ftp.login(
            f"{server.user}@alice@{server.host}:{server.port}", f"{server.password}@proxy-secret"
        )
        received = io.BytesIO()
        ftp.retrbinary("RETR data.bin", received.write)
        assert received.getvalue() == PAYLOAD
        ftp.retrlines("LIST", lambda _: None)
        ftp.quit()
        log = wait_for(gateway, "Session ended", 2)
    finally:
        gateway.stop()
    ended = [line for line in log.splitlines() if "Session ended" in line and "alice" in line]
    assert len(ended) == 1, log[-3000:]
    assert ended[0].endswith(f"user {server.user}, proxy user alice"), ended[0]
    assert re.search(r"Transfer LIST via 127\.0\.0\.1:\d+: 226", log), log[-3000:]
    (download,) = xferlog_lines(xferlog)
    assert download[8] == "data.bin" and download[12:14] == ["r", "alice"]
