"""Several backends behind one gateway process: vsftpd and pure-ftpd on loopback, real ftplib
clients: distribution per balancing policy, stickiness, health checks, failover and recovery,
and transfers on every backend, seen through replies, files, logs and /metrics."""

from __future__ import annotations

import ftplib
import io
import os
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gateway_process import GatewayProcess, free_port, start_gateway
from hostile_upstream import HostileUpstream, Mode
from pki import Pki, make_pki
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


def session_on(
    gateway: Gateway, farm: Farm, *, source: str = "127.0.0.1"
) -> tuple[ftplib.FTP, str]:
    """A logged-in ftplib session through `gateway`, on whichever backend greeted it."""
    ftp = ftplib.FTP(timeout=TIMEOUT, source_address=(source, 0))
    name = backend_of(ftp.connect("127.0.0.1", gateway.port))
    server = farm.servers[name]
    ftp.login(server.user, server.password)
    return ftp, name


def spread(gateway: Gateway, sessions: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(sessions):
        counts[backend_of(gateway.greeting())] += 1
    return counts


@pytest.mark.parametrize(
    ("weights", "expected"),
    [({"vs": 1, "pure": 1}, {"vs": 10, "pure": 10}), ({"vs": 3, "pure": 1}, {"vs": 15, "pure": 5})],
)
def test_round_robin_gives_each_backend_its_weight(
    make_gateway: Callable[..., Gateway], weights: dict[str, int], expected: dict[str, int]
) -> None:
    gateway = make_gateway(weights=weights)
    assert spread(gateway, 20) == expected


def test_least_connections_sends_new_sessions_to_the_idle_backend(
    farm: Farm, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = make_gateway(extra='balance = "least_connections"')
    first, first_on = session_on(gateway, farm)
    second, second_on = session_on(gateway, farm)
    assert {first_on, second_on} == {"vs", "pure"}
    second.quit()
    gateway.wait_for(
        "the session gone",
        lambda: gateway.scrape().get(("ftp_gateway_backend_sessions", second_on)) == 0,
    )
    assert gateway.scrape()[("ftp_gateway_backend_sessions", first_on)] == 1
    # Round robin would send the third session back to the first backend.
    third, third_on = session_on(gateway, farm)
    assert third_on == second_on
    for ftp in (first, third):
        ftp.quit()


def test_source_hash_keeps_each_client_address_on_its_backend(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(extra='balance = "source_hash"')
    sources = [f"127.0.0.{i}" for i in range(2, 18)]
    first = {source: backend_of(gateway.greeting(source)) for source in sources}
    assert set(first.values()) == {"vs", "pure"}  # the addresses spread over both
    for _ in range(2):
        for source in sources:
            assert backend_of(gateway.greeting(source)) == first[source], source


def user_reply(gateway: Gateway, user: str) -> str:
    """The gateway's own greeting, then the backend's reply to USER."""
    ftp = ftplib.FTP(timeout=TIMEOUT)
    try:
        greeting = ftp.connect("127.0.0.1", gateway.port)
        assert greeting.startswith("220 FTP gateway ready"), greeting
        return ftp.sendcmd(f"USER {user}")
    finally:
        ftp.close()


def test_user_hash_keeps_each_user_on_its_backend(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(extra='balance = "user_hash"')
    users = [f"user{i}" for i in range(16)]
    first = {user: backend_of(user_reply(gateway, user)) for user in users}
    assert set(first.values()) == {"vs", "pure"}
    for _ in range(2):
        for user in users:
            assert backend_of(user_reply(gateway, user)) == first[user], user


def test_sessions_fail_over_when_a_backend_stops_and_return_when_it_is_back(
    farm: Farm, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = make_gateway()
    assert spread(gateway, 4) == {"vs": 2, "pure": 2}
    farm.servers["pure"].stop()
    # No client sees an error: the first session tried pure, found it gone, and went to vs.
    assert spread(gateway, 10) == {"vs": 10}
    assert gateway.up("pure") == 0
    assert "Backend pure (127.0.0.1:" in gateway.process.log()
    farm.restart("pure")
    gateway.wait_for("pure up again", lambda: gateway.up("pure") == 1)
    assert spread(gateway, 10) == {"vs": 5, "pure": 5}


def test_with_every_backend_down_the_client_gets_421_with_the_reason(
    farm: Farm, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = make_gateway()
    for server in farm.servers.values():
        server.stop()
    with pytest.raises(ftplib.error_temp) as refused:
        gateway.greeting()
    text = str(refused.value)
    assert text.startswith("421 Upstream server unavailable: backend ")
    assert "refused" in text
    # Back for the next client, without waiting for a health check.
    farm.restart("vs")
    assert backend_of(gateway.greeting()) == "vs"


@pytest.mark.parametrize("upstream_mode", ["passive", "active"], ids=["up-passive", "up-active"])
@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_transfers_on_every_backend(
    farm: Farm, make_gateway: Callable[..., Gateway], passive: bool, upstream_mode: str
) -> None:
    """A download and an upload on each backend, the client in passive or active mode, the
    gateway towards the backend in passive or active mode."""
    gateway = make_gateway(extra=f'[data]\nupstream_mode = "{upstream_mode}"')
    seen = set()
    for index in range(2):
        ftp, name = session_on(gateway, farm)
        seen.add(name)
        ftp.set_pasv(passive)
        buffer = io.BytesIO()
        ftp.retrbinary("RETR data.bin", buffer.write)
        assert buffer.getvalue() == PAYLOAD, name
        upload = f"up-{index}.bin"
        assert ftp.storbinary(f"STOR {upload}", io.BytesIO(PAYLOAD)).startswith("226")
        ftp.quit()
        assert (farm.servers[name].root / upload).read_bytes() == PAYLOAD, name
    assert seen == {"vs", "pure"}


def test_backends_that_never_greet_or_greet_badly_are_skipped_unseen(
    farm: Farm, tmp_path: Path
) -> None:
    """A backend that accepts and stays silent, one whose greeting never ends (endless 120
    lines) and one that greets with code 999 are each marked down when a session meets them;
    every client gets the next backend's greeting and nothing else."""
    with (
        socket.create_server(("127.0.0.1", 0)) as silent,  # the kernel accepts; nobody speaks
        HostileUpstream(Mode.ENDLESS_1XX_GREETING) as endless,
        HostileUpstream(Mode.BAD_CODE) as bad,
    ):
        ports = {
            "silent": silent.getsockname()[1],
            "endless": endless.port,
            "bad": bad.port,
            "vs": farm.servers["vs"].port,
        }
        config = tmp_path / "hostile.toml"
        config.write_text(
            "".join(
                f'[[backends]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\n'
                for name, port in ports.items()
            )
            # Checks too rare to mark them before the sessions meet them.
            + "[health]\ninterval = 600\ntimeout = 1\n"
        )
        process = start_gateway(tmp_path, "--config", str(config))
        try:
            gateway = Gateway(process, 0, config)
            for _ in range(8):
                assert backend_of(gateway.greeting()) == "vs"
            log = process.log()
        finally:
            process.stop()
    down = {
        line.split("Backend ")[1].split(" ")[0]: line
        for line in log.splitlines()
        if "is down" in line
    }
    assert set(down) == {"silent", "endless", "bad"}
    assert "no greeting within health.timeout" in down["silent"]
    assert "1yz replies" in down["endless"]
    assert "not an FTP reply: '999 x'" in down["bad"]


def test_a_backend_that_greets_then_hangs_fails_its_checks(farm: Farm, tmp_path: Path) -> None:
    """A backend whose daemon still greets (from its accept loop) but answers nothing after
    it (a hung worker) would pass a check that reads only the 220: the check also waits for
    the answer to its QUIT, so the backend goes down and sessions go to the one that works."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)
        held: list[socket.socket] = []
        stop = threading.Event()

        def greet_then_hang() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.sendall(b"220 Still greeting.\r\n")
                held.append(conn)  # never read, never answered, never closed

        greeter = threading.Thread(target=greet_then_hang, daemon=True)
        greeter.start()
        config = tmp_path / "hung.toml"
        config.write_text(
            f'[[backends]]\nname = "hung"\naddress = "127.0.0.1:{listener.getsockname()[1]}"\n'
            f'[[backends]]\nname = "vs"\naddress = "127.0.0.1:{farm.servers["vs"].port}"\n'
            "[health]\ninterval = 0.5\ntimeout = 1\nfall = 2\nrise = 1\n"
        )
        process = start_gateway(tmp_path, "--config", str(config))
        try:
            deadline = time.monotonic() + TIMEOUT
            while "Backend hung (" not in process.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            gateway = Gateway(process, 0, config)
            assert [backend_of(gateway.greeting()) for _ in range(4)] == ["vs"] * 4
            log = process.log()
        finally:
            process.stop()
            stop.set()
            greeter.join(timeout=5)
            for conn in held:
                conn.close()
    assert "Backend hung (127.0.0.1:" in log and "is down: 2 checks failed" in log, log[-2000:]
    assert "greeted, then did not answer QUIT within health.timeout" in log


def tls_and_plain_servers(tmp_path: Path) -> tuple[Pki, RunningServer, RunningServer]:
    """vsftpd requiring TLS (TLS 1.2; Debian's vsftpd fails many TLS 1.3 uploads) with the
    test PKI's certificate, and pure-ftpd in clear text."""
    pki = make_pki(tmp_path / "pki")
    vs = start_server(
        "vsftpd",
        tmp_path / "vs-tls",
        tls="required",
        cert=pki.server_cert,
        key=pki.server_key,
        tls_max_version="1.2",
    )
    return pki, vs, start_server("pure-ftpd", tmp_path / "pure")


def tls_backends(vs: RunningServer, pure: RunningServer, ca: Path, extra: str = "") -> str:
    """Backend vs with its own upstream TLS (required, verified against `ca` as localhost),
    backend pure in clear text, as [tls] says."""
    return (
        f'[[backends]]\nname = "vs"\naddress = "127.0.0.1:{vs.port}"\n'
        f'tls_upstream = "required"\ntls_upstream_ca_file = "{ca}"\n'
        'tls_upstream_name = "localhost"\n'
        f'[[backends]]\nname = "pure"\naddress = "127.0.0.1:{pure.port}"\n'
        '[tls]\nupstream = "off"\n' + extra
    )


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-ca", "untrusted-ca"])
def test_each_backend_has_its_own_upstream_tls_settings(tmp_path: Path, trusted: bool) -> None:
    """[tls] says clear text; one backend (vsftpd requiring TLS) says TLS with its own CA
    and name. Sessions there are protected and verified, sessions on the other are not. With
    a CA that did not sign vsftpd's certificate, the session sent there fails over to the
    other backend before the client sees anything (its greeting is held until the upstream
    is secured), and vsftpd is marked down."""
    pki, vs, pure = tls_and_plain_servers(tmp_path)
    farm = Farm(tmp_path, {"vs": vs, "pure": pure})
    for server in farm.servers.values():
        (server.root / "data.bin").write_bytes(PAYLOAD)
        (server.root / "data.bin").chmod(0o644)
    ca = pki.ca_cert if trusted else pki.untrusted_ca_cert
    config = tmp_path / "tls.toml"
    config.write_text(tls_backends(vs, pure, ca))
    process = start_gateway(tmp_path, "--config", str(config))
    try:
        gateway = Gateway(process, 0, config)
        served = Counter()
        for _ in range(4):
            ftp = ftplib.FTP(timeout=TIMEOUT)
            try:
                greeting = ftp.connect("127.0.0.1", gateway.port)
            except ftplib.error_temp as e:
                raise AssertionError(f"a session was refused: {e}") from None
            name = backend_of(greeting)
            ftp.login(farm.servers[name].user, farm.servers[name].password)
            buffer = io.BytesIO()
            ftp.retrbinary("RETR data.bin", buffer.write)
            assert buffer.getvalue() == PAYLOAD
            ftp.quit()
            served[name] += 1
        expected = {"vs": 2, "pure": 2} if trusted else {"pure": 4}
        assert served == expected
        log = process.log()
        if not trusted:
            assert "Backend vs (127.0.0.1:" in log and "failed a session: the upstream's" in log
            assert "certificate is signed by an unknown CA" in log
    finally:
        process.stop()
        vs.stop()
        pure.stop()


def test_health_checks_take_out_a_backend_whose_required_tls_would_fail(tmp_path: Path) -> None:
    """vsftpd requires TLS and its backend entry requires it too, but names a CA that did not
    sign its certificate: every session sent there would end with 421. The health checks do
    the AUTH TLS handshake as a session would, so the backend goes down, with the reason, and
    sessions go to the other one; with the right CA the same backend passes its checks."""
    pki, vs, pure = tls_and_plain_servers(tmp_path)
    try:
        for ca, expected in ((pki.untrusted_ca_cert, "down"), (pki.ca_cert, "up")):
            config = tmp_path / f"{expected}.toml"
            health = "[health]\ninterval = 0.3\ntimeout = 5\nfall = 2\nrise = 1\n"
            config.write_text(tls_backends(vs, pure, ca, health))
            process = start_gateway(tmp_path, "--config", str(config))
            try:
                if expected == "down":
                    deadline = time.monotonic() + TIMEOUT
                    while "is down" not in process.log():
                        assert time.monotonic() < deadline, process.log()[-3000:]
                        time.sleep(0.1)
                else:
                    time.sleep(1.5)  # five rounds of checks, any of which could take it out
                gateway = Gateway(process, 0, config)
                served = Counter(backend_of(gateway.greeting()) for _ in range(4))
                log = process.log()
            finally:
                process.stop()
            if expected == "down":
                assert "Backend vs (127.0.0.1:" in log and "is down: 2 checks failed" in log, log
                assert "certificate verify failed" in log, log[-3000:]
                assert served == {"pure": 4}
            else:
                assert "is down" not in log, log[-3000:]
                assert served == {"vs": 2, "pure": 2}
    finally:
        vs.stop()
        pure.stop()


def test_sighup_changes_the_backends_for_new_sessions(
    farm: Farm, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = make_gateway()
    assert spread(gateway, 2) == {"vs": 1, "pure": 1}
    metrics = f'[metrics]\nlisten = "tcp:{gateway.metrics_port}:interface=127.0.0.1"\n'
    vs = farm.servers["vs"]
    gateway.config.write_text(
        f'{metrics}[[backends]]\nname = "vs"\naddress = "127.0.0.1:{vs.port}"\n'
        '[tls]\nupstream = "off"\n'
    )
    hang_up(gateway)
    assert spread(gateway, 4) == {"vs": 4}
    assert ("ftp_gateway_backend_up", "pure") not in gateway.scrape()
    write_config(farm, gateway.config, weights={"pure": 3}, extra=metrics)
    hang_up(gateway)
    assert spread(gateway, 8) == {"vs": 2, "pure": 6}


def hang_up(gateway: Gateway) -> None:
    """SIGHUP the gateway and wait (bounded) until it logged the reload."""
    expect = "Configuration reloaded"
    before = gateway.process.log().count(expect)
    gateway.process.proc.send_signal(signal.SIGHUP)
    gateway.wait_for("reload", lambda: gateway.process.log().count(expect) > before, 10)
