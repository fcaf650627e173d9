"""Run the real gateway as a child process (`python -m gateway`, i.e. twistd) for tests."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

PROJECT = Path(__file__).resolve().parent.parent

#: `data.relay` for every gateway the tests start: FTP_GATEWAY_TEST_RELAY=copy runs the suite
#: on the copy relay (CI runs the end-to-end tests once per relay); unset means the default,
#: auto, which splices plain TCP data on Linux.
RELAY = os.environ.get("FTP_GATEWAY_TEST_RELAY", "")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


#: Ports the tests choose for their listeners come from below the kernel's ephemeral range
#: (net.ipv4.ip_local_port_range, 32768 and up by default), where no outgoing connection and
#: no bind to port 0 can take a port between the moment a test chooses it and the moment a
#: server binds it; each pytest-xdist worker has a slice of its own, so workers never race for
#: one either. Where the ephemeral range starts lower, the kernel chooses (bind to port 0).
PORT_SLICE = 2000
_PORTS_FROM = 12000
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_OWN_SLICE = _PORTS_FROM + (_WORKER % 8) * PORT_SLICE
_next_port = itertools.count()


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` nothing is bound to now, for a server a test is about to start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if _ephemeral_low() >= _PORTS_FROM + 8 * PORT_SLICE:
        for _ in range(PORT_SLICE):
            port = _OWN_SLICE + next(_next_port) % PORT_SLICE
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))  # no SO_REUSEADDR: a port in TIME_WAIT is passed over
                except OSError:
                    continue
                return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


@dataclass
class GatewayProcess:
    """A running gateway; `stop()` it (or use it as a context manager)."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


#: Starts a gateway with these command-line arguments and, with `config`, this TOML text as
#: its configuration file (the `gateways` and `module_gateways` fixtures).
StartGateway = Callable[..., GatewayProcess]


def start_gateway(
    workdir: Path, *args: str, host: str = "127.0.0.1", listen_prefix: str = ""
) -> GatewayProcess:
    """Start `python -m gateway` listening on a free loopback port; waits until it listens.
    `listen_prefix="haproxy:"` makes it a PROXY-protocol listener.

    The port is free when chosen but another process may take it before the gateway binds it
    (a busy machine): then the gateway exits with "Address already in use" and a new port is
    tried, a few times at most."""
    for _attempt in range(5):
        port = free_port(host)
        interface = host.replace(":", "\\:")
        log_path = workdir / f"gateway-{port}.log"
        command = [
            sys.executable,
            "-m",
            "gateway",
            f"--logfile={log_path}",
            "--listen",
            f"{listen_prefix}tcp:{port}:interface={interface}",
            *([f"--data-relay={RELAY}"] if RELAY else []),
            *args,
        ]
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        proc = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        gateway = GatewayProcess(proc, host, port, log_path)
        try:
            wait_for_port(host, port, proc=proc)
        except Exception:
            gateway.stop()
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            if "Address already in use" in output + gateway.log():
                continue
            raise RuntimeError(f"gateway did not start: {output}\n{gateway.log()}") from None
        return gateway
    raise RuntimeError(f"gateway did not start: no free port on {host} after 5 attempts")
