"""Data transfers: one transfer's state, the rules that decide its outcome, and the driver that
takes it from the data command to the one final reply the client gets. Pure, no I/O.

The rules that make a transfer honest live here, where they can be read (and tested) alone:
which upstream data mode to use (`upstream_mode`), and which final reply the client may see,
and when (`final_reply`). `TransferDriver` runs one transfer at a time:

    SETUP     ask the upstream for its data side (EPSV, PASV, or PORT/EPRT to a listener)
    SENT      the transfer command went upstream (after REST, if the client sent one)
    RELAYING  both data connections are up; bytes move from `source` to the other side
              (in upstream active mode this can come before the command is sent)
    RELAYED   the relay ended (`relay_result` says how)
    FAILED    a data connection failed before the relay started

The upstream's final reply may arrive in any of the last four phases; the client sees
`final_reply` once it is decided.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from gateway.addresses import (
    HostPort,
    format_eprt_argument,
    format_port_argument,
    parse_epsv_reply,
    parse_pasv_reply,
)
from gateway.codec import Command, Reply
from gateway.effects import (
    CloseData,
    ConnectData,
    Effect,
    ListenData,
    Log,
    Side,
    StartRelay,
    ToClient,
)
from gateway.events import Event
from gateway.numbers import is_ascii_number
from gateway.view import SessionView

#: Commands that move data, and which side the bytes come from.
SOURCES = {
    "RETR": Side.UPSTREAM,
    "LIST": Side.UPSTREAM,
    "NLST": Side.UPSTREAM,
    "MLSD": Side.UPSTREAM,
    "STOR": Side.CLIENT,
    "STOU": Side.CLIENT,
    "APPE": Side.CLIENT,
}

#: How a client asks for its next data connection: active (PORT, EPRT) or passive.
ClientDataVerb = Literal["PORT", "EPRT", "PASV", "EPSV"]
#: The representation type (RFC 959 section 3.1.1): "a" ASCII text, "b" bytes as they are.
TransferType = Literal["a", "b"]
#: How the gateway opens one transfer's upstream data connection.
UpstreamMode = Literal["active", "pasv", "epsv"]


@dataclass(slots=True)
class ClientData:
    """How the client asked to receive the next data connection."""

    verb: ClientDataVerb
    tls: bool  # PROT P was in force when the client chose the mode
    target: HostPort | None = None  # active modes: where to connect
    connected: bool = False  # passive modes: the client already connected
    failure: str | None = None
    advertised: bool = False  # passive modes: the 227/229 reply went out


class TransferPhase(enum.Enum):
    """See the module docstring."""

    SETUP = "setup"
    SENT = "sent"
    RELAYING = "relaying"
    RELAYED = "relayed"
    FAILED = "failed"


@dataclass(slots=True, eq=False)
class Transfer:
    """One data-moving command, from the upstream data setup to the final reply."""

    command: Command
    source: Side
    client: ClientData
    restart: str | None
    mode: UpstreamMode = "epsv"
    phase: TransferPhase = TransferPhase.SETUP
    #: Data connections ready for the relay (after their TLS handshake, if protected).
    connected: set[Side] = field(default_factory=set)
    #: The upstream's data connection exists (TCP up; TLS, if any, may still be negotiating).
    upstream_opened: bool = False
    #: The upstream's 1xx, once passed on to the client.
    preliminary: Reply | None = None
    upstream_final: Reply | None = None
    relay_result: tuple[bool, str] | None = None

    @property
    def command_due(self) -> bool:
        """Whether the transfer command goes out once the upstream data connection is up. In
        upstream active mode it waits for the PORT reply instead: some servers (pyftpdlib)
        connect as soon as they accept PORT, before answering it."""
        return self.phase is TransferPhase.SETUP and self.mode != "active"

    @property
    def data_under_way(self) -> bool:
        """The data side is moving or opening after the upstream's 1xx: bounded by
        `timeouts.data_connect` and `timeouts.stall` until the relay's outcome is known."""
        return self.phase is TransferPhase.RELAYING or (
            self.relay_result is None and self.preliminary is not None
        )


