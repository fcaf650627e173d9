"""Bandwidth limits end to end: a real gateway process between real clients (curl, ftplib) and
a real server (vsftpd), with `limits.rate_*` set, on both relays (`data.relay`): the spliced
one for plain TCP and the copy relay (also what TLS data connections use).

Only lower bounds on time are asserted (a throttled transfer takes at least so long), and
upper bounds on bytes moved in a measured time (what a limit promises); never an upper bound
on how long anything takes.
"""

from __future__ import annotations

import ftplib
import io
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clients import curl, sha256
from gateway_process import GatewayProcess, start_gateway
from pki import Pki, make_pki
from servers import RunningServer, start_server

from gateway.rates import MAX_GRANT, burst_for

MIB = 1024 * 1024
#: Both relays; each test checks from the log that its transfers took the path asked for.
RELAYS = ("copy", "splice")
FOUR = os.urandom(4 * MIB)
TWO = FOUR[: 2 * MIB]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server("vsftpd", tmp_path_factory.mktemp("vsftpd"))
    (server.root / "four.bin").write_bytes(FOUR)
    (server.root / "two.bin").write_bytes(TWO)
    with (server.root / "huge.bin").open("wb") as f:
        f.truncate(1024 * MIB)  # sparse: the server reads zeros as fast as it can
    for path in server.root.iterdir():
        path.chmod(0o666)
    server.root.chmod(0o777)  # uploads are written by the ftptest user
    yield server
    server.stop()


@pytest.fixture
def gateway_with(tmp_path: Path, server: RunningServer) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway in reverse mode to `server` with extra TOML settings."""
    started: list[tuple[GatewayProcess, str]] = []

    def start(settings: str, *, reverse: bool = True, relay: str = "auto") -> GatewayProcess:
        path = tmp_path / f"gateway-{len(started)}.toml"
        upstream = f'upstream = "{server.host}:{server.port}"\n' if reverse else ""
        path.write_text(upstream + settings)
        gateway = start_gateway(tmp_path, "--config", str(path), "--data-relay", relay)
        started.append((gateway, relay))
        return gateway

    yield start
    for gateway, relay in started:
        gateway.stop()
        assert "Traceback" not in gateway.log() and "Unhandled" not in gateway.log()
        if relay in RELAYS:
            assert relay_paths(gateway) == {relay}


def relay_paths(gateway: GatewayProcess) -> set[str]:
    """The relays the gateway's finished transfers took, from its log."""
    return set(re.findall(r"Transfer (?:download|upload) \w+: .*\((splice|copy)\)", gateway.log()))


def url(gateway: GatewayProcess, server: RunningServer, path: str) -> str:
    return f"ftp://{server.user}:{server.password}@{gateway.host}:{gateway.port}/{path}"


def login(gateway: GatewayProcess, server: RunningServer) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=60)
    ftp.connect(gateway.host, gateway.port)
    ftp.login(server.user, server.password)
    return ftp


def proxy_login(gateway: GatewayProcess, server: RunningServer, user: str) -> ftplib.FTP:
    """Forward mode: log in to the gateway as proxy user `user`, then to the server."""
    ftp = ftplib.FTP(timeout=60)
    ftp.connect(gateway.host, gateway.port)
    assert ftp.sendcmd(f"USER {user}").startswith("331")
    assert ftp.sendcmd(f"PASS {user}-secret").startswith("230")
    ftp.login(f"{server.user}@{server.host}:{server.port}", server.password)
    return ftp


def at_once(*jobs: Callable[[], object]) -> list[object]:
    """Run `jobs` in threads started together; their results, or raise the first error."""
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int, job: Callable[[], object]) -> None:
        try:
            results[index] = job()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a transfer did not end in 120 s"
    if errors:
        raise errors[0]
    return results


def get(ftp: ftplib.FTP, path: str) -> bytes:
    buffer = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", buffer.write)
    ftp.quit()
    return buffer.getvalue()


def put(ftp: ftplib.FTP, path: str, data: bytes) -> str:
    reply = ftp.storbinary(f"STOR {path}", io.BytesIO(data))
    ftp.quit()
    return reply


