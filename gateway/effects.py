"""What the pure session asks its shell to do, and the names of the two sides.

Every effect is a frozen value. The Twisted shell (`gateway.control`) carries them out in order
and reports what happened back to the session as method calls.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.addresses import HostPort
from gateway.codec import Command, Reply

#: How much a log event matters; the names of `twisted.logger.Logger`'s methods.
LogLevel = Literal["debug", "info", "warn", "error"]


class Side(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"


@dataclass(frozen=True, slots=True)
class ToClient:
    reply: Reply


@dataclass(frozen=True, slots=True)
class ToUpstream:
    command: Command


@dataclass(frozen=True, slots=True)
class ResolveUpstream:
    """Forward mode: look up `host`; answer with `Session.upstream_resolved`."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Open the upstream control connection; answer with `upstream_connected` or
    `upstream_connect_failed`. `host` is an IP address already checked by policy (forward mode)
    or the configured upstream name (reverse mode)."""

    host: str
    port: int
    implicit_tls: bool = False
    tls_name: str = ""  # the name an implicit-TLS upstream's certificate must carry


@dataclass(frozen=True, slots=True)
class ConnectBackend:
    """Reverse mode: connect to a backend the pool chooses (`gateway.balancer`), among `names`
    (a route's backends; None: any), by `user` for `user_hash`. Answer with `backend_connected`,
    `upstream_connected` and the backend's 220, or with `upstream_connect_failed` once no
    backend is left."""

    user: str | None = None
    names: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class RetryBackend:
    """Reverse mode: the backend just connected cannot serve the session (its TLS failed)
    while the client has seen nothing yet. Drop it, mark it failed, and connect the next one
    the pool chooses among those not tried, answered as `ConnectBackend` is."""

    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check proxy credentials (forward mode); answer with `proxy_auth_result`. The password
    is never logged."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartClientTLS:
    """Switch the client control connection to TLS, as server, after the queued 234."""


@dataclass(frozen=True, slots=True)
class StartUpstreamTLS:
    """Switch the upstream control connection to TLS, as client, verifying the upstream's
    certificate for `name`; answer with `upstream_tls_ready` or `upstream_tls_failed`."""

    name: str


@dataclass(frozen=True, slots=True)
class ListenData:
    """Open a one-shot passive listener for `side` on the local address of that side's control
    connection; answer with `data_listening`, then `data_connected` or `data_failed`. With
    `tls`, the connection is protected (RFC 4217 PROT P) before it counts as connected."""

    side: Side
    tls: bool = False


@dataclass(frozen=True, slots=True)
class ConnectData:
    """Connect a data channel for `side` to `target`; answer with `data_connected` or
    `data_failed`."""

    side: Side
    target: HostPort
    tls: bool = False


@dataclass(frozen=True, slots=True)
class StartRelay:
    """Both data connections are up: move bytes from `source` to the other side until EOF;
    answer with `relay_finished`."""

    source: Side


@dataclass(frozen=True, slots=True)
class CloseData:
    """Close every data listener and connection of the session, aborting any relay."""


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close the client control connection once queued replies are written."""


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close the upstream control connection once queued commands are written."""


@dataclass(frozen=True, slots=True)
class Log:
    """A log event from the core; `fields` are named values for `twisted.logger`."""

    level: LogLevel
    format: str
    fields: dict[str, Any] = field(default_factory=dict)


Effect = (
    ToClient
    | ToUpstream
    | ResolveUpstream
    | ConnectUpstream
    | ConnectBackend
    | RetryBackend
    | Authenticate
    | StartClientTLS
    | StartUpstreamTLS
    | ListenData
    | ConnectData
    | StartRelay
    | CloseData
    | CloseClient
    | CloseUpstream
    | Log
)
