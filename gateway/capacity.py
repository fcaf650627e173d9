"""Start-up capacity: listen backlogs that hold a burst of clients, and enough file descriptors.

Pure functions of their inputs (the start-up code reads /proc and the resource limits and
passes them in), so each rule is tested without a socket.

Listen backlog: Twisted listens with a backlog of 50. When hundreds of clients connect at
once (a batch job, a NAT in front of a whole office), the kernel's accept queue overflows and
the rest wait for TCP to retransmit their SYN, one, three, seven seconds later: a burst of
1,000 logins then takes many seconds instead of half of one. The gateway therefore asks for
`DEFAULT_BACKLOG` on every TCP listener whose endpoint string does not name a backlog; the
kernel caps it at net.core.somaxconn anyway, and the figure asked for is capped the same way so
the log says what the kernel grants.
"""

from __future__ import annotations

#: Backlog asked for on listeners whose endpoint does not set `backlog=`.
DEFAULT_BACKLOG = 1024

#: Endpoint types that take a `backlog=` argument (twisted.internet.endpoints).
_BACKLOG_ENDPOINTS = ("tcp", "tcp6", "ssl")

#: Descriptors one session may hold at once: client and upstream control connections, client
#: and upstream data connections.
FDS_PER_SESSION = 4

#: Descriptors the process needs besides sessions: listeners, log files, passive listeners
#: between PASV and the data connection, the resolver's threads, standard streams.
FDS_RESERVED = 64


def backlog_for(somaxconn: int | None) -> int:
    """The default backlog, capped by the system's somaxconn when it is known."""
    if somaxconn is None or somaxconn <= 0:
        return DEFAULT_BACKLOG
    return min(DEFAULT_BACKLOG, somaxconn)


def with_backlog(endpoint: str, backlog: int) -> str:
    """`endpoint` with `backlog=` added when it is a TCP-based endpoint that sets none."""
    kind, _, rest = endpoint.partition(":")
    if kind.strip().lower() == "haproxy":  # the gateway's PROXY-protocol wrapper of a TCP endpoint
        return f"{kind}:{with_backlog(rest, backlog)}" if rest else endpoint
    kind = kind.strip().lower()
    if kind not in _BACKLOG_ENDPOINTS or ":" not in endpoint:
        return endpoint
    arguments = endpoint.split(":")[1:]
    if any(argument.strip().lower().startswith("backlog=") for argument in arguments):
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def open_files_target(soft: int, hard: int, wanted: int) -> int:
    """The soft RLIMIT_NOFILE to set: `wanted`, or the hard limit when `wanted` is 0, never
    above the hard limit. With an unlimited hard limit (-1) and nothing wanted, `soft` stays:
    the kernel refuses an unlimited soft limit for descriptors."""
    if wanted <= 0:
        return soft if hard < 0 else hard
    return wanted if hard < 0 else min(wanted, hard)


def sessions_supported(open_files: int) -> int:
    """How many sessions `open_files` descriptors hold at FDS_PER_SESSION each."""
    if open_files < 0:
        return 1 << 30
    return max(0, (open_files - FDS_RESERVED) // FDS_PER_SESSION)
