"""The per-session state machine's front: pure, no I/O.

A `Session` pairs one client control connection with one upstream control connection. Its
methods take what happened (a client command, an upstream reply, a data connection made or
lost) and return the effects the shell must carry out (`gateway.effects`). The front owns the
inputs, the phase (`gateway.view.Phase`), the queue of client commands, `_answer` (a command's
one final reply) and closing; it dispatches through the one verb table (`gateway.verbs`). Each
concern is a small machine of its own that sees the session only through a narrow view
(`gateway.view.SessionView` and a few named extras):

- `gateway.upstream`     the upstream control connection: greeting, securing, reply pairing
- `gateway.login`        forward mode: proxy login, choosing and connecting the upstream
- `gateway.routelogin`   reverse mode by user: own greeting, proxy login, routes, backend login
- `gateway.ftps`         TLS on both sides: AUTH/PBSZ/PROT/CCC, and the upstream negotiation
- `gateway.datachannel`  PORT, EPRT, PASV, EPSV and EPSV ALL
- `gateway.transfer`     the transfer driver, from the data command to its final reply
- `gateway.passthrough`  commands passed through unchanged, and what their replies mean
- `gateway.endings`      timers, shutdown, unread or unanswering peers: whether they end it

Three rules shape it:

- One client command is served at a time. Commands that arrive while one is in progress, or
  while the phase accepts none, are queued (bounded) so every command gets exactly one final
  reply, in order (RFC 959 section 4.2), through `_answer`. ABOR is the exception: it acts on
  the transfer in progress at once.
- Upstream replies are paired with the commands the gateway sent, first in first out, so
  replies the gateway itself asked for (EPSV, PASV, PORT, REST, ABOR) never reach the client.
- The data channel belongs to the gateway; a transfer's final reply reaches the client only
  when the upstream has answered *and* the relay has finished (`gateway.transfer.final_reply`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from gateway import verbs
from gateway.addresses import HostPort
from gateway.codec import BadLine, Command, Reply
from gateway.config import Config
from gateway.datachannel import DataChannel
from gateway.effects import (
    CloseClient,
    CloseData,
    CloseUpstream,
    ConnectBackend,
    Effect,
    Log,
    Side,
    ToClient,
)
from gateway.endings import SHUTDOWN_TEXT, Endings
from gateway.errors import ProtocolError
from gateway.events import Event
from gateway.ftps import ClientFTPS
from gateway.login import Login, check_destination
from gateway.pairing import MAX_OWED_REPLIES, Handler, Pairing, ignore
from gateway.passthrough import PassThrough
from gateway.policy import CommandPolicy, UpstreamPolicy
from gateway.routelogin import RouteLogin
from gateway.transfer import TransferDriver, TransferType
from gateway.upstream import MAX_UNSOLICITED_REPLIES, Upstream
from gateway.view import ACCEPTS_COMMANDS, Phase

__all__ = ["MAX_OWED_REPLIES", "MAX_UNSOLICITED_REPLIES", "SHUTDOWN_TEXT", "Session"]

#: How the upstream is chosen.


class Session:
    """One client session; see the module docstring for the rules it keeps."""

    def __init__(
        self,
        config: Config,
        *,
        client_peer: HostPort,
        client_local: HostPort,
        policy: UpstreamPolicy | None = None,
        implicit_tls: bool = False,
        destination: HostPort | None = None,
    ) -> None:
        self.config = config
        #: Transparent mode: where the client connected before a NAT redirect sent it here.
        self.destination = destination
        #: The one upstream of a transparent-mode session (reverse mode's come from the pool,
        #: `gateway.balancer`); None in forward mode.
        self.fixed_upstream: tuple[str, int] | None = None
        if config.transparent and destination is not None:
            self.fixed_upstream = (destination.host, destination.port)
        self.policy = policy or UpstreamPolicy(rules=config.upstream_policy_rules)
        self.commands = CommandPolicy(config.commands.deny, config.commands.read_only)
        self.client_peer = client_peer
        self.client_local = client_local
        self.phase = Phase.LOGIN
        #: The user name last sent upstream (never the password), for the logs.
        self.user: str | None = None
        self._in_progress = False  # a client command waits for its final reply
        self._serving = False  # `_serve_queue` is running (it must not re-enter itself)
        self._queue: deque[Command | BadLine] = deque()
        self._pairing = Pairing()
        self.client_ftps: ClientFTPS = ClientFTPS(config, implicit=implicit_tls)
        self.upstream: Upstream = Upstream(self, self._pairing)
        self.login: Login | RouteLogin = (
            RouteLogin(self)
            if config.connect_after_user
            else Login(self, proxy_auth=bool(config.proxy_auth))
        )
        self.data_channel: DataChannel = DataChannel(self, client_peer, client_local)
        self.transfers: TransferDriver = TransferDriver(self)
        self.passing = PassThrough(self)
        self.endings = Endings(self)

    @property
    def logged_in(self) -> bool:
        """An upstream 230 was passed to the client (the login timer stops counting)."""
        return self.passing.logged_in

    @property
    def login_name(self) -> str | None:
        """Whose transfers these are for `limits.rate_per_user`: the proxy user after a proxy
        login, otherwise the USER name of the upstream's first 230; None before either."""
        return self.login.proxy_user or self.passing.logged_in_as

    @property
    def proxy_user(self) -> str | None:
        return self.login.proxy_user

    @property
    def transfer_type(self) -> TransferType:
        return self.passing.transfer_type

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def transferring(self) -> bool:
        return self.phase is Phase.TRANSFER

    @property
    def forward(self) -> bool:
        """Forward mode: the client chooses the upstream (`gateway.login`)."""
        return self.fixed_upstream is None and not self.config.reverse

    @property
    def own_login(self) -> bool:
        """The gateway greets by itself and its login machine logs in upstream: forward mode,
        and reverse mode by user (`gateway.routelogin`)."""
        return self.forward or self.config.connect_after_user

    @property
    def client_tls(self) -> bool:
        """The client control connection is protected."""
        return self.client_ftps.active

    @property
    def upstream_tls(self) -> bool:
        """The upstream control connection is protected."""
        return self.upstream.ftps.active

    @property
    def upstream_peer(self) -> HostPort | None:
        return self.upstream.peer

    @property
    def awaiting_reply(self) -> int | None:
        """The mark the shell arms `timeouts.reply` with (`Upstream.awaiting_reply`)."""
        return self.upstream.awaiting_reply

    # ----------------------------------------------------------------- inputs from the shell

    def start(self) -> list[Effect]:
        """The client connected."""
        if self.config.transparent:
            refusal = check_destination(self.destination, self.policy)
            if refusal is not None:
                log, reply = refusal
                return [*log, *self.close(reply)]
        if self.own_login:
            self.phase = Phase.PROXY_LOGIN if self.config.proxy_auth else Phase.LOGIN
            text = self.config.greeting
            if self.forward:
                text += " Log in as USER name@host[:port]."
            return [ToClient(Reply.of(220, text))]
        self.phase = Phase.GREETING  # the upstream's greeting answers the connection itself
        if self.fixed_upstream is None:
            return [ConnectBackend()]  # reverse mode: the balancer chooses (`gateway.balancer`)
        return self.connect(*self.fixed_upstream)

    def client_line(self, event: Command | BadLine) -> list[Effect]:
        """A line arrived on the client control connection."""
        if self.closed:
            return []
        if isinstance(event, Command) and event.verb == "ABOR" and self.transferring:
            if self._pairing.owed >= MAX_OWED_REPLIES:
                return self.endings.upstream_not_answering()
            return self.transfers.abort()
        if self._in_progress or self._queue or self.phase not in ACCEPTS_COMMANDS:
            if len(self._queue) >= self.config.limits.max_pending_commands:
                text = "Too many commands sent without waiting for replies; closing."
                return self.close(Reply.of(421, text))
            self._queue.append(event)
            return []
        return self._dispatch(event)

    def upstream_resolved(self, addresses: list[str], error: str | None = None) -> list[Effect]:
        """Forward mode: the upstream name resolved to `addresses` (empty on failure)."""
        if self.closed or not isinstance(self.login, Login):
            return []
        return self.login.resolved(addresses, error)

    def backend_connected(self, config: Config, name: str | None = None) -> None:
        """Reverse mode: the shell connected a backend (`name`, for the logs); `config`
        carries its upstream TLS settings (`Config.for_backend`), which apply from now on."""
        self.config = config
        self.upstream.backend = name

    def upstream_connected(self, local: HostPort, peer: HostPort) -> list[Effect]:
        """The upstream control connection is open; its greeting comes next."""
        return self.upstream.connected(local, peer)

    def upstream_connect_failed(self, reason: str) -> list[Effect]:
        return [] if self.closed else self.upstream.connect_failed(reason)

    def upstream_tls_ready(self) -> list[Effect]:
        """The upstream control connection's TLS handshake succeeded and was verified."""
        return [] if self.closed else self.upstream.ftps.handshake_done()

    def upstream_tls_failed(self, reason: str) -> list[Effect]:
        """The upstream's certificate was refused or its handshake failed: never fall back."""
        return self.upstream.tls_failed(reason)

    def upstream_replies(self, replies: Sequence[Reply]) -> list[Effect]:
        """Replies framed from one read of the upstream control connection."""
        return [] if self.closed else self.upstream.replies(replies)

    def upstream_reply(self, answer: Reply, horizon: int | None = None) -> list[Effect]:
        """A complete reply arrived on the upstream control connection (see `Upstream`)."""
        return [] if self.closed else self.upstream.reply(answer, horizon)

    def upstream_failed(self, error: ProtocolError) -> list[Effect]:
        """The upstream sent something that is not FTP (e.g. an endless reply)."""
        return self.upstream.failed(error)

    def upstream_lost(self) -> list[Effect]:
        return [] if self.closed else self.upstream.lost()

    def client_lost(self) -> list[Effect]:
        if self.closed:
            return []
        self.phase = Phase.CLOSED
        return [*self.upstream.unsolicited_summary(), CloseData(), CloseUpstream()]

    def proxy_auth_result(
        self,
        ok: bool,
        *,
        throttled: bool = False,
        unavailable: bool = False,
        groups: frozenset[str] = frozenset(),
    ) -> list[Effect]:
        """The proxy credentials were checked (`twisted.cred`, in the shell); `unavailable`:
        a user store (a directory) could not answer, which is no fault of the client;
        `groups`: the proxy user's directory groups, which routes may match."""
        if self.closed:
            return []
        return self.login.proxy_auth_result(
            ok, throttled=throttled, unavailable=unavailable, groups=groups
        )

    def timed_out(self, what: str, mark: int | None = None) -> list[Effect]:
        """A session timer ran out: `login`, `idle`, or `reply` (armed with the mark
        `awaiting_reply` gave). Whether it still counts is decided here: a logged-in session
        has no login timer, a transfer in progress keeps the session from being idle (the
        transfer's own timeouts bound it), and a reply timer counts only if no reply came since
        it was armed. A timer that counts ends the session with 421 (RFC 959 section 4.2),
        except the reply timer of a transfer, which ends only the transfer, with 426."""
        return self.endings.timed_out(what, mark)

    def shutdown(self, *, immediate: bool = False) -> list[Effect]:
        """The gateway is stopping. An idle session gets 421 and closes now (RFC 959 section
        4.2); a running transfer may finish, after which the session gets 421 instead of
        serving another command. With `immediate` (the grace period is over, or a second
        signal), the transfer ends with 426, so the client knows its file is incomplete."""
        return self.endings.shutdown(immediate)

    def peer_not_reading(self, side: Side, seconds: float) -> list[Effect]:
        """`side` left a full buffer of what the gateway sent it unread for `seconds`: 421 and
        close (RFC 959 section 4.2), so a peer that never reads cannot hold the session."""
        return self.endings.peer_not_reading(side, seconds)

    # ------------------------------------------------------------------- data connections

    def data_listening(self, side: Side, address: HostPort) -> list[Effect]:
        """A passive listener for `side` is bound to `address`."""
        if side is Side.CLIENT:
            return self.data_channel.listening(address)
        return self.transfers.upstream_listening(address)

    def data_opened(self, side: Side) -> list[Effect]:
        """The TCP connection of a data channel is up (TLS, if any, not yet negotiated)."""
        return self.transfers.data_opened(side)

    def data_connected(self, side: Side) -> list[Effect]:
        """A data channel is ready for the relay (after its TLS handshake, if protected)."""
        if self.transfers.current is None:
            if side is Side.CLIENT:
                self.data_channel.connected()
            return []
        return self.transfers.data_connected(side)

    def data_failed(self, side: Side, reason: str) -> list[Effect]:
        log = Log(
            "warn",
            "{side} data connection failed: {reason}",
            {"side": side.value, "reason": reason, "event": Event.DATA_CONNECTION_FAILED},
        )
        if self.transfers.current is None:
            return [log, *(self.data_channel.failed(reason) if side is Side.CLIENT else [])]
        return [log, *self.transfers.data_failed(side, reason)]

    def relay_finished(self, ok: bool, detail: str) -> list[Effect]:
        return self.transfers.relay_finished(ok, detail)

    # ------------------------------------------------------- the view the machines use

    def send(
        self,
        command: Command,
        on_final: Handler,
        *,
        on_preliminary: Handler = ignore,
        owner: object | None = None,
    ) -> list[Effect]:
        if command.verb == "USER":
            self.user = command.arg
        return self._pairing.send(command, on_final, on_preliminary=on_preliminary, owner=owner)

    def drop(self, owner: object) -> None:
        self._pairing.drop(owner)

    def abort_upstream(self, owner: object) -> list[Effect]:
        return self._pairing.abort(owner)

    def answer(self, reply: Reply, *then: Effect) -> list[Effect]:
        return self._answer(reply, *then)

    @property
    def owed_replies(self) -> int:
        return self._pairing.owed

    def reply_timed_out(self) -> list[Effect]:
        return self.upstream.reply_timed_out()

    def give_up_transfer(self, answer: Reply) -> list[Effect]:
        return self.transfers.give_up(answer)

    def close(self, last: Reply | None) -> list[Effect]:
        """End the session: `last` to the client, then close everything."""
        if self.closed:
            return []
        self.phase = Phase.CLOSED
        summary = self.upstream.unsolicited_summary()
        effects: list[Effect] = [ToClient(last)] if last is not None else []
        return [*summary, *effects, CloseData(), CloseClient(), CloseUpstream()]

    def enter(self, phase: Phase) -> None:
        self.phase = phase

    def connect(self, host: str, port: int) -> list[Effect]:
        return self.upstream.connect(host, port)

    def forget_upstream(self) -> None:
        self.upstream.forget()

    def serve_queue(self) -> list[Effect]:
        return self._serve_queue()

    def pass_through(self, command: Command) -> list[Effect]:
        return self.passing.command(command)

    def pass_back(self, answer: Reply, *, login: bool = False) -> list[Effect]:
        return self.passing.reply(answer, login=login)

    # -------------------------------------------------------- answering client commands

    def _answer(self, reply: Reply, *then: Effect) -> list[Effect]:
        """The command in progress gets its one final `reply`; `then` follows it (e.g. the TLS
        handshake after 234); then the next queued command is served."""
        self._in_progress = False
        if self.phase is Phase.TRANSFER:
            self.phase = Phase.READY if self.logged_in else Phase.LOGIN
        if self.endings.shutting_down:
            return [ToClient(reply), *then, *self.endings.after_answer()]
        return [ToClient(reply), *then, *self._serve_queue()]

    def _serve_queue(self) -> list[Effect]:
        if self._serving:
            return []  # the loop below, further up the stack, goes on
        self._serving = True
        effects: list[Effect] = []
        try:
            while not self._in_progress and self._queue and self.phase in ACCEPTS_COMMANDS:
                effects += self._dispatch(self._queue.popleft())
        finally:
            self._serving = False
        return effects

    def _dispatch(self, event: Command | BadLine) -> list[Effect]:
        self._in_progress = True
        if isinstance(event, BadLine):
            return self._answer(event.reply)
        try:
            return verbs.serve(self, event)
        except ProtocolError as e:
            return self._answer(Reply.of(e.reply_code, e.message))
