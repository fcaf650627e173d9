"""The gateway against direct connections, in one run: `python benchmarks/run.py`.

Real servers and clients on loopback, direct and through the gateway interleaved (each round
measures every path once, so a busy moment hits all of them), medians with ranges, and the
ratio gateway/direct:

1. throughput: curl RETR and STOR, passive and active, to vsftpd, through the gateway on the
   spliced relay and on the copy relay;
2. FTPS throughput: curl with PROT P to vsftpd requiring TLS, directly and through the gateway
   (which terminates the client's TLS and originates its own to vsftpd);
3. session set-up latency: connect, log in, PWD, QUIT (Python's ftplib), median and p90;
4. concurrency: N sessions started at once (log in, PASV, RETR a file), directly and through
   the gateway: successes, wall time, aggregate MB/s, the gateway's peak RSS;
5. idle sessions: the gateway's resident memory per logged-in idle session;
6. the relay alone, without FTP (benchmarks/relays.py): the gateway's relays against the
   fastest relay a process can be, and against no relay at all.

Parts 4 and 5 use pyftpdlib as the server, with a listen backlog of 4096: vsftpd listens with a
fixed backlog of 32, so a burst of hundreds of connections overflows its accept queue, directly
or through the gateway alike, and vsftpd forks two processes per session.

`--quick` runs every part with small sizes and few sessions (CI runs it so the benchmark keeps
working); its figures mean nothing. Results go to benchmarks/results-latest.json (--json).
Needs what scripts/install-test-deps installs (vsftpd, curl) and the test extra (cryptography).
"""

from __future__ import annotations

import argparse
import asyncio
import ftplib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_process import GatewayProcess, start_gateway  # noqa: E402
from pki import Pki, make_pki  # noqa: E402
from relays import relay_ceiling  # noqa: E402
from servers import RunningServer, start_server  # noqa: E402

MIB = 1 << 20
#: Client source addresses for the many-session parts: spreads sessions over several
#: (address, ephemeral port) spaces.
SOURCES = [f"127.0.0.{n}" for n in range(2, 18)]

_PYFTPDLIB_MANY = """
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
port, user, password, root = sys.argv[1:5]
authorizer = DummyAuthorizer()
authorizer.add_user(user, password, root, perm="elr")
FTPHandler.authorizer = authorizer
FTPHandler.timeout = 3600
server = FTPServer(("127.0.0.1", int(port)), FTPHandler, backlog=4096)
server.max_cons = 0
server.max_cons_per_ip = 0
print("ready", flush=True)
server.serve_forever(timeout=1)
"""


# ---------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
    }


def ratio(through: float, direct: float) -> float:
    return through / direct if direct else float("nan")


# ---------------------------------------------------------------------------- clients


def curl_speed(url: str, *args: str) -> float:
    """curl's average speed in MB/s (10^6 bytes) for one transfer."""
    result = subprocess.run(
        [
            *("curl", "-sS", "-4", "--max-time", "600", "-o", "/dev/null"),
            *("-w", "%{speed_download} %{speed_upload}", *args, url),
        ],
        capture_output=True,
        text=True,
        timeout=620,
        check=True,
    )
    down, up = (float(x) for x in result.stdout.split())
    return max(down, up) / 1e6


def setup_seconds(port: int, user: str, password: str) -> float:
    """One session set-up: connect, log in, PWD, QUIT, with Python's ftplib."""
    started = time.perf_counter()
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", port)
    ftp.login(user, password)
    ftp.pwd()
    ftp.quit()
    return time.perf_counter() - started


