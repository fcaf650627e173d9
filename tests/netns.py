"""Network namespaces for tests that need more than loopback: hosts on 198.18.0.0/15 joined by
veth pairs, created by the test and deleted after it (root and iproute2 needed).

Code runs "on" a namespace through `Namespace.call`: each namespace has one long-lived worker
thread that entered it with setns(2), and everything that thread does (sockets it opens,
processes it starts) lives in that namespace. Long-lived matters: tests/servers.py has the kernel
end a server when the thread that started it exits.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000  # <sched.h>
TIMEOUT = 60.0


def _run(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")


class Namespace:
    """A network namespace with its loopback up, and a thread to run code in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        _run(["ip", "netns", "add", name])
        self._worker = ThreadPoolExecutor(
            max_workers=1, initializer=self._enter, thread_name_prefix=name
        )
        self.ip("link", "set", "lo", "up")

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
        finally:
            os.close(fd)

    def call(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run `function` in this namespace and return its result (or raise its exception)."""
        return self._worker.submit(function, *args, **kwargs).result(timeout=TIMEOUT)

    def ip(self, *args: str) -> None:
        _run(["ip", "-n", self.name, *args])

    def nft(self, ruleset: str) -> None:
        _run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], stdin=ruleset)

    def delete(self) -> None:
        self._worker.shutdown(wait=True)
        _run(["ip", "netns", "delete", self.name])


def link(
    a: Namespace, a_end: str, a_address: str, b: Namespace, b_end: str, b_address: str
) -> None:
    """A veth pair between `a` (interface `a_end`) and `b` (`b_end`), with addresses in CIDR."""
    veth = ["type", "veth", "peer", b_end, "netns", b.name]
    _run(["ip", "link", "add", a_end, "netns", a.name, *veth])
    for namespace, end, address in ((a, a_end, a_address), (b, b_end, b_address)):
        namespace.ip("addr", "add", address, "dev", end)
        namespace.ip("link", "set", end, "up")