def upstream_mode(
    setting: str, client_verb: str, epsv_refused: bool, upstream_family: int
) -> UpstreamMode:
    """The upstream data mode for one transfer: "active", "pasv" or "epsv".

    `setting` is `config.data.upstream_mode`; "passive" means EPSV until the upstream refused
    it once in this session, then PASV; "client" mirrors the client's own choice.
    """
    if setting == "client":
        mode: UpstreamMode = "active" if client_verb in ("PORT", "EPRT") else "pasv"
        if client_verb == "EPSV":
            mode = "epsv"
    elif setting == "passive":
        mode = "pasv" if epsv_refused else "epsv"
    else:
        mode = "active" if setting == "active" else "pasv" if setting == "pasv" else "epsv"
    if mode == "pasv" and upstream_family == 6:
        mode = "epsv"  # RFC 2428: PASV cannot carry an IPv6 address
    return mode


def setup_failure(transfer: Transfer) -> Reply:
    """425: the data connection could not be set up (RFC 959 section 4.2)."""
    detail = transfer.relay_result[1] if transfer.relay_result else "unknown error"
    return Reply.of(425, f"Cannot open data connection: {detail}.")


def no_data_connection(transfer: Transfer) -> Reply:
    """451: the upstream reported success for a transfer it never opened a data connection
    for (RFC 959 section 4.2: 451, local error in processing)."""
    verb = transfer.command.verb
    return Reply.of(
        451,
        f"{verb} failed: the upstream server reported success without ever opening "
        "a data connection; nothing was transferred.",
    )


def final_reply(transfer: Transfer) -> Reply | None:
    """The one final reply the client may see now, or None while the transfer must wait.

    The upstream's final reply passes only once the relay has delivered every byte; a relay
    that failed turns it into 425 (never connected) or 426 (cut off), so a transfer that did
    not complete never reaches the client as 226. A positive reply for a transfer whose
    upstream data connection never existed (no 1xx, no connection opened or accepted) is a
    transfer that never happened: 451. A server that answers an empty transfer with 226 and
    no 1xx after its data connection opened and closed is honest; that case waits for the
    relay like any other.
    """
    final = transfer.upstream_final
    result = transfer.relay_result
    if final is None:
        return None  # the upstream has not answered yet; it will, once its data side ends
    if result is None:
        if not final.positive:
            return final
        if (
            transfer.phase is TransferPhase.RELAYING
            or transfer.preliminary is not None
            or transfer.upstream_opened
        ):
            # The upstream's 226 can overtake the bytes still being relayed, or the client's
            # data connection may still be opening: hold it until the relay's outcome.
            return None
        return no_data_connection(transfer)
    ok, detail = result
    if ok:
        return final
    if transfer.phase is TransferPhase.FAILED:
        return setup_failure(transfer)
    return Reply.of(426, f"Transfer failed: {detail}.")


@dataclass(frozen=True, slots=True)
class ReceiverClose:
    """How the receiving end of a protected download closed its data connection without TLS
    close_notify, as the gateway's socket saw it at that moment."""

    orderly: bool
    """The peer ended TCP with FIN; a reset or an error is not orderly."""
    close_notify_sent: bool
    """The gateway had sent its own close_notify, so nothing was left to send after it."""
    unacknowledged: int | None
    """Bytes the gateway had written that the peer had not acknowledged (None: unknown)."""


def download_delivered(close: ReceiverClose) -> bool:
    """Whether a download whose receiving client skipped close_notify still reached it whole.

    RFC 5246 section 7.2.1 (and RFC 8446 section 6.1) let a party close without waiting for
    the peer's close_notify; what truncation protection needs is that the *sender* signals
    the end, and here the sender is the gateway. Real clients (wget, whose GnuTLS bye is
    disabled, and netkit ftp-ssl) read the gateway's close_notify and close TCP without
    answering it. When the peer acknowledged every byte, including that close_notify, and
    then closed with FIN, it has the whole file: a client that closes with unread data gets
    its kernel to send a reset instead, which stays a failure. Uploads never use this rule:
    there the client is the sender, and its missing close_notify may mean truncation.
    """
    return close.orderly and close.close_notify_sent and close.unacknowledged == 0


