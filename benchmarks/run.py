"""Throughput and session rate through the gateway against direct, in one run:
`python benchmarks/run.py`.

Starts vsftpd (from scripts/install-test-deps) and the gateway in reverse mode in front of it,
on loopback, then times curl downloads and uploads of one file, directly and through the
gateway, passive and active, and prints MB/s and the ratio gateway/direct (median of --repeat).
Then it times short sessions one after another (connect, log in, download a small file in
passive mode, quit), directly and through the gateway, and prints sessions per second.
"""

from __future__ import annotations

import argparse
import ftplib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_process import start_gateway  # noqa: E402
from servers import start_server  # noqa: E402


def speed(url: str, *args: str) -> float:
    """curl's average speed in MB/s for one transfer."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "300",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download} %{speed_upload}",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=320,
        check=True,
    )
    down, up = (float(x) for x in result.stdout.split())
    return max(down, up) / 1e6


def session_rate(port: int, user: str, password: str, sessions: int) -> float:
    """Short sessions per second: connect, log in, RETR a small file (passive), quit."""
    started = time.perf_counter()
    for _ in range(sessions):
        ftp = ftplib.FTP(timeout=30)
        ftp.connect("127.0.0.1", port)
        ftp.login(user, password)
        ftp.retrbinary("RETR small.bin", io.BytesIO().write)
        ftp.quit()
    return sessions / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        server = start_server("vsftpd", work / "vsftpd")
        source = server.root / "bench.bin"
        with source.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        source.chmod(0o644)
        small = server.root / "small.bin"
        small.write_bytes(os.urandom(4096))
        small.chmod(0o644)
        gateway = start_gateway(work, "--upstream", f"127.0.0.1:{server.port}")
        try:
            cases = {
                "download passive": (["--ftp-pasv"], "bench.bin"),
                "download active": (["-P", "127.0.0.1"], "bench.bin"),
                "upload passive": (["--ftp-pasv", "-T", str(source)], "up.bin"),
                "upload active": (["-P", "127.0.0.1", "-T", str(source)], "up.bin"),
            }
            results = {}
            print(f"{'case':<18} {'direct MB/s':>12} {'gateway MB/s':>13} {'ratio':>7}")
            for name, (extra, path) in cases.items():
                measured = {}
                for label, port in (("direct", server.port), ("gateway", gateway.port)):
                    url = f"ftp://{server.user}:{server.password}@127.0.0.1:{port}/{path}"
                    measured[label] = statistics.median(
                        speed(url, *extra) for _ in range(args.repeat)
                    )
                ratio = measured["gateway"] / measured["direct"]
                results[name] = {**measured, "ratio": ratio}
                direct, through = measured["direct"], measured["gateway"]
                print(f"{name:<18} {direct:>12.1f} {through:>13.1f} {ratio:>7.2f}")
            rates = {
                label: statistics.median(
                    session_rate(port, server.user, server.password, args.sessions)
                    for _ in range(args.repeat)
                )
                for label, port in (("direct", server.port), ("gateway", gateway.port))
            }
            rates["ratio"] = rates["gateway"] / rates["direct"]
            results["sessions per second"] = rates
            print(f"{'case':<18} {'direct /s':>12} {'gateway /s':>13} {'ratio':>7}")
            print(
                f"{'short sessions':<18} {rates['direct']:>12.1f} {rates['gateway']:>13.1f}"
                f" {rates['ratio']:>7.2f}"
            )
            status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
            peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
            print(f"gateway peak RSS: {int(peak) // 1024} MiB ({args.size_mib} MiB file)")
            results["gateway_peak_rss_kib"] = int(peak)
            (ROOT / "benchmarks" / "results-latest.json").write_text(json.dumps(results, indent=2))
        finally:
            gateway.stop()
            server.stop()


if __name__ == "__main__":
    main()
