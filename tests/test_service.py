"""The shipped systemd unit and the documented service install: `systemd-analyze verify` and
`security` (both run for real; a missing systemd-analyze fails), the unit's own command lines
run against the shipped configuration file, and the plugin cache written at install time so a
read-only installation never needs to write it again."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gateway_process import PROJECT, free_port, wait_for_port

UNIT = PROJECT / "etc" / "examples" / "ftp-gateway.service"
INSTALL = "/opt/ftp-gateway"
CONFIG = "/etc/ftp-gateway/ftp-gateway.toml"
TIMEOUT = 30


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is not installed (Debian package systemd)"
    return tool


def directives(name: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{name}=")
    ]


def stand_in_install(tmp_path: Path) -> Path:
    """`/opt/ftp-gateway` as the documented install leaves it, as far as the unit sees: a
    bin/ftp-gateway that runs this checkout."""
    root = tmp_path / "opt-ftp-gateway"
    (root / "bin").mkdir(parents=True)
    command = root / "bin" / "ftp-gateway"
    command.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(PROJECT))} "
        f'exec {shlex.quote(sys.executable)} -m gateway "$@"\n'
    )
    command.chmod(0o755)
    return root


def test_unit_runs_from_the_documented_install_and_configuration_path() -> None:
    [start] = directives("ExecStart")
    assert start.startswith(f"{INSTALL}/bin/ftp-gateway ")
    assert f"--config {CONFIG}" in start
    assert directives("DynamicUser") == ["yes"]
    readme = (PROJECT / "README.md").read_text()
    # The README's install creates what ExecStart runs and puts the file where it reads it.
    assert f"python3 -m venv {INSTALL}" in readme
    assert f"{INSTALL}/bin/pip install" in readme
    assert f"{INSTALL}/bin/python -m gateway.plugincache" in readme
    assert CONFIG in readme
    for words in ("journalctl -u ftp-gateway", "systemctl reload ftp-gateway", "systemctl stop"):
        assert words in readme


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    install = stand_in_install(tmp_path)
    unit = tmp_path / "ftp-gateway.service"
    unit.write_text(UNIT.read_text().replace(INSTALL, str(install)))
    result = subprocess.run(
        [analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ftp-gateway.service" not in result.stdout + result.stderr


def test_unit_exposure_is_3_or_lower() -> None:
    result = subprocess.run(
        [analyze(), "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for ftp-gateway\.service: ([0-9.]+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= 3.0, result.stdout


def test_units_command_lines_check_and_run_the_shipped_configuration(tmp_path: Path) -> None:
    install = stand_in_install(tmp_path)
    shipped = PROJECT / "etc" / "ftp-gateway.toml"
    [check] = directives("ExecStartPre")
    [start] = directives("ExecStart")
    check_args = shlex.split(check.replace(INSTALL, str(install)).replace(CONFIG, str(shipped)))
    result = subprocess.run(check_args, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    port = free_port()
    start_args = shlex.split(start.replace(INSTALL, str(install)).replace(CONFIG, str(shipped)))
    # The shipped file listens on 2121; a test must not assume that port is free.
    out = tmp_path / "journal.txt"  # what the journal would get: standard output and error
    with out.open("wb") as journal:
        proc = subprocess.Popen(
            [*start_args, "--listen", f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path,
            stdout=journal,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        # The port answers before the reactor runs; the start-up line follows (bounded wait).
        deadline = time.monotonic() + TIMEOUT
        while b"Listening on" not in out.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    assert f"configuration file {shipped}" in out.read_text()


def plugin_caches() -> dict[Path, float]:
    import twisted.plugins

    caches = (Path(directory) / "dropin.cache" for directory in twisted.plugins.__path__)
    return {cache: cache.stat().st_mtime for cache in caches if cache.exists()}


def test_start_after_the_install_step_writes_no_plugin_cache(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    step = subprocess.run(
        [sys.executable, "-m", "gateway.plugincache"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert step.returncode == 0, step.stderr
    assert "plugin caches up to date" in step.stdout
    before = plugin_caches()
    assert before
    time.sleep(0.05)  # a rewrite would show as a newer modification time
    port = free_port()
    log = tmp_path / "gateway.log"
    # Endpoint parsing and cred checkers both scan Twisted's plugins.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            f"--logfile={log}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--config",
            str(write(tmp_path / "auth.toml", 'proxy_auth = ["memory:proxy:secret"]\n')),
        ],
        cwd=tmp_path,
        env=env,
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    assert plugin_caches() == before
    assert "plugin cache" not in log.read_text()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
