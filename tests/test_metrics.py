"""Prometheus metrics, scraped from a real gateway process over HTTP after real transfers."""

from __future__ import annotations

import ftplib
import io
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import ftplib_get, ftplib_put, ftplib_session, sha256
from gateway_process import GatewayProcess, free_port, start_gateway
from prometheus_client.parser import text_string_to_metric_families
from servers import RunningServer

from gateway import __version__

PAYLOAD = os.urandom(3 * 1024 * 1024 + 5)
SERVED = {"data.bin": PAYLOAD}
SERVER_OPTIONS = {"active": False}


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, server: RunningServer
) -> Iterator[tuple[GatewayProcess, int, Path]]:
    workdir = tmp_path_factory.mktemp("gateway")
    metrics_port = free_port()
    config = workdir / "gateway.toml"
    config.write_text(
        f'upstream = "{server.host}:{server.port}"\n'
        f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    )
    with start_gateway(workdir, "--config", str(config)) as gw:
        yield gw, metrics_port, config


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample on /metrics, keyed by name and sorted labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settle(port: int, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until `name` reaches `expected` (a session's end is counted when the gateway sees
    the close, a moment after the client's QUIT), bounded in time."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(port)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_transfers_sessions_and_refusals_are_counted(
    gateway: tuple[GatewayProcess, int, Path], server: RunningServer
) -> None:
    gw, port, _ = gateway
    before = settle(port, "ftp_gateway_sessions", 0)

    ftp = ftplib_session("127.0.0.1", gw.port, server.user, server.password, passive=False)
    during = scrape(port)
    assert value(during, "ftp_gateway_sessions") == 1
    assert sha256(ftplib_get(ftp, "data.bin")) == sha256(PAYLOAD)
    ftplib_put(ftp, "up.bin", PAYLOAD[:1000])
    with pytest.raises(ftplib.error_perm):
        ftp.retrbinary("RETR missing.bin", io.BytesIO().write)
    with pytest.raises(ftplib.error_perm):
        ftp.sendcmd("PORT 10,9,8,7,200,1")  # someone else's address: a bounce attempt
    ftp.quit()

    after = settle(port, "ftp_gateway_sessions", 0)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ftp_gateway_sessions_started_total") == 1
    assert delta("ftp_gateway_transfers_total", command="RETR", outcome="complete") == 1
    assert delta("ftp_gateway_transfers_total", command="STOR", outcome="complete") == 1
    assert delta("ftp_gateway_transfers_total", command="RETR", outcome="failed") == 1
    assert delta("ftp_gateway_transfer_bytes_total", direction="download") == len(PAYLOAD)
    assert delta("ftp_gateway_transfer_bytes_total", direction="upload") == 1000
    assert delta("ftp_gateway_refused_total", kind="data_target") == 1


def test_failed_reload_is_counted(gateway: tuple[GatewayProcess, int, Path]) -> None:
    gw, port, config = gateway
    before = value(scrape(port), "ftp_gateway_config_reloads_total", result="failed")
    original = config.read_text()
    config.write_text(original + "[limits]\nmax_sessions = -1\n")
    try:
        gw.proc.send_signal(signal.SIGHUP)
        after = settle(port, "ftp_gateway_config_reloads_total", before + 1, result="failed")
    finally:
        config.write_text(original)
    assert value(after, "ftp_gateway_config_reloads_total", result="failed") == before + 1
    assert gw.proc.poll() is None


def test_series_exist_at_zero_before_their_first_event(tmp_path: Path) -> None:
    """A fresh gateway: labelled counters, histograms, gauges, build and process metrics are
    all on /metrics before anything happened."""
    metrics_port = free_port()
    config = tmp_path / "fresh.toml"
    config.write_text(
        f'upstream = "127.0.0.1:21"\n[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    )
    gw = start_gateway(tmp_path, "--config", str(config))
    try:
        samples = scrape(metrics_port)
    finally:
        gw.stop()
    expected = f"Listening on tcp:{metrics_port}:interface=127.0.0.1: Prometheus metrics at"
    assert expected in gw.log()
    for name, labels in [
        ("ftp_gateway_transfers_total", {"command": "RETR", "outcome": "complete"}),
        ("ftp_gateway_transfers_total", {"command": "STOR", "outcome": "aborted"}),
        ("ftp_gateway_transfer_bytes_total", {"direction": "upload"}),
        ("ftp_gateway_refused_total", {"kind": "data_target"}),
        ("ftp_gateway_sessions_refused_total", {"reason": "max_sessions_per_ip"}),
        ("ftp_gateway_config_reloads_total", {"result": "failed"}),
        ("ftp_gateway_transfer_duration_seconds_count", {"direction": "download"}),
        ("ftp_gateway_upstream_connect_seconds_count", {}),
        ("ftp_gateway_upstream_logins_failed_total", {}),
        ("ftp_gateway_transfers_in_flight", {}),
        ("ftp_gateway_sessions", {}),
    ]:
        key = (name, tuple(sorted(labels.items())))
        assert samples.get(key) == 0.0, (name, labels)
    [build] = [labels for (name, labels) in samples if name == "ftp_gateway_build_info"]
    assert dict(build)["version"] == __version__
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_open_fds", ())] > 0


def test_durations_latency_in_flight_and_upstream_login_failures(
    gateway: tuple[GatewayProcess, int, Path], server: RunningServer
) -> None:
    gw, port, _ = gateway
    before = settle(port, "ftp_gateway_sessions", 0)
    ftp = ftplib_session("127.0.0.1", gw.port, server.user, server.password, passive=True)
    assert sha256(ftplib_get(ftp, "data.bin")) == sha256(PAYLOAD)
    ftplib_put(ftp, "up2.bin", PAYLOAD[:5000])
    ftp.quit()
    bad = ftplib.FTP(timeout=30)
    bad.connect("127.0.0.1", gw.port)
    with pytest.raises(ftplib.error_perm) as refused:
        bad.login(server.user, "wrong-password")
    assert str(refused.value).startswith("530")
    bad.close()
    after = settle(port, "ftp_gateway_sessions", 0)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ftp_gateway_transfer_duration_seconds_count", direction="download") == 1
    assert delta("ftp_gateway_transfer_duration_seconds_count", direction="upload") == 1
    assert delta("ftp_gateway_transfer_duration_seconds_sum", direction="download") > 0
    assert delta("ftp_gateway_upstream_connect_seconds_count") == 2  # two sessions
    assert delta("ftp_gateway_upstream_connect_seconds_sum") > 0
    assert delta("ftp_gateway_upstream_logins_failed_total") == 1
    assert value(after, "ftp_gateway_transfers_in_flight") == 0


def test_in_flight_transfers_follow_relay_start_and_end() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import MetricsObserver

    registry = CollectorRegistry()
    observe = MetricsObserver(registry)
    observe({"event": "relay_started", "direction": "download"})
    observe({"event": "relay_started", "direction": "upload"})
    assert registry.get_sample_value("ftp_gateway_transfers_in_flight") == 2
    observe({"event": "relay_finished", "direction": "download", "bytes": 10, "seconds": 0.5})
    assert registry.get_sample_value("ftp_gateway_transfers_in_flight") == 1
    bucket = registry.get_sample_value(
        "ftp_gateway_transfer_duration_seconds_bucket", {"direction": "download", "le": "0.5"}
    )
    assert bucket == 1
