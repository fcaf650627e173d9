"""The relay alone, without FTP: how close the gateway's relays come to the fastest relay a
user-space process can be on this machine, and what one more hop costs. Part 6 of
benchmarks/run.py; `python benchmarks/relays.py` runs it alone.

A source process sends a file with sendfile(2) to whoever connects; a sink (this process)
connects, reads into one buffer until the end and times it. In between, in turns:

- direct: no relay, the sink reads from the source;
- minimal: the fastest relay there is without threads or kernel help (`_minimal`): one
  process, blocking sockets, splice(2) from the source into a 1 MiB pipe and from the pipe into
  the sink, nothing else. It is the ceiling for any relay in user space: every byte still
  crosses the TCP stack twice more than direct;
- splice and copy: the gateway's own relays (`gateway.splice.relay`, with `data.relay` =
  "splice" or "copy"), driven by Twisted's reactor exactly as in a session, between
  the same two sockets.

The ratios that matter are splice/minimal (the relay's own overhead) and minimal/direct (the
price of the extra hop, which no relay avoids).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_process import free_port, wait_for_port  # noqa: E402

MIB = 1 << 20
PIPE = MIB
RELAYS = ("minimal", "splice", "copy")


# ------------------------------------------------------------------------ the processes


def _source(port: int, path: str) -> None:
    """Send the file at `path` to every connection, with sendfile(2), then close."""
    listener = socket.create_server(("127.0.0.1", port))
    size = os.path.getsize(path)
    while True:
        conn, _ = listener.accept()
        with conn, open(path, "rb") as f, contextlib.suppress(OSError):  # a probe hangs up
            offset = 0
            while offset < size:
                offset += os.sendfile(conn.fileno(), f.fileno(), offset, size - offset)


def _minimal(port: int, upstream: int) -> None:
    """For each connection: connect to the source and splice everything across, blocking."""
    import fcntl

    listener = socket.create_server(("127.0.0.1", port))
    while True:
        sink, _ = listener.accept()
        source = socket.create_connection(("127.0.0.1", upstream))
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE)
        try:
            while n := os.splice(source.fileno(), write_end, PIPE):
                while n:
                    n -= os.splice(read_end, sink.fileno(), n)
            sink.shutdown(socket.SHUT_WR)
            sink.recv(1)  # the sink's close
        except OSError:
            pass  # a probe that hung up
        finally:
            for fd in (read_end, write_end):
                os.close(fd)
            source.close()
            sink.close()


def _gateway(port: int, upstream: int, mode: str) -> None:
    """For each connection: connect to the source and relay with the gateway's own relay."""
    sys.path.insert(0, str(ROOT))
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import endpoints, protocol, reactor
    from twisted.internet.defer import gatherResults

    from gateway.data import DataConnection
    from gateway.splice import relay

    class Relays(protocol.Factory):
        def buildProtocol(self, addr: Any) -> DataConnection:
            sink, source = DataConnection(accepted=True), DataConnection()

            def both_ready(_: object) -> None:
                relay(source, sink, reactor, 60.0, mode=mode).addErrback(lambda _: None)

            ready = gatherResults([source.ready, sink.ready]).addCallback(both_ready)
            ready.addErrback(lambda _: None)
            upstream_end = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", upstream)
            connecting = upstream_end.connect(protocol.Factory.forProtocol(lambda: source))
            connecting.addErrback(lambda _: None)
            return sink

    reactor.listenTCP(port, Relays(), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- the run


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], env=dict(os.environ))


def _sink(port: int, expected: int) -> float:
    """MB/s (10^6 bytes) of one transfer read from `port` to its end."""
    buffer = bytearray(MIB)
    total = 0
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while n := conn.recv_into(buffer):
            total += n
    elapsed = time.perf_counter() - started
    if total != expected:
        raise RuntimeError(f"relay on port {port} delivered {total} of {expected} bytes")
    return total / elapsed / 1e6


def relay_ceiling(
    work: Path, size_mib: int, repeat: int, out: Callable[[str], None]
) -> dict[str, Any]:
    path = work / "relay-source.bin"
    with path.open("wb") as f:
        block = os.urandom(MIB)
        for _ in range(size_mib):
            f.write(block)
    size = size_mib * MIB
    source_port = free_port()
    ports = {"direct": source_port}
    processes = [_spawn("source", str(source_port), str(path))]
    try:
        wait_for_port("127.0.0.1", source_port, proc=processes[0])
        for relay in RELAYS:
            port = free_port()
            args = ("minimal", str(port), str(source_port))
            if relay != "minimal":
                args = ("gateway", str(port), str(source_port), relay)
            processes.append(_spawn(*args))
            wait_for_port("127.0.0.1", port, proc=processes[-1])
            ports[relay] = port
        samples: dict[str, list[float]] = {name: [] for name in ports}
        for round_ in range(repeat):
            order = list(ports) if round_ % 2 == 0 else list(reversed(ports))
            for name in order:
                samples[name].append(_sink(ports[name], size))
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
    stats = {name: statistics.median(values) for name, values in samples.items()}
    direct, minimal = stats["direct"], stats["minimal"]
    out(f"\n6. The relay alone, {size_mib} MiB, sendfile source to a reading sink, MB/s")
    out("| path | median (min-max) | ratio to direct | ratio to minimal |")
    out("| --- | --- | --- | --- |")
    results: dict[str, Any] = {"size_mib": size_mib, "repeat": repeat}
    for name, values in samples.items():
        results[name] = {
            "median": stats[name],
            "min": min(values),
            "max": max(values),
            "ratio_direct": stats[name] / direct,
            "ratio_minimal": stats[name] / minimal,
        }
        to_minimal = "" if name == "direct" else f"{stats[name] / minimal:.2f}"
        out(
            f"| {name} | {stats[name]:.0f} ({min(values):.0f}-{max(values):.0f}) "
            f"| {stats[name] / direct:.2f} | {to_minimal} |"
        )
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("source", "minimal", "gateway"):
        role, port, *rest = sys.argv[1:]
        if role == "source":
            _source(int(port), rest[0])
        elif role == "minimal":
            _minimal(int(port), int(rest[0]))
        else:
            _gateway(int(port), int(rest[0]), rest[1])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ftp-gateway-relays-") as tmp:
        relay_ceiling(Path(tmp), args.size_mib, args.repeat, print)


if __name__ == "__main__":
    main()
