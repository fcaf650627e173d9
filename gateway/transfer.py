"""One data transfer's state and the rules that decide its outcome: pure, no I/O.

`Session` drives a `Transfer` from the data command to the one final reply the client gets.
The rules that make a transfer honest live here, where they can be read (and tested) alone:
which upstream data mode to use, and which final reply the client may see, and when.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.addresses import HostPort
from gateway.codec import Command, Reply
from gateway.effects import Side

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


@dataclass(slots=True)
class ClientData:
    """How the client asked to receive the next data connection."""

    verb: str  # PORT, EPRT, PASV or EPSV
    tls: bool  # PROT P was in force when the client chose the mode
    target: HostPort | None = None  # active modes: where to connect
    connected: bool = False  # passive modes: the client already connected
    failure: str | None = None
    advertised: bool = False  # passive modes: the 227/229 reply went out


@dataclass(slots=True)
class Transfer:
    """One data-moving command, from the upstream data setup to the final reply."""

    command: Command
    source: Side
    client: ClientData
    restart: str | None
    upstream_active: bool = False
    """The upstream connects to the gateway (PORT/EPRT): the command waits for the PORT reply."""
    command_sent: bool = False
    preliminary_sent: bool = False
    client_connecting: bool = False
    client_connected: bool = False
    upstream_opened: bool = False
    """The upstream's data connection exists (TCP up; TLS, if any, may still be negotiating)."""
    upstream_connected: bool = False
    relay_started: bool = False
    relay_result: tuple[bool, str] | None = None
    upstream_final: Reply | None = None
    aborted: bool = False

    @property
    def command_due(self) -> bool:
        """Whether the transfer command goes out once the upstream data connection is up. In
        upstream active mode it waits for the PORT reply instead: some servers (pyftpdlib)
        connect as soon as they accept PORT, before answering it."""
        return not self.command_sent and not self.upstream_active


def upstream_mode(setting: str, client_verb: str, epsv_refused: bool, upstream_family: int) -> str:
    """The upstream data mode for one transfer: "active", "pasv" or "epsv".

    `setting` is `Config.upstream_data_mode`; "passive" means EPSV until the upstream refused
    it once in this session, then PASV; "client" mirrors the client's own choice.
    """
    mode = setting
    if mode == "client":
        mode = {"PORT": "active", "EPRT": "active", "PASV": "pasv", "EPSV": "epsv"}[client_verb]
    elif mode == "passive":
        mode = "pasv" if epsv_refused else "epsv"
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
        if transfer.relay_started or transfer.preliminary_sent or transfer.upstream_opened:
            # The upstream's 226 can overtake the bytes still being relayed, or the client's
            # data connection may still be opening: hold it until the relay's outcome.
            return None
        return no_data_connection(transfer)
    ok, detail = result
    if ok:
        return final
    if not transfer.relay_started:
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
