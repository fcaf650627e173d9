"""What each client verb does: the one table the session dispatches with. Pure, no I/O.

`Session._command` applies the rules that hold for every verb (TLS required, forward mode's
login, the command policy, a connected upstream) and then looks the verb up here. `ALWAYS` holds
the verbs served in any phase, before the command policy; `CONNECTED` those the gateway serves
itself once an upstream is connected. Any other verb is passed through to the upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway import features
from gateway.codec import Command, Reply
from gateway.datachannel import DataChannel
from gateway.effects import Effect, StartClientTLS
from gateway.ftps import ClientFTPS
from gateway.transfer import SOURCES, TransferDriver
from gateway.upstream import Upstream
from gateway.view import Phase, SessionView


class Session(SessionView, Protocol):
    """What the verbs use of `gateway.session.Session`: its machines and a few of its own
    methods."""

    client_ftps: ClientFTPS
    upstream: Upstream
    data_channel: DataChannel
    transfers: TransferDriver

    def enter(self, phase: Phase) -> None: ...

    def pass_through(self, command: Command) -> list[Effect]: ...

    def refused_by_policy(self, command: Command) -> list[Effect] | None: ...


Verb = Callable[[Session, Command], list[Effect]]


def pass_through(session: Session, command: Command) -> list[Effect]:
    return session.pass_through(command)


def quit_(session: Session, command: Command) -> list[Effect]:
    if session.upstream_peer is None:
        return session.close(Reply.of(221, "Goodbye."))
    session.enter(Phase.CLOSING)
    return session.send(Command("QUIT", ""), lambda r: session.close(Reply.of(221, "Goodbye.")))


def feat(session: Session, command: Command) -> list[Effect]:
    """FEAT (RFC 2389): the gateway's own list before an upstream is chosen, else the
    upstream's, edited (`gateway.features`)."""
    tls = session.config.client_tls_available
    if session.upstream_peer is None:
        return session.answer(features.for_client(None, tls))
    refused = session.refused_by_policy(command)
    if refused is not None:
        return refused
    return session.send(command, lambda r: session.answer(features.for_client(r, tls)))


def auth(session: Session, command: Command) -> list[Effect]:
    """AUTH TLS: the handshake starts after the 234; with `tls.upstream = match_client` the
    upstream follows the client into TLS before the next command is served."""
    reply = session.client_ftps.auth(command)
    if reply.code != 234:
        return session.answer(reply)
    return session.answer(reply, StartClientTLS(), *session.upstream.follow_client())


def transfer(session: Session, command: Command) -> list[Effect]:
    """RETR, STOR, LIST, ...: the transfer driver takes the client's data channel."""
    refusal = session.transfers.refusal(session.data_channel.pending)
    if refusal is not None:
        return session.answer(refusal)
    client = session.data_channel.take()
    assert client is not None
    session.enter(Phase.TRANSFER)
    session.transfers.upstream_protected = session.upstream.ftps.protected
    return session.transfers.begin(command, client)


def _port(session: Session, command: Command) -> list[Effect]:
    return session.data_channel.port(command, session.client_ftps.protected)


def _passive(session: Session, command: Command) -> list[Effect]:
    return session.data_channel.passive(command, session.client_ftps.protected)


def _refuse_long(session: Session, command: Command) -> list[Effect]:
    # RFC 1639's long addresses: EPRT and EPSV (RFC 2428) say the same for IPv4 and IPv6.
    return session.answer(Reply.of(502, "Command not implemented; use EPRT or EPSV."))


#: Verbs served in any phase, before the command policy.
ALWAYS: dict[str, Verb] = {
    "QUIT": quit_,
    "AUTH": auth,
    "PBSZ": lambda session, c: session.answer(session.client_ftps.pbsz(c)),
    "PROT": lambda session, c: session.answer(session.client_ftps.prot(c)),
    "CCC": lambda session, c: session.answer(session.client_ftps.ccc(c)),
    "FEAT": feat,
}

#: Verbs the gateway serves itself once an upstream is connected.
CONNECTED: dict[str, Verb] = {
    "PORT": _port,
    "EPRT": _port,
    "PASV": _passive,
    "EPSV": _passive,
    "LPRT": _refuse_long,
    "LPSV": _refuse_long,
    "REST": lambda session, c: session.answer(session.transfers.rest(c)),
    **{verb: transfer for verb in SOURCES},
}
