"""What each client verb does: the one table the session dispatches with. Pure, no I/O.

`serve` applies the rules that hold for every verb (TLS required, the login machine's verbs,
the command policy, a connected upstream) and then looks the verb up here. `ALWAYS` holds
the verbs served in any phase, before the command policy; `CONNECTED` those the gateway serves
itself once an upstream is connected. Any other verb is passed through to the upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway import features
from gateway.codec import Command, Reply
from gateway.datachannel import DataChannel
from gateway.effects import Effect, Log, StartClientTLS
from gateway.events import Event
from gateway.ftps import ClientFTPS
from gateway.login import Login
from gateway.policy import CommandPolicy
from gateway.routelogin import RouteLogin
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
    login: Login | RouteLogin
    commands: CommandPolicy

    @property
    def own_login(self) -> bool: ...

    def enter(self, phase: Phase) -> None: ...

    def pass_through(self, command: Command) -> list[Effect]: ...


Verb = Callable[[Session, Command], list[Effect]]

#: Commands answered before an upstream is chosen in forward mode.
_PRE_LOGIN_COMMANDS = ("NOOP", "SYST", "HELP")


def serve(session: Session, command: Command) -> list[Effect]:
    """Serve the client's `command`: the rules that hold for every verb, in order, then the
    verb's entry in the tables below."""
    verb = command.verb
    refusal = session.client_ftps.refuses(verb) if verb != "QUIT" else None
    if refusal is not None:
        return session.answer(refusal)
    if verb in ALWAYS:
        return ALWAYS[verb](session, command)
    login_verb = session.login.handler(command) if session.own_login else None
    if login_verb is not None:
        return login_verb(command)
    refused = refused_by_policy(session, command)
    if refused is not None:
        return refused
    if session.upstream_peer is None:
        return _before_upstream(session, command)
    return CONNECTED.get(verb, pass_through)(session, command)


def _before_upstream(session: Session, command: Command) -> list[Effect]:
    """Forward mode before `USER name@host`: a few verbs are answered, the rest need a login."""
    verb = command.verb
    if verb in _PRE_LOGIN_COMMANDS:
        text = "OK." if verb == "NOOP" else f"{verb} is available after USER name@host[:port]."
        return session.answer(Reply.of(200 if verb == "NOOP" else 502, text))
    return session.answer(Reply.of(530, "Please log in with USER name@host[:port] first."))


def refused_by_policy(session: Session, command: Command) -> list[Effect] | None:
    """The command policy's refusal of `command` (`commands.deny`, `commands.read_only`),
    answered and logged; None: allowed."""
    refusal = session.commands.check(command.verb, command.arg)
    if refusal is None:
        return None
    code, text = refusal
    log = Log(
        "info",
        "Refused {verb} by command policy",
        {"verb": command.verb, "event": Event.REFUSED, "refused": "command"},
    )
    return [log, *session.answer(Reply.of(code, text))]


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
    refused = refused_by_policy(session, command)
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