def cpu_seconds(gateway: GatewayProcess) -> float:
    """User plus system CPU time the gateway process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{gateway.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def most_bytes(rate: int, seconds: float, transfers: int) -> float:
    """What a limit of `rate` lets through in `seconds`: the rate's worth, the bucket's burst
    and what each running transfer may hold granted and unread."""
    return rate * seconds + burst_for(rate) + transfers * MAX_GRANT


# ---------------------------------------------------------------------------- one session


@pytest.mark.parametrize("relay", RELAYS)
def test_download_at_1_mib_per_second_takes_at_least_3_seconds(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, tmp_path: Path, relay: str
) -> None:
    gateway = gateway_with('[limits]\nrate_per_session = "1M"\n', relay=relay)
    out = tmp_path / "four.bin"
    started = time.monotonic()
    result = curl(url(gateway, server, "four.bin"), "-o", str(out))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sha256(out.read_bytes()) == sha256(FOUR)
    assert elapsed >= 3.0
    assert len(FOUR) <= most_bytes(MIB, elapsed, 1)


@pytest.mark.parametrize("relay", RELAYS)
def test_upload_at_1_mib_per_second_takes_at_least_3_seconds(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, tmp_path: Path, relay: str
) -> None:
    # Only uploads are limited: the table form, one direction.
    gateway = gateway_with('[limits]\nrate_per_session = { upload = "1M" }\n', relay=relay)
    source = tmp_path / "up.bin"
    source.write_bytes(FOUR)
    started = time.monotonic()
    result = curl(url(gateway, server, "uploaded.bin"), "-T", str(source))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sha256((server.root / "uploaded.bin").read_bytes()) == sha256(FOUR)
    assert elapsed >= 3.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_protected_transfers_at_1_mib_per_second_take_at_least_3_seconds(
    gateway_with: Callable[..., GatewayProcess],
    server: RunningServer,
    pki: Pki,
    tmp_path: Path,
    direction: str,
) -> None:
    """FTPS to the client (AUTH TLS, PROT P): the relay reads from, or writes to, a TLS data
    connection; what a TLS record brings beyond a grant is charged to the next one."""
    gateway = gateway_with(
        f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n'
        f'[limits]\nrate_per_session = {{ {direction} = "1M" }}\n'
    )
    tls = ("--ssl-reqd", "--cacert", str(pki.ca_cert))
    local = tmp_path / "local.bin"
    if direction == "upload":
        local.write_bytes(FOUR)
    started = time.monotonic()
    if direction == "download":
        result = curl(url(gateway, server, "four.bin"), *tls, "-o", str(local))
    else:
        result = curl(url(gateway, server, "tls-up.bin"), *tls, "-T", str(local))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"PROT P" in result.stderr
    written = local if direction == "download" else server.root / "tls-up.bin"
    assert sha256(written.read_bytes()) == sha256(FOUR)
    assert elapsed >= 3.0


# ------------------------------------------------------------------------ shared buckets


@pytest.mark.parametrize("relay", RELAYS)
def test_two_sessions_of_one_user_share_the_users_download_rate(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, relay: str
) -> None:
    gateway = gateway_with('[limits]\nrate_per_user = "1M"\n', relay=relay)
    first, second = login(gateway, server), login(gateway, server)
    started = time.monotonic()
    results = at_once(lambda: get(first, "four.bin"), lambda: get(second, "four.bin"))
    elapsed = time.monotonic() - started
    assert [sha256(r) for r in results] == [sha256(FOUR)] * 2  # type: ignore[arg-type]
    # 8 MiB at 1 MiB/s between them: each alone would take 4 s, together at least 7.
    assert elapsed >= 7.0
    assert 2 * len(FOUR) <= most_bytes(MIB, elapsed, 2)


@pytest.mark.parametrize("relay", RELAYS)
def test_two_sessions_of_one_user_share_the_users_upload_rate(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, relay: str
) -> None:
    gateway = gateway_with('[limits]\nrate_per_user = { upload = "512k" }\n', relay=relay)
    first, second = login(gateway, server), login(gateway, server)
    started = time.monotonic()
    at_once(lambda: put(first, "a.bin", TWO), lambda: put(second, "b.bin", TWO))
    elapsed = time.monotonic() - started
    for name in ("a.bin", "b.bin"):
        assert sha256((server.root / name).read_bytes()) == sha256(TWO)
    assert elapsed >= 7.0  # 4 MiB at 512 KiB/s
    assert 2 * len(TWO) <= most_bytes(512 * 1024, elapsed, 2)


@pytest.mark.parametrize("relay", RELAYS)
def test_the_total_rate_caps_two_different_users(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, relay: str
) -> None:
    gateway = gateway_with(
        'proxy_auth = ["memory:alice:alice-secret", "memory:bob:bob-secret"]\n'
        'allow_upstream = ["127.0.0.0/8"]\n'
        '[limits]\nrate_per_user = "8M"\nrate_total = "1M"\n',
        reverse=False,
        relay=relay,
    )
    alice, bob = proxy_login(gateway, server, "alice"), proxy_login(gateway, server, "bob")
    started = time.monotonic()
    results = at_once(lambda: get(alice, "four.bin"), lambda: get(bob, "four.bin"))
    elapsed = time.monotonic() - started
    assert [sha256(r) for r in results] == [sha256(FOUR)] * 2  # type: ignore[arg-type]
    assert elapsed >= 7.0
    assert 2 * len(FOUR) <= most_bytes(MIB, elapsed, 2)


@pytest.mark.parametrize("relay", RELAYS)
def test_abor_while_a_throttled_download_waits_for_tokens(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, relay: str
) -> None:
    """ABOR while the relay sleeps on its timer: 426 then 226, and the session goes on."""
    gateway = gateway_with('[limits]\nrate_per_session = "64k"\n', relay=relay)
    ftp = login(gateway, server)
    ftp.voidcmd("TYPE I")
    data = ftp.transfercmd("RETR four.bin")
    data.settimeout(10)
    assert data.recv(1024)
    time.sleep(0.5)  # the 16 KiB burst is gone: the relay waits for its next grant
    # RFC 959 section 4.1.3: Telnet IP, then Synch (IAC DM as urgent data), then ABOR.
    ftp.sock.sendall(b"\xff\xf4")
    ftp.sock.send(b"\xff\xf2", socket.MSG_OOB)
    ftp.sock.sendall(b"ABOR\r\n")
    first, second = ftp.getline(), ftp.getline()
    assert first.startswith("426"), first
    assert second.startswith("226"), second
    data.close()
    assert ftp.voidcmd("NOOP").startswith("200")
    assert ftp.sendcmd("SIZE four.bin") == f"213 {len(FOUR)}"
    ftp.quit()


# ------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("relay", RELAYS)
def test_memory_stays_bounded_while_a_fast_download_is_throttled(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, relay: str
) -> None:
    """vsftpd could send the sparse 1 GiB file at several hundred MiB/s and the client reads
    as fast as it can: the gateway must leave the bytes in the kernel, not in its memory."""
    rate = 256 * 1024
    gateway = gateway_with(f"[limits]\nrate_per_session = {rate}\n", relay=relay)
    ftp = login(gateway, server)
    ftp.voidcmd("TYPE I")
    started = time.monotonic()  # before the relay starts
    data = ftp.transfercmd("RETR huge.bin")
    data.settimeout(10)
    received = 0

    def read_for(seconds: float) -> None:
        nonlocal received
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            chunk = data.recv(1 << 20)
            assert chunk, "the download ended early"
            received += len(chunk)

    read_for(1.0)
    before, cpu_before = gateway.rss_kib(), cpu_seconds(gateway)
    read_for(4.0)
    after, cpu = gateway.rss_kib(), cpu_seconds(gateway) - cpu_before
    elapsed = time.monotonic() - started
    data.close()
    with pytest.raises(ftplib.Error):
        ftp.voidresp()  # cut short: never 226
    ftp.close()
    assert received <= most_bytes(rate, elapsed, 1)
    assert after - before < 4 * 1024, f"RSS grew from {before} to {after} KiB"
    assert cpu < 1.0, f"{cpu:.2f} s of CPU in 4 s of waiting: busy-waiting"


@pytest.mark.parametrize("relay", RELAYS)
def test_memory_stays_bounded_while_a_fast_upload_is_throttled(
    gateway_with: Callable[..., GatewayProcess], server: RunningServer, relay: str
) -> None:
    rate = 256 * 1024
    gateway = gateway_with(f"[limits]\nrate_per_session = {rate}\n", relay=relay)
    ftp = login(gateway, server)
    ftp.voidcmd("TYPE I")
    started = time.monotonic()  # before the relay starts
    data = ftp.transfercmd("STOR flood.bin")
    data.setblocking(False)
    chunk = bytes(1 << 20)
    sent = 0

    def send_for(seconds: float) -> None:
        """Write whenever the socket takes more: as fast as the gateway reads."""
        nonlocal sent
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += data.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)

    send_for(1.0)
    before, cpu_before = gateway.rss_kib(), cpu_seconds(gateway)
    send_for(4.0)
    after, cpu = gateway.rss_kib(), cpu_seconds(gateway) - cpu_before
    data.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    data.close()  # reset: the upload is cut short
    with pytest.raises(ftplib.Error):
        ftp.voidresp()
    elapsed = time.monotonic() - started  # the relay has ended: nothing more is written
    ftp.close()
    written = (server.root / "flood.bin").stat().st_size
    assert written <= most_bytes(rate, elapsed, 1)
    # What the client sent beyond that waits in socket buffers, not in the gateway.
    assert sent > written
    assert after - before < 4 * 1024, f"RSS grew from {before} to {after} KiB"
    assert cpu < 1.0, f"{cpu:.2f} s of CPU in 4 s of waiting: busy-waiting"