class TransferDriver:
    """Runs the session's one transfer at a time (see the module docstring)."""

    def __init__(self, view: SessionView) -> None:
        self._view = view
        self.current: Transfer | None = None
        #: The upstream refused EPSV once (RFC 2428 section 3): later transfers use PASV.
        self._epsv_refused = False
        #: PROT P is in force upstream, so upstream data connections are protected.
        self.upstream_protected = False
        #: REST's offset, held until the transfer command it belongs to.
        self._restart: str | None = None

    # ----------------------------------------------------------------------- the start

    def rest(self, command: Command) -> Reply:
        """REST is held until the transfer command, so nothing (EPSV, PASV) comes between the
        two on the upstream side: RFC 959 section 4.1.3 says REST is followed by the transfer
        command."""
        if not is_ascii_number(command.arg.strip()):
            return Reply.of(501, "REST needs a byte offset in ASCII digits.")
        self._restart = command.arg.strip()
        return Reply.of(350, f"Restarting at {self._restart}. Send STOR or RETR.")

    def refusal(self, client: ClientData | None) -> Reply | None:
        """Why a transfer cannot start with the client's data channel `client`, or None."""
        if client is None:
            return Reply.of(425, "Use PORT, EPRT, PASV or EPSV first.")
        if self._view.config.tls.client == "required" and not client.tls:
            # RFC 4217 section 9: 521 when policy refuses the data protection level.
            return Reply.of(521, "Data connections must be protected: send PROT P first.")
        return None

    def begin(self, command: Command, client: ClientData) -> list[Effect]:
        """Start `command` (RETR, STOR, LIST, ...) with the client's data channel `client`."""
        if client.failure is not None:
            text = f"Cannot open data connection: {client.failure}."
            return [CloseData(), *self._view.answer(Reply.of(425, text))]
        restart, self._restart = self._restart, None
        upstream = self._view.upstream_peer
        assert upstream is not None
        mode = upstream_mode(
            self._view.config.data.upstream_mode, client.verb, self._epsv_refused, upstream.family
        )
        transfer = Transfer(command, SOURCES[command.verb], client, restart=restart, mode=mode)
        if client.connected:
            transfer.connected.add(Side.CLIENT)
        self.current = transfer
        if mode == "active":
            return [ListenData(Side.UPSTREAM, tls=self.upstream_protected)]
        return self._ask_passive(transfer, Command("EPSV" if mode == "epsv" else "PASV", ""))

    def _ask_passive(self, transfer: Transfer, command: Command) -> list[Effect]:
        on_final = self._on_epsv if command.verb == "EPSV" else self._on_pasv
        return self._view.send(command, lambda r: on_final(transfer, r), owner=transfer)

    def _on_epsv(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        upstream = self._view.upstream_peer
        assert upstream is not None
        if answer.code == 229:
            target = HostPort.of(upstream.host, parse_epsv_reply(answer.text))
            return [ConnectData(Side.UPSTREAM, target, tls=self.upstream_protected)]
        if self._view.config.data.upstream_mode == "passive" and answer.permanent:
            # RFC 2428 section 3: a server without EPSV answers 500/502; fall back to PASV and
            # remember, so later transfers in this session go straight to PASV.
            self._epsv_refused = True
            if upstream.family == 4:
                transfer.mode = "pasv"
                return self._ask_passive(transfer, Command("PASV", ""))
        return self._end(transfer, Reply.of(425, f"Upstream refused EPSV: {answer.text}"))

    def _on_pasv(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        upstream = self._view.upstream_peer
        assert upstream is not None
        if answer.code != 227:
            return self._end(transfer, Reply.of(425, f"Upstream refused PASV: {answer.text}"))
        named = parse_pasv_reply(answer.text)
        target = HostPort.of(upstream.host, named.port)
        effects: list[Effect] = []
        if named.host != upstream.host:
            config = self._view.config
            if (
                config.data.follow_pasv_address
                and self._view.policy.check(named.host, named.port).allowed
            ):
                target = named
            else:
                fields = {"peer": str(upstream), "named": str(named), "target": str(target)}
                text = (
                    "Upstream {peer} named {named} in its 227 reply; connecting to "
                    "{target} instead (possible reverse bounce)"
                )
                effects.append(Log("warn", text, fields))
        return [*effects, ConnectData(Side.UPSTREAM, target, tls=self.upstream_protected)]

    def upstream_listening(self, address: HostPort) -> list[Effect]:
        """Upstream active mode: the gateway's listener is at `address`; tell the upstream."""
        transfer = self.current
        if transfer is None:
            return []
        if address.family == 4 and not (
            self._view.config.data.upstream_mode == "client" and transfer.client.verb == "EPRT"
        ):
            command = Command("PORT", format_port_argument(address))
        else:
            command = Command("EPRT", format_eprt_argument(address))
        return self._view.send(command, lambda r: self._on_port(transfer, r), owner=transfer)

    def _on_port(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if not answer.positive:
            return self._end(transfer, Reply.of(425, f"Upstream refused PORT: {answer.text}"))
        return self._send_command(transfer)

    # ------------------------------------------------------- the transfer command itself

    def _send_command(self, transfer: Transfer) -> list[Effect]:
        """The one place the transfer command goes upstream: after REST, if the client sent
        one (RFC 959 section 4.1.3: REST is followed directly by the transfer command).
        In upstream active mode the relay may already run: the server connected on PORT
        before answering it, and a passive client was there first."""
        if transfer.phase is TransferPhase.SETUP:
            transfer.phase = TransferPhase.SENT
        if transfer.restart is None:
            return self._send_transfer_command(transfer)
        rest = Command("REST", transfer.restart)
        return self._view.send(rest, lambda r: self._on_rest(transfer, r), owner=transfer)

    def _send_transfer_command(self, transfer: Transfer) -> list[Effect]:
        return self._view.send(
            transfer.command,
            lambda r: self._on_final(transfer, r),
            on_preliminary=lambda r: self._on_preliminary(transfer, r),
            owner=transfer,
        )

    def _on_rest(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if answer.code != 350:
            # Nothing was started upstream: the data connection is useless now.
            return self._end(transfer, answer)
        return self._send_transfer_command(transfer)

    def _on_preliminary(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if transfer.preliminary is not None:
            return []
        effects: list[Effect] = [ToClient(answer), *self._connect_client(transfer)]
        transfer.preliminary = answer
        return effects

    @staticmethod
    def _connect_client(transfer: Transfer) -> list[Effect]:
        """Active mode: connect to the client's PORT/EPRT address, once, when the upstream's
        data side is coming (RFC 959 section 3.2: the server connects after its 1xx)."""
        target = transfer.client.target
        if target is None or transfer.preliminary is not None:
            return []
        return [ConnectData(Side.CLIENT, target, tls=transfer.client.tls)]

    def _on_final(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        transfer.upstream_final = answer
        effects: list[Effect] = []
        if answer.positive and transfer.upstream_opened:
            # Some servers skip the 1xx of an empty transfer; their data connection exists,
            # so the client's is opened too and the relay decides (`final_reply`).
            effects += self._connect_client(transfer)
        return effects + self._decide(transfer)

    # ------------------------------------------------------------------ data connections

    def data_opened(self, side: Side) -> list[Effect]:
        """The TCP connection of a data channel is up (TLS, if any, not yet negotiated).

        The upstream's transfer command goes out now: a server accepts the TLS handshake on a
        data connection only once it has the command (RFC 4217 section 7), so waiting for the
        handshake first would deadlock."""
        transfer = self.current
        if transfer is None or side is not Side.UPSTREAM:
            return []
        transfer.upstream_opened = True
        if not transfer.command_due:
            return []
        return self._send_command(transfer)

    def data_connected(self, side: Side) -> list[Effect]:
        """A data channel is ready for the relay (after its TLS handshake, if protected)."""
        transfer = self.current
        if transfer is None:
            return []
        effects: list[Effect] = []
        transfer.connected.add(side)
        if side is Side.UPSTREAM:
            transfer.upstream_opened = True
            if transfer.command_due:
                effects += self._send_command(transfer)
        if transfer.connected == {Side.CLIENT, Side.UPSTREAM} and transfer.phase in (
            TransferPhase.SETUP,
            TransferPhase.SENT,
        ):
            transfer.phase = TransferPhase.RELAYING
            effects.append(StartRelay(transfer.source))
        return effects

    def data_failed(self, side: Side, reason: str) -> list[Effect]:
        transfer = self.current
        if transfer is None:
            return []
        if transfer.phase not in (TransferPhase.SETUP, TransferPhase.SENT):
            return []  # the relay reports its own outcome
        command_sent = transfer.phase is TransferPhase.SENT
        transfer.phase = TransferPhase.FAILED
        transfer.relay_result = (False, f"{side.value} data connection failed: {reason}")
        if not command_sent:
            # Nothing is pending upstream for this transfer: answer now.
            return [CloseData(), *self._end(transfer, setup_failure(transfer))]
        if transfer.upstream_final is not None:
            return [CloseData(), *self._decide(transfer)]
        # The upstream has the command and may wait for a data connection that will never
        # come now, without ever answering it (pyftpdlib does): ABOR it, and answer at once.
        return [
            CloseData(),
            *self._view.abort_upstream(transfer),
            *self._end(transfer, setup_failure(transfer)),
        ]

    def relay_finished(self, ok: bool, detail: str) -> list[Effect]:
        transfer = self.current
        if transfer is None or transfer.phase is not TransferPhase.RELAYING:
            return []
        transfer.phase = TransferPhase.RELAYED
        transfer.relay_result = (ok, detail)
        return self._decide(transfer)

    # ------------------------------------------------------------------------- the end

    def _decide(self, transfer: Transfer) -> list[Effect]:
        answer = final_reply(transfer)
        return [] if answer is None else self._end(transfer, answer)

    def fail(self, answer: Reply) -> list[Effect]:
        """End the transfer in progress with `answer` (the upstream's data reply was bad)."""
        return [] if self.current is None else self._end(self.current, answer)

    def give_up(self, answer: Reply) -> list[Effect]:
        """Abandon the transfer with `answer` (the upstream stopped answering, or the gateway
        is stopping). Whatever the upstream still sends for it reaches nobody, so replies stay
        paired if it wakes up; if it stays silent, the next command's wait runs into the reply
        timer again."""
        transfer = self.current
        if transfer is None:
            return []
        self._view.drop(transfer)
        return self._end(transfer, answer)

    def _end(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        """Give the client the transfer's one final reply; the transfer is over."""
        if self.current is not transfer:
            return []
        self.current = None
        record = Log(
            "info" if answer.positive else "warn",
            "Transfer {command} via {upstream}: {code} {text}",
            {
                **self._record(transfer),
                "code": answer.code,
                "text": answer.lines[0],
                "event": Event.TRANSFER_FINISHED,
            },
        )
        return [CloseData(), *self._view.answer(answer, record)]

    def abort(self) -> list[Effect]:
        """ABOR during a transfer (RFC 959 section 4.1.3): close both data sides, tell the
        upstream, answer 426 for the transfer and 226 for the ABOR, in that order. Replies
        still owed for the transfer reach nobody (`Pairing.drop`)."""
        transfer = self.current
        assert transfer is not None
        self.current = None
        record = Log(
            "info",
            "Transfer {command} aborted by client",
            {**self._record(transfer), "event": Event.TRANSFER_ABORTED},
        )
        return [
            CloseData(),
            record,
            *self._view.abort_upstream(transfer),
            *self._view.answer(
                Reply.of(426, "Connection closed; transfer aborted."),
                ToClient(Reply.of(226, "ABOR command successful.")),
            ),
        ]

    def _record(self, transfer: Transfer) -> dict[str, object]:
        """What a transfer's log record (and so the transfer log) says about it."""
        verb, path = transfer.command.verb, transfer.command.arg
        return {
            "command": f"{verb} {path}" if path else verb,
            "verb": verb,
            "path": path,
            "upstream": str(self._view.upstream_peer),
            "direction": "download" if transfer.source is Side.UPSTREAM else "upload",
            "user": self._view.user,
            "proxy_user": self._view.proxy_user,
            "type": self._view.transfer_type,
        }
