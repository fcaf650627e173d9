"""The client's data-channel commands: PORT, EPRT, PASV, EPSV and EPSV ALL. Pure, no I/O.

The data channel belongs to the gateway: it answers these commands itself and remembers how the
client wants its next data connection (`ClientData`), which the next transfer takes. A new
choice replaces the previous one, closing its listener or connection.
"""

from __future__ import annotations

from ipaddress import IPv6Address, ip_address

from gateway.addresses import (
    HostPort,
    format_epsv_reply,
    format_pasv_reply,
    parse_eprt_argument,
    parse_epsv_argument,
    parse_port_argument,
)
from gateway.codec import Command, Reply
from gateway.effects import CloseData, Effect, ListenData, Log, Side
from gateway.events import Event
from gateway.policy import check_data_target
from gateway.transfer import ClientData, ClientDataVerb
from gateway.view import SessionView

_EPSV_ONLY = Reply.of(503, "Only EPSV is allowed after EPSV ALL (RFC 2428 section 4).")


class DataChannel:
    """How the client asked to receive its next data connection."""

    def __init__(self, view: SessionView, client_peer: HostPort, client_local: HostPort) -> None:
        self._view = view
        self._client_peer = client_peer
        self._client_local = client_local
        self.pending: ClientData | None = None
        #: RFC 2428 section 4: after EPSV ALL, only EPSV may choose the data channel.
        self._epsv_all = False

    def take(self) -> ClientData | None:
        """The client's choice, for the transfer that starts now; the next needs a new one."""
        pending, self.pending = self.pending, None
        return pending

    def port(self, command: Command, protected: bool) -> list[Effect]:
        """PORT or EPRT (active mode): check the target (RFC 2577: no bounce), remember it."""
        if self._epsv_all:
            return self._view.answer(_EPSV_ONLY)
        if command.verb == "PORT":
            target = parse_port_argument(command.arg)
        else:
            target = parse_eprt_argument(command.arg)
        if target.unspecified and target.family == self._client_peer.family:
            # 0.0.0.0 or :: names no host, so it can only mean "my own address": lftp, for one,
            # sends EPRT |2|::|port| in active mode over IPv6. The control connection's address
            # is where the gateway connects anyway (RFC 2577 section 3), so this opens no bounce.
            target = HostPort(self._client_peer.host, target.port)
        code, decision = check_data_target(
            self._client_peer.host,
            target,
            allow_foreign=self._view.config.data.allow_foreign_address,
            own=self._view.policy.own_addresses,
        )
        if not decision.allowed:
            log = Log(
                "warn",
                "Refused {verb} to {target} from {client}: {reason}",
                {
                    "verb": command.verb,
                    "target": str(target),
                    "reason": decision.reason,
                    "event": Event.REFUSED,
                    "refused": "data_target",
                },
            )
            text = f"Illegal {command.verb} command: {decision.reason}."
            return [log, *self._view.answer(Reply.of(code, text))]
        effects = self._drop()
        verb: ClientDataVerb = "PORT" if command.verb == "PORT" else "EPRT"
        self.pending = ClientData(verb, protected, target=target)
        return [*effects, *self._view.answer(Reply.of(200, f"{command.verb} command successful."))]

    def passive(self, command: Command, protected: bool) -> list[Effect]:
        """PASV or EPSV: open a listener; `listening` answers once it is bound."""
        if command.verb == "PASV":
            if self._epsv_all:
                return self._view.answer(_EPSV_ONLY)
            if self._client_local.family != 4:
                return self._view.answer(
                    Reply.of(522, "PASV cannot describe an IPv6 address; use EPSV.")
                )
        else:
            requested = parse_epsv_argument(command.arg)
            if requested == "ALL":
                self._epsv_all = True
                return self._view.answer(Reply.of(200, "EPSV ALL accepted."))
            supported = 1 if self._client_local.family == 4 else 2
            if requested is not None and requested != supported:
                # RFC 2428 section 3: answer 522 naming the protocol the server can use.
                text = f"Network protocol not supported, use ({supported})."
                return self._view.answer(Reply.of(522, text))
        effects = self._drop()
        self.pending = ClientData("PASV" if command.verb == "PASV" else "EPSV", protected)
        return [*effects, ListenData(Side.CLIENT, tls=protected)]

    def listening(self, address: HostPort) -> list[Effect]:
        """The client-side listener is bound: answer PASV (227) or EPSV (229)."""
        pending = self.pending
        if pending is None:
            return []
        pending.advertised = True
        if pending.verb == "EPSV":
            return self._view.answer(Reply.of(229, format_epsv_reply(address.port)))
        advertised = HostPort.of(self._advertised_host(address.host), address.port)
        return self._view.answer(Reply.of(227, format_pasv_reply(advertised)))

    def _advertised_host(self, local: str) -> str:
        """The address a 227 reply names: the masquerade address, except for clients inside
        the networks that reach the gateway directly (`data.masquerade_except`)."""
        masquerade = self._view.config.data.masquerade_address
        if masquerade is None:
            return local
        client = ip_address(self._client_peer.host)
        if isinstance(client, IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        if any(client in network for network in self._view.config.data.masquerade_except):
            return local
        return masquerade

    def connected(self) -> None:
        """The client connected before its transfer command (curl does)."""
        if self.pending is not None:
            self.pending.connected = True

    def failed(self, reason: str) -> list[Effect]:
        """The data side failed before any transfer. PASV/EPSV still waiting for its listener
        (which could not be opened) gets its one final reply, 425 (RFC 959 section 4.2), and
        the session goes on; otherwise the next transfer gets the 425."""
        pending = self.pending
        if pending is None:
            return []
        if pending.target is None and not pending.advertised:
            self.pending = None
            text = f"Cannot open passive data connection: {reason}."
            return [CloseData(), *self._view.answer(Reply.of(425, text))]
        pending.failure = reason
        return []

    def _drop(self) -> list[Effect]:
        """A new PORT/PASV replaces the previous one, closing its listener or connection."""
        if self.pending is None:
            return []
        self.pending = None
        return [CloseData()]
