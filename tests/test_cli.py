"""The command line as an administrator meets it: `--help`, `--version`, `--check-config`, a bad
flag, and start-up failures that must end in one line naming the setting and exit status 2.
Every case starts the real process (`python -m gateway`, the same code as `ftp-gateway`)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_process import PROJECT, GatewayProcess, free_port, start_gateway, wait_for_port
from pki import Pki

from gateway import __version__

TIMEOUT = 30


def gateway(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the gateway to its end (it must end by itself within TIMEOUT)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def log_once_it_has(running: GatewayProcess, text: str) -> str:
    """The gateway's log once it contains `text` (bounded wait), then stop the gateway."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while text not in running.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        return running.log()
    finally:
        running.stop()


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start leaves on standard error (with exit status 2)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_version_is_the_gateways() -> None:
    result = gateway("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ftp-gateway {__version__}"


def test_help_names_ftp_gateway_and_twistd_pass_through_options() -> None:
    result = gateway("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ftp-gateway [options]")
    assert "twistd" not in result.stdout.splitlines()[0]
    for option in ("--check-config", "--version", "--logfile=", "--pidfile=", "--syslog"):
        assert option in result.stdout


def readme_section(title: str) -> str:
    """README's text from the heading `## title` to the next `## ` heading."""
    readme = (PROJECT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else None]


def test_readme_usage_table_lists_every_option_of_help() -> None:
    """An administrator reads README's table, not the source: every option `--help` prints
    (with its short form) is a row there, and so is the `passwd` command it mentions."""
    result = gateway("--help")
    assert result.returncode == 0
    table = "\n".join(
        line for line in readme_section("Usage").splitlines() if line.startswith("| `")
    )
    options = re.findall(r"^\s+(?:(-\w), )?(--[\w-]+)", result.stdout, re.MULTILINE)
    assert len(options) >= 15, result.stdout
    for short, long in options:
        assert f"`{long}" in table, f"{long} is missing from README's usage table"
        if short:
            assert f"`{short}`, `{long}" in table, f"{short} is missing beside {long}"
    assert "ftp-gateway passwd FILE USER" in " ".join(result.stdout.split())
    assert "`ftp-gateway passwd FILE USER`" in table


def test_readme_names_every_package_install_test_deps_installs() -> None:
    """README's test section says what the script changes before anyone runs it: every
    Debian package the script installs by name (shared libraries aside) is listed there."""
    script = (PROJECT / "scripts" / "install-test-deps").read_text()
    commands = re.findall(r"^apt-get install ((?:[^\n]*\\\n)*[^\n]*)", script, re.MULTILINE)
    packages = {
        word
        for command in commands
        for word in command.replace("\\\n", " ").split()
        if not word.startswith(("-", ">", "lib", "zlib")) and "=" not in word
    }
    assert {"vsftpd", "haproxy", "logrotate", "wget", "ftp-ssl"} <= packages, packages
    section = readme_section("Run the tests")
    for package in sorted(packages):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", section), package


def test_bad_flag_is_a_short_message_and_status_2() -> None:
    result = gateway("--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "ftp-gateway: option --no-such-flag not recognized",
        "Try 'ftp-gateway --help' for the options.",
    ]
    assert result.stdout == ""


def test_check_config_accepts_a_good_file(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "good.toml"
    config.write_text(
        'listen = ["tcp:2121:interface=127.0.0.1"]\nupstream = "127.0.0.1:21"\n'
        f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
        '[metrics]\nlisten = "tcp:9121:interface=127.0.0.1"\n'
    )
    result = gateway("--check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ftp-gateway: configuration OK ({config})"


def test_check_config_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        'listen = ["tcpp:2121"]\nupstream = "127.0.0.1:21"\n'
        '[data]\npassive_ports = "5-3"\nupstream_mode = "sideways"\n'
    )
    result = gateway("--check-config", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert any("data.passive_ports" in line for line in lines)
    assert any("data.upstream_mode" in line for line in lines)
    # With the settings fixed, the endpoint's syntax is checked too.
    config.write_text('listen = ["tcpp:2121"]\nupstream = "127.0.0.1:21"\n')
    result = gateway("--check-config", "--config", str(config))
    assert one_line_failure(result) == (
        "ftp-gateway: configuration error: listen: 'tcpp:2121': Unknown endpoint type: 'tcpp'"
    )


def test_check_config_reports_the_transfer_log_beside_other_problems(tmp_path: Path) -> None:
    """An administrator fixing a file wants every problem in one run, the transfer log's
    included, not one more after each fix."""
    config = tmp_path / "several.toml"
    config.write_text(
        'listen = ["tcpp:2121"]\nupstream = "127.0.0.1:21"\n'
        f'[tls]\ncertificate = "{tmp_path / "no-cert.pem"}"\n'
        f'[log]\ntransfer_log = "{tmp_path / "no-such-dir" / "xferlog"}"\n'
    )
    result = gateway("--check-config", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("ftp-gateway: configuration error: ") for line in lines)
    for setting in ("tls.certificate:", "listen:", "log.transfer_log:"):
        assert sum(setting in line for line in lines) == 1, (setting, lines)


def test_check_config_tries_certificates_and_cred_checkers(tmp_path: Path) -> None:
    result = gateway(
        "--check-config",
        "--config",
        str(tmp_path / "missing.toml"),
    )
    assert "config: cannot read" in one_line_failure(result)
    config = tmp_path / "forward.toml"
    config.write_text(
        f'proxy_auth = ["file:{tmp_path / "no-users"}"]\n'
        f'[tls]\ncertificate = "{tmp_path / "no-cert.pem"}"\n'
    )
    result = gateway("--check-config", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("ftp-gateway: configuration error: proxy_auth:")
    assert "no-users" in lines[0]
    assert lines[1].startswith("ftp-gateway: configuration error: tls.certificate:")
    assert "no-cert.pem" in lines[1]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("tcpp:2121", "listen: 'tcpp:2121': Unknown endpoint type: 'tcpp'"),
        ("tcp:2121:interface=::1", "listen: 'tcp:2121:interface=::1': escape each ':'"),
        ("tcp:notaport", "listen: 'tcp:notaport': "),
    ],
)
def test_mistyped_listen_endpoint_is_one_line(listen: str, expected: str) -> None:
    line = one_line_failure(gateway("--upstream", "127.0.0.1:21", "--listen", listen))
    assert line.startswith(f"ftp-gateway: configuration error: {expected}"), line


def test_systemd_listener_without_sockets() -> None:
    """--check-config (systemd's ExecStartPre) accepts a socket-activated listener; a start
    without the sockets says what is missing in one line."""
    endpoint = "systemd:domain=INET:index=0"
    env = {key: value for key, value in os.environ.items() if key != "LISTEN_FDS"}
    env["PYTHONPATH"] = str(PROJECT)
    command = [sys.executable, "-m", "gateway", "--upstream", "127.0.0.1:21", "--listen", endpoint]
    checked = subprocess.run(
        [*command, "--check-config"], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert checked.returncode == 0, checked.stderr
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert one_line_failure(started) == (
        f"ftp-gateway: configuration error: listen: {endpoint!r}: systemd passed no such "
        "socket; start the gateway through its .socket unit"
    )


def test_socket_activated_listener_serves(tmp_path: Path) -> None:
    """With a socket passed the way systemd passes it (systemd-socket-activate, from the
    systemd package), the gateway serves on it."""
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None, "systemd-socket-activate is not installed (Debian package systemd)"
    port = free_port()
    log = tmp_path / "activated.log"
    proc = subprocess.Popen(
        [
            tool,
            "--listen",
            f"127.0.0.1:{port}",
            "--fdname=ftp",
            f"--setenv=PYTHONPATH={PROJECT}",
            sys.executable,
            "-m",
            "gateway",
            f"--logfile={log}",
            "--upstream",
            "127.0.0.1:1",
            "--listen",
            "systemd:domain=INET:index=0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # The first connection (the wait's) makes systemd-socket-activate start the gateway
        # on the socket; the next is the gateway's (the upstream on port 1 is unavailable).
        wait_for_port("127.0.0.1", port, proc=proc)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            client.settimeout(TIMEOUT)
            greeting = client.recv(1024).decode()
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=TIMEOUT)
    assert greeting.startswith("421 Upstream server unavailable"), (greeting, output)
    assert "Listening on systemd:domain=INET:index=0: reverse mode" in log.read_text()


def test_port_in_use_is_one_line_naming_listen(tmp_path: Path, busy_port: int) -> None:
    log = tmp_path / "gateway.log"
    result = gateway(
        f"--logfile={log}",
        "--upstream",
        "127.0.0.1:21",
        "--listen",
        f"tcp:{busy_port}:interface=127.0.0.1",
    )
    line = one_line_failure(result)
    assert line == (
        f"ftp-gateway: listen: cannot listen on tcp:{busy_port}:interface=127.0.0.1: "
        "Address already in use"
    )
    assert "Address already in use" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_bad_metrics_listen_is_one_line(tmp_path: Path, busy_port: int) -> None:
    config = tmp_path / "metrics.toml"
    config.write_text('[metrics]\nlisten = "tcp:nine"\n')
    line = one_line_failure(gateway("--upstream", "127.0.0.1:21", "--config", str(config)))
    assert line.startswith("ftp-gateway: configuration error: metrics.listen: 'tcp:nine': ")
    config.write_text(f'[metrics]\nlisten = "tcp:{busy_port}:interface=127.0.0.1"\n')
    port = free_port()
    result = gateway(
        "--upstream", "127.0.0.1:21", "--config", str(config), "--listen", f"tcp:{port}"
    )
    assert one_line_failure(result) == (
        f"ftp-gateway: metrics.listen: cannot listen on tcp:{busy_port}:interface=127.0.0.1: "
        "Address already in use"
    )


def test_missing_users_file_for_proxy_auth_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "forward.toml"
    config.write_text(f'proxy_auth = ["file:{tmp_path / "users"}"]\n')
    line = one_line_failure(gateway("--config", str(config)))
    assert line.startswith("ftp-gateway: configuration error: proxy_auth: ")
    assert str(tmp_path / "users") in line


def test_unreadable_certificate_is_one_line(tmp_path: Path) -> None:
    # A directory where the certificate should be: unreadable even for root.
    (tmp_path / "cert.pem").mkdir()
    config = tmp_path / "tls.toml"
    config.write_text(f'[tls]\ncertificate = "{tmp_path / "cert.pem"}"\n')
    line = one_line_failure(gateway("--upstream", "127.0.0.1:21", "--config", str(config)))
    assert line.startswith("ftp-gateway: configuration error: tls.certificate: ")
    assert "cert.pem" in line


def test_startup_line_names_mode_upstream_tls_version_and_file(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "reverse.toml"
    config.write_text(
        'upstream = "127.0.0.1:2100"\n'
        f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
    )
    running = start_gateway(tmp_path, "--config", str(config))
    log_once_it_has(running, "Listening on")
    log = running.log()  # stopped: the whole log, shutdown included
    assert "Traceback" not in log and "Saving" not in log
    expected = (
        f"Listening on tcp:{running.port}:interface=127.0.0.1: reverse mode, upstream "
        f"127.0.0.1:2100; TLS to clients optional, to upstreams auto; ftp-gateway "
        f"{__version__}; configuration file {config}"
    )
    assert expected in log, log


def test_startup_line_in_forward_mode_summarises_the_policy(tmp_path: Path) -> None:
    running = start_gateway(tmp_path, "--allow-upstream", "127.0.0.0/8")
    log = log_once_it_has(running, "Listening on")
    assert "forward mode, USER name@host chooses the upstream, upstream policy: 1 allow" in log
    assert "TLS to clients off, to upstreams auto" in log
    assert "no configuration file" in log


def test_twistd_plugin_still_starts(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "--nodaemon",
            "--pidfile=",
            f"--logfile={log}",
            "ftp-gateway",
            "--upstream",
            "127.0.0.1:21",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        # twistd opens the port before the reactor runs and installs its signal handlers: a
        # SIGTERM in between ends the process before it logs anything. Wait for the line.
        deadline = time.monotonic() + TIMEOUT
        while "Listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    assert "reverse mode, upstream 127.0.0.1:21" in log.read_text()


def test_twistd_pidfile_and_logfile_pass_through(tmp_path: Path) -> None:
    pidfile = tmp_path / "gateway.pid"
    running = start_gateway(tmp_path, "--upstream", "127.0.0.1:21", f"--pidfile={pidfile}")
    try:
        assert pidfile.read_text().strip() == str(running.proc.pid)
    finally:
        running.stop()
    assert not pidfile.exists()  # removed at a clean stop