class FTPClient:
    """A minimal asyncio FTP client: thousands of sessions from one process."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def connect(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(self.source, 0)
        )
        await self.expect(220)

    async def reply(self) -> tuple[int, bytes]:
        line = await self.reader.readline()
        if len(line) < 4:
            raise EOFError("control connection closed")
        if line[3:4] == b"-":
            while True:
                more = await self.reader.readline()
                if not more:
                    raise EOFError("control connection closed")
                if more[:3] == line[:3] and more[3:4] == b" ":
                    break
        return int(line[:3]), line

    async def expect(self, *codes: int) -> bytes:
        code, line = await self.reply()
        if code not in codes:
            raise RuntimeError(line.decode(errors="replace").strip())
        return line

    async def command(self, text: str, *codes: int) -> bytes:
        self.writer.write(text.encode() + b"\r\n")
        return await self.expect(*codes)

    async def login(self, user: str, password: str) -> None:
        await self.command(f"USER {user}", 331)
        await self.command(f"PASS {password}", 230)

    async def retr(self, path: str) -> int:
        await self.command("TYPE I", 200)
        line = await self.command("PASV", 227)
        numbers = line[line.index(b"(") + 1 : line.index(b")")].split(b",")
        port = int(numbers[4]) * 256 + int(numbers[5])
        data_reader, data_writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(self.source, 0)
        )
        await self.command(f"RETR {path}", 150, 125)
        received = 0
        while chunk := await data_reader.read(256 * 1024):
            received += len(chunk)
        data_writer.close()
        await self.expect(226)
        return received

    async def quit(self) -> None:
        try:
            await self.command("QUIT", 221)
        finally:
            self.writer.close()


async def transfer_session(port: int, user: str, password: str, path: str, n: int) -> int:
    client = FTPClient(SOURCES[n % len(SOURCES)])
    await client.connect(port)
    await client.login(user, password)
    received = await client.retr(path)
    await client.quit()
    return received


def concurrent_transfers(
    port: int, user: str, password: str, path: str, sessions: int, limit: float
) -> tuple[list[int | BaseException], float]:
    """Start `sessions` transfer sessions at once; each gets `limit` seconds."""

    async def run() -> list[int | BaseException]:
        tasks = [
            asyncio.wait_for(transfer_session(port, user, password, path, n), limit)
            for n in range(sessions)
        ]
        return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.perf_counter()
    results = asyncio.run(run())
    return results, time.perf_counter() - started


# ---------------------------------------------------------------------------- gateway


def gateway(
    work: Path, upstream: RunningServer | ManyServer | int, relay: str, *extra: str
) -> GatewayProcess:
    """A gateway in reverse mode with per-IP limits raised, as a corporate NAT needs."""
    config = work / f"gateway-{relay}-{len(list(work.glob('gateway-*.toml')))}.toml"
    config.write_text(
        "[limits]\nmax_sessions = 100000\nmax_sessions_per_ip = 100000\n"
        f'[data]\nrelay = "{relay}"\n' + "".join(extra)
    )
    port = upstream if isinstance(upstream, int) else upstream.port
    return start_gateway(work, "--config", str(config), "--upstream", f"127.0.0.1:{port}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


# ---------------------------------------------------------------------------- parts


def throughput(
    work: Path,
    server: RunningServer,
    size_mib: int,
    repeat: int,
    out: Callable[[str], None],
    relays: tuple[str, ...] = ("splice", "copy"),
) -> dict[str, Any]:
    source = server.root / "bench.bin"
    with source.open("wb") as f:
        block = os.urandom(MIB)
        for _ in range(size_mib):
            f.write(block)
    source.chmod(0o644)
    paths = {"direct": server.port}
    gateways = {relay: gateway(work, server, relay) for relay in relays}
    paths |= {relay: gw.port for relay, gw in gateways.items()}
    cases = {
        "RETR passive": (["--ftp-pasv"], "bench.bin"),
        "RETR active": (["-P", "127.0.0.1"], "bench.bin"),
        "STOR passive": (["--ftp-pasv", "-T", str(source)], "up.bin"),
        "STOR active": (["-P", "127.0.0.1", "-T", str(source)], "up.bin"),
    }
    samples: dict[str, dict[str, list[float]]] = {c: {p: [] for p in paths} for c in cases}
    # The gateway's own CPU time per GiB moved: what each relay costs, whatever else runs.
    cpu: dict[str, list[float]] = {relay: [] for relay in gateways}
    try:
        for round_ in range(repeat):
            for case, (extra, name) in cases.items():
                order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
                for path in order:
                    url = f"ftp://{server.user}:{server.password}@127.0.0.1:{paths[path]}/{name}"
                    gw = gateways.get(path)
                    before = cpu_seconds(gw.proc.pid) if gw else 0.0
                    samples[case][path].append(curl_speed(url, *extra))
                    if gw:
                        cpu[path].append((cpu_seconds(gw.proc.pid) - before) * 1024 / size_mib)
        peaks = {relay: status_kib(gw.proc.pid, "VmHWM") for relay, gw in gateways.items()}
    finally:
        for gw in gateways.values():
            gw.stop()
    cpu_median = {relay: statistics.median(values) for relay, values in cpu.items()}
    results: dict[str, Any] = {
        "size_mib": size_mib,
        "repeat": repeat,
        "peak_rss_kib": peaks,
        "gateway_cpu_s_per_gib": cpu_median,
    }
    out(f"\n1. Throughput, {size_mib} MiB, curl to vsftpd, MB/s: median (min-max) of {repeat}")
    out("| case | direct | " + " | ".join(f"{relay} | ratio" for relay in relays) + " |")
    out("| --- | --- |" + " --- | --- |" * len(relays))
    for case in cases:
        stats = {path: summary(values) for path, values in samples[case].items()}
        direct = stats["direct"]["median"]
        results[case] = {
            path: {**stat, "ratio": ratio(stat["median"], direct)} for path, stat in stats.items()
        }
        cells = [fmt_range(stats["direct"])]
        for relay in relays:
            cells += [fmt_range(stats[relay]), f"{ratio(stats[relay]['median'], direct):.2f}"]
        out(f"| {case} | " + " | ".join(cells) + " |")
    out("Gateway peak RSS: " + ", ".join(f"{r} {peaks[r] // 1024} MiB" for r in relays))
    out(
        "Gateway CPU per GiB relayed (median of all cases): "
        + ", ".join(f"{r} {cpu_median[r]:.2f} s" for r in relays)
    )
    return results


def fmt_range(stat: dict[str, float]) -> str:
    return f"{stat['median']:.0f} ({stat['min']:.0f}-{stat['max']:.0f})"


def ftps_throughput(
    work: Path, pki: Pki, size_mib: int, repeat: int, out: Callable[[str], None]
) -> dict[str, Any]:
    server = start_server(
        "vsftpd",
        work / "vsftpd-tls",
        tls="required",
        cert=pki.server_cert,
        key=pki.server_key,
        # Debian's vsftpd 3.0.3 fails many TLS 1.3 uploads even from curl directly.
        tls_max_version="1.2",
    )
    source = server.root / "bench.bin"
    with source.open("wb") as f:
        block = os.urandom(MIB)
        for _ in range(size_mib):
            f.write(block)
    source.chmod(0o644)
    gw = gateway(
        work,
        server,
        "auto",
        f'[tls]\ncertificate = "{pki.server_chain}"\nprivate_key = "{pki.server_key}"\n',
        f'upstream = "required"\nupstream_ca_file = "{pki.ca_cert}"\nupstream_name = "localhost"\n',
    )
    paths = {"direct": server.port, "gateway": gw.port}
    tls = ["--ssl-reqd", "--cacert", str(pki.ca_cert), "--ftp-pasv"]
    cases = {"RETR passive": ([], "bench.bin"), "STOR passive": (["-T", str(source)], "up.bin")}
    samples: dict[str, dict[str, list[float]]] = {c: {p: [] for p in paths} for c in cases}
    try:
        for round_ in range(repeat):
            for case, (extra, name) in cases.items():
                order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
                for path in order:
                    url = f"ftp://{server.user}:{server.password}@localhost:{paths[path]}/{name}"
                    samples[case][path].append(curl_speed(url, *tls, *extra))
    finally:
        gw.stop()
        server.stop()
    results: dict[str, Any] = {}
    out(f"\n2. FTPS throughput (PROT P, TLS 1.2), {size_mib} MiB, curl to vsftpd, MB/s")
    out("| case | direct | gateway | ratio |")
    out("| --- | --- | --- | --- |")
    for case in cases:
        stats = {path: summary(values) for path, values in samples[case].items()}
        r = ratio(stats["gateway"]["median"], stats["direct"]["median"])
        results[case] = {**stats, "ratio": r}
        out(f"| {case} | {fmt_range(stats['direct'])} | {fmt_range(stats['gateway'])} | {r:.2f} |")
    return results


def setup_latency(
    work: Path, server: RunningServer, sessions: int, out: Callable[[str], None]
) -> dict[str, Any]:
    gw = gateway(work, server, "auto")
    paths = {"direct": server.port, "gateway": gw.port}
    samples: dict[str, list[float]] = {path: [] for path in paths}
    try:
        for n in range(sessions):
            order = list(paths) if n % 2 == 0 else list(reversed(paths))
            for path in order:
                samples[path].append(setup_seconds(paths[path], server.user, server.password))
    finally:
        gw.stop()
    stats = {path: summary([1000 * s for s in values]) for path, values in samples.items()}
    results = {
        **stats,
        "median_ratio": ratio(stats["gateway"]["median"], stats["direct"]["median"]),
        "p90_ratio": ratio(stats["gateway"]["p90"], stats["direct"]["p90"]),
    }
    out(f"\n3. Session set-up (connect, login, PWD, QUIT; ftplib to vsftpd), {sessions} each, ms")
    out("| | direct | gateway | ratio |")
    out("| --- | --- | --- | --- |")
    for key in ("median", "p90"):
        d, g = stats["direct"][key], stats["gateway"][key]
        out(f"| {key} | {d:.2f} | {g:.2f} | {ratio(g, d):.2f} |")
    return results


def concurrency(
    work: Path,
    server: ManyServer,
    levels: Iterable[int],
    file_mib: int,
    limit: float,
    out: Callable[[str], None],
) -> dict[str, Any]:
    name = "concurrent.bin"
    (server.root / name).write_bytes(os.urandom(file_mib * MIB))
    size = file_mib * MIB
    results: dict[str, Any] = {}
    out(f"\n4. Concurrency: N sessions at once (login, PASV, RETR {file_mib} MiB) to pyftpdlib")
    out("| N | path | successes | wall s | aggregate MB/s | gateway peak RSS |")
    out("| --- | --- | --- | --- | --- | --- |")
    for level, sessions in enumerate(levels):
        gw = gateway(work, server, "auto")
        rows = {}
        try:
            order = ["direct", "gateway"] if level % 2 == 0 else ["gateway", "direct"]
            for path in order:
                port = server.port if path == "direct" else gw.port
                outcome, wall = concurrent_transfers(
                    port, server.user, server.password, name, sessions, limit
                )
                ok = sum(1 for r in outcome if r == size)
                errors = sorted({repr(r)[:120] for r in outcome if r != size})
                rows[path] = {
                    "successes": ok,
                    "wall_s": wall,
                    "aggregate_mb_s": ok * size / wall / 1e6,
                    "errors": errors[:5],
                }
            if gw.proc.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited with {gw.proc.returncode} during the concurrency "
                    f"part; its log ends:\n{gw.log()[-3000:]}"
                )
            rows["gateway"]["peak_rss_kib"] = status_kib(gw.proc.pid, "VmHWM")
        finally:
            gw.stop()
        results[str(sessions)] = rows
        for path in ("direct", "gateway"):
            row = rows[path]
            rss = f"{row['peak_rss_kib'] // 1024} MiB" if "peak_rss_kib" in row else ""
            out(
                f"| {sessions} | {path} | {row['successes']}/{sessions} | {row['wall_s']:.1f} "
                f"| {row['aggregate_mb_s']:.0f} | {rss} |"
            )
            for error in row["errors"]:
                out(f"  {path} error: {error}")
    return results


class ManyServer:
    """pyftpdlib in one process with a deep accept queue and no connection limits."""

    user = "bench"
    password = "bench-pass"

    def __init__(self, work: Path) -> None:
        from gateway_process import free_port

        self.root = work / "many-root"
        self.root.mkdir()
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-c", _PYFTPDLIB_MANY),
                *(str(self.port), self.user, self.password, str(self.root)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def idle_sessions(
    work: Path, server: ManyServer, levels: Iterable[int], out: Callable[[str], None]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    out("\n5. Idle sessions (logged in, after PWD), the gateway's resident memory")
    out("| sessions | logged in | RSS before | RSS with sessions | per session |")
    out("| --- | --- | --- | --- | --- |")
    for sessions in levels:
        gw = gateway(work, server.port, "auto")
        try:
            results[str(sessions)] = hold_idle(gw, server, sessions)
        finally:
            gw.stop()
        r = results[str(sessions)]
        out(
            f"| {sessions} | {r['logged_in']} | {r['rss_before_kib'] / 1024:.1f} MiB "
            f"| {r['rss_with_kib'] / 1024:.1f} MiB | {r['per_session_kib']:.1f} kB |"
        )
    return results


def hold_idle(gw: GatewayProcess, server: ManyServer, sessions: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async def open_one(n: int) -> FTPClient:
            client = FTPClient(SOURCES[n % len(SOURCES)])
            await client.connect(gw.port)
            await client.login(server.user, server.password)
            await client.command("PWD", 257)
            return client

        # Warm up: the first sessions load code and fill caches that later ones share.
        warm = [await open_one(n) for n in range(20)]
        for client in warm:
            await client.quit()
        await asyncio.sleep(0.5)
        before = status_kib(gw.proc.pid, "VmRSS")
        clients: list[FTPClient] = []
        failed = 0
        for start in range(0, sessions, 250):
            batch = await asyncio.gather(
                *(open_one(n) for n in range(start, min(sessions, start + 250))),
                return_exceptions=True,
            )
            clients += [c for c in batch if isinstance(c, FTPClient)]
            failed += sum(1 for c in batch if not isinstance(c, FTPClient))
        await asyncio.sleep(1.0)
        with_sessions = status_kib(gw.proc.pid, "VmRSS")
        for client in clients:
            client.writer.close()
        return {
            "logged_in": len(clients),
            "failed": failed,
            "rss_before_kib": before,
            "rss_with_kib": with_sessions,
            "per_session_kib": (with_sessions - before) * 1024 / 1000 / max(1, len(clients)),
        }

    return asyncio.run(run())


# ---------------------------------------------------------------------------- main


def machine() -> dict[str, str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release()}


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: The parts, in the order they run; `--parts` picks some of them.
PARTS = ("throughput", "ftps", "setup", "concurrency", "idle", "relay")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument("--size-mib", type=int, default=512, help="throughput file size")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each throughput case")
    parser.add_argument("--setup-sessions", type=int, default=200, help="set-up latency samples")
    parser.add_argument("--concurrency", default="200,1000,2000", help="sessions started at once")
    parser.add_argument("--concurrency-mib", type=int, default=8, help="file per session")
    parser.add_argument("--idle", default="1000,5000", help="idle session counts")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated parts to run, of " + ", ".join(PARTS) + " (default: all)",
    )
    parser.add_argument(
        "--relays", default="splice,copy", help="relays measured in the throughput part"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results-latest.json")
    args = parser.parse_args(argv)
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if parts - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(parts - set(PARTS)))}")
    relays = tuple(r.strip() for r in args.relays.split(",") if r.strip())
    if not relays or set(relays) - {"splice", "copy"}:
        parser.error("--relays takes splice, copy or both")
    if args.quick:
        args.size_mib, args.repeat, args.setup_sessions = 4, 1, 6
        args.concurrency, args.concurrency_mib, args.idle = "5", 1, "30"
    open_files = raise_open_files()
    info = machine()
    print(f"Machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}")
    print(
        f"Command: python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    results: dict[str, Any] = {"machine": info, "open_files": open_files, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        if parts & {"throughput", "ftps", "setup"}:
            server = start_server("vsftpd", work / "vsftpd")
            try:
                if "throughput" in parts:
                    results["throughput"] = throughput(
                        work, server, args.size_mib, args.repeat, print, relays
                    )
                if "ftps" in parts:
                    pki = make_pki(work / "pki")
                    results["ftps"] = ftps_throughput(work, pki, args.size_mib, args.repeat, print)
                if "setup" in parts:
                    results["setup"] = setup_latency(work, server, args.setup_sessions, print)
            finally:
                server.stop()
        if parts & {"concurrency", "idle"}:
            many = ManyServer(work)
            try:
                if "concurrency" in parts:
                    levels = [int(n) for n in args.concurrency.split(",")]
                    limit = 60.0 if args.quick else 180.0
                    results["concurrency"] = concurrency(
                        work, many, levels, args.concurrency_mib, limit, print
                    )
                if "idle" in parts:
                    idle = [int(n) for n in args.idle.split(",")]
                    results["idle"] = idle_sessions(work, many, idle, print)
            finally:
                many.stop()
        if "relay" in parts:
            repeat = 1 if args.quick else max(args.repeat, 5)
            results["relay"] = relay_ceiling(work, args.size_mib, repeat, print)
    args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
