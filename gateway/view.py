"""The session's phase, and the narrow view of the session its parts work through: pure.

`gateway.session.Session` is a thin front; each concern (login, FTPS, data-channel commands,
transfers) is a small machine in its own module. Those machines never see the whole session:
they send upstream through `SessionView.send`, give the client's command its one final reply
through `SessionView.answer`, and end the session through `SessionView.close`. Keeping the view
this small is what lets each machine be read, changed and tested alone.
"""

from __future__ import annotations

import enum
from typing import Protocol

from gateway.addresses import HostPort
from gateway.codec import Command, Reply
from gateway.config import Config
from gateway.effects import Effect
from gateway.pairing import Handler, ignore
from gateway.policy import UpstreamPolicy


class Phase(enum.Enum):
    """Where a session is in its life. Commands from the client are served only in the
    phases that accept them (`ACCEPTS_COMMANDS`); in the others they wait in the queue."""

    GREETING = "greeting"
    """The upstream control connection is being opened; its greeting is due."""
    LOGIN = "login"
    """Nobody is logged in upstream yet (forward mode: no upstream chosen yet)."""
    PROXY_LOGIN = "proxy login"
    """Forward mode with proxy authentication: the gateway's own credentials are due."""
    UPSTREAM_TLS = "upstream TLS negotiation"
    """AUTH TLS, the handshake, PBSZ and PROT on the upstream control connection."""
    READY = "ready"
    """Logged in upstream; no transfer in progress."""
    TRANSFER = "transfer"
    """A data transfer is in progress (only ABOR acts before it ends)."""
    CLOSING = "closing"
    """QUIT went upstream; its reply ends the session."""
    CLOSED = "closed"
    """Both control connections are closed or closing; nothing more happens."""


#: Phases in which the next queued client command may be served.
ACCEPTS_COMMANDS = frozenset({Phase.LOGIN, Phase.PROXY_LOGIN, Phase.READY, Phase.TRANSFER})


class SessionView(Protocol):
    """What a session's parts may use of it."""

    @property
    def config(self) -> Config: ...

    @property
    def policy(self) -> UpstreamPolicy: ...

    @property
    def upstream_peer(self) -> HostPort | None: ...

    @property
    def user(self) -> str | None:
        """The user name last sent upstream, for the logs."""
        ...

    @property
    def proxy_user(self) -> str | None:
        """The user the gateway itself authenticated (proxy login), for the logs."""
        ...

    @property
    def transfer_type(self) -> str:
        """The representation type in force ("a" or "b"), for the logs."""
        ...

    def send(
        self,
        command: Command,
        on_final: Handler,
        *,
        on_preliminary: Handler = ignore,
        owner: object | None = None,
    ) -> list[Effect]:
        """Send `command` upstream; its replies go to the handlers (`gateway.pairing`)."""
        ...

    def drop(self, owner: object) -> None:
        """The work `owner` stands for is abandoned: replies still owed to the commands sent
        for it reach nobody (`Pairing.drop`)."""
        ...

    def abort_upstream(self, owner: object) -> list[Effect]:
        """Abandon the work `owner` stands for and send ABOR upstream (`Pairing.abort`)."""
        ...

    def answer(self, reply: Reply, *then: Effect) -> list[Effect]:
        """Give the client command in progress its final `reply`, carry out `then`, and serve
        the next queued command."""
        ...

    def close(self, last: Reply | None) -> list[Effect]:
        """End the session, telling the client `last` first."""
        ...
