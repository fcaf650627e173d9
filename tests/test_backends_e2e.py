"""Several backends behind one gateway process: vsftpd and pure-ftpd on loopback, real ftplib
clients, health checks, failover and recovery, seen through replies, logs and /metrics."""

from __future__ import annotations

import ftplib
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gateway_process import GatewayProcess, free_port, start_gateway
from prometheus_client.parser import text_string_to_metric_families
from servers import RunningServer, start_server

TIMEOUT = 30.0
PAYLOAD = os.urandom(256 * 1024 + 3)


@dataclass
class Farm:
    """Two real servers named as the gateway's backends."""

    workdir: Path
    servers: dict[str, RunningServer]

    def restart(self, name: str) -> None:
        """Start backend `name` again where it was (after `stop`)."""
        old = self.servers[name]
        fresh = start_server(
            old.kind, self.workdir / f"{name}-{time.monotonic_ns()}", port=old.port
        )
        (fresh.root / "data.bin").write_bytes(PAYLOAD)
        self.servers[name] = fresh


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    servers = {
        "vs": start_server("vsftpd", tmp_path / "vs"),
        "pure": start_server("pure-ftpd", tmp_path / "pure"),
    }
    for server in servers.values():
        (server.root / "data.bin").write_bytes(PAYLOAD)
    farm = Farm(tmp_path, servers)
    yield farm
    for server in farm.servers.values():
        server.stop()


def backend_of(text: str) -> str:
    """Which server answered, from its greeting or its reply to USER."""
    if "vsFTPd" in text or "Please specify the password" in text:
        return "vs"
    if "Pure-FTPd" in text or "Password required" in text:
        return "pure"
    raise AssertionError(f"unknown server reply {text!r}")


def write_config(
    farm: Farm, path: Path, *, weights: dict[str, int] | None = None, extra: str = ""
) -> Path:
    weights = weights or {}
    lines = []
    for name, server in farm.servers.items():
        lines += [
            "[[backends]]",
            f'name = "{name}"',
            f'address = "{server.host}:{server.port}"',
            f"weight = {weights.get(name, 1)}",
        ]
    path.write_text(
        extra
        + "\n"
        + "\n".join(lines)
        + "\n[health]\ninterval = 0.2\ntimeout = 2\nfall = 2\nrise = 2\n"
        + '[tls]\nupstream = "off"\n'
    )
    return path


@pytest.fixture
def make_gateway(farm: Farm, tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[GatewayProcess] = []

    def make(**kwargs: object) -> Gateway:
        metrics = free_port()
        extra = str(kwargs.pop("extra", ""))
        extra = f'{extra}\n[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n'
        config = write_config(farm, tmp_path / "gateway.toml", extra=extra, **kwargs)  # type: ignore[arg-type]
        process = start_gateway(tmp_path, "--config", str(config))
        started.append(process)
        return Gateway(process, metrics, config)

    yield make
    for process in started:
        process.stop()


@dataclass
class Gateway:
    process: GatewayProcess
    metrics_port: int
    config: Path

    @property
    def port(self) -> int:
        return self.process.port

    def scrape(self) -> dict[tuple[str, str], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ftp_gateway_backend_"):
                    samples[(sample.name, sample.labels["backend"])] = sample.value
        return samples

    def wait_for(self, what: str, check: Callable[[], bool], seconds: float = 20.0) -> None:
        """Poll `check` until it holds; fail with the log tail after `seconds`."""
        deadline = time.monotonic() + seconds
        while not check():
            assert self.process.proc.poll() is None, self.process.log()[-3000:]
            assert time.monotonic() < deadline, f"{what}: not seen\n{self.process.log()[-3000:]}"
            time.sleep(0.05)

    def up(self, name: str) -> float | None:
        return self.scrape().get(("ftp_gateway_backend_up", name))

    def greeting(self, source: str = "127.0.0.1") -> str:
        ftp = ftplib.FTP(timeout=TIMEOUT, source_address=(source, 0))
        try:
            return ftp.connect("127.0.0.1", self.port)
        finally:
            ftp.close()


def test_health_checks_mark_a_stopped_backend_down_and_a_restarted_one_up(
    farm: Farm, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = make_gateway()
    gateway.wait_for("both up", lambda: gateway.up("vs") == 1 and gateway.up("pure") == 1)
    farm.servers["pure"].stop()
    gateway.wait_for("pure down", lambda: gateway.up("pure") == 0)
    assert gateway.up("vs") == 1
    log = gateway.process.log()
    assert "Backend pure (127.0.0.1:" in log and "is down: 2 checks failed" in log
    farm.restart("pure")
    gateway.wait_for("pure up", lambda: gateway.up("pure") == 1)
    assert "Backend pure (127.0.0.1:" in gateway.process.log().split("is down")[-1]
    assert "is up: 2 checks passed" in gateway.process.log()
