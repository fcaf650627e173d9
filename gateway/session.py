"""The per-session state machine: pure, no I/O.

A `Session` pairs one client control connection with one upstream control connection. Its
methods take what happened (a client command, an upstream reply, a data connection made or
lost) and return the effects the shell must carry out (`gateway.effects`). Three rules shape it:

- One client command is served at a time. Commands that arrive while one is in progress are
  queued (bounded) so every command gets exactly one final reply, in order (RFC 959 section 4.2).
  ABOR is the exception: it acts on the transfer in progress at once.
- Upstream replies are paired with the commands the gateway sent, first in first out. Each sent
  command carries the handler for its replies, so replies the gateway itself asked for (EPSV,
  PASV, PORT, REST, ABOR) never reach the client by mistake.
- The data channel belongs to the gateway. The client chooses active or passive with
  PORT/EPRT/PASV/EPSV, which the gateway answers itself; the upstream side is chosen by
  `Config.upstream_data_mode`. A transfer's final reply reaches the client only when the upstream
  has answered *and* the relay has finished; if the relay failed the client gets 425/426, never
  the upstream's 226.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from ipaddress import IPv6Address, ip_address

from gateway import features, proxy_login
from gateway.addresses import (
    HostPort,
    UserTarget,
    format_eprt_argument,
    format_epsv_reply,
    format_pasv_reply,
    format_port_argument,
    is_ip_literal,
    parse_eprt_argument,
    parse_epsv_argument,
    parse_epsv_reply,
    parse_host_port,
    parse_pasv_reply,
    parse_port_argument,
    parse_user_target,
)
from gateway.codec import BadLine, Command, Reply
from gateway.config import Config
from gateway.effects import (
    Authenticate,
    CloseClient,
    CloseData,
    CloseUpstream,
    ConnectData,
    ConnectUpstream,
    Effect,
    ListenData,
    Log,
    ResolveUpstream,
    Side,
    StartClientTLS,
    StartRelay,
    StartUpstreamTLS,
    ToClient,
    ToUpstream,
)
from gateway.errors import ProtocolError
from gateway.events import Event
from gateway.numbers import is_ascii_number
from gateway.policy import CommandPolicy, UpstreamPolicy, check_data_target
from gateway.transfer import SOURCES as TRANSFER_SOURCES
from gateway.transfer import (
    ClientData,
    Transfer,
    final_reply,
    setup_failure,
    upstream_mode,
)

#: Commands a client may send before AUTH TLS when TLS is required.
_BEFORE_TLS = frozenset({"AUTH", "FEAT", "QUIT", "NOOP", "HELP", "SYST"})

#: Unsolicited upstream replies a session tolerates (a server that answers an over-long line
#: twice sends one now and then); past this the upstream is flooding and the session ends.
MAX_UNSOLICITED_REPLIES = 8

#: Commands answered before an upstream is chosen in forward mode.
_PRE_LOGIN_COMMANDS = ("NOOP", "SYST", "HELP")

Handler = Callable[[Reply], list[Effect]]

#: RFC 959 section 4.2: 421 when the service is shutting down.
SHUTDOWN_TEXT = "Service shutting down."


def reply(code: int, text: str) -> ToClient:
    return ToClient(Reply.of(code, text))


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
        #: The one upstream of a reverse-mode or transparent-mode session; None in forward mode.
        self.fixed_upstream = config.upstream
        if config.transparent and destination is not None:
            self.fixed_upstream = (destination.host, destination.port)
        self.policy = policy or UpstreamPolicy(rules=config.upstream_rules)
        self.client_peer = client_peer
        self.client_local = client_local
        self.upstream_peer: HostPort | None = None
        self.upstream_local: HostPort | None = None
        self.closed = False
        self._busy = False
        self._draining = False
        self._queue: deque[Command | BadLine] = deque()
        self._expect: deque[tuple[int, Handler]] = deque()
        #: Commands sent upstream so far; each expectation remembers its number, so a reply
        #: that was read before its command went out is recognised as unsolicited.
        self.sent = 0
        self._unsolicited = 0
        #: Upstream replies paired with a command so far: the mark `awaiting_reply` gives the
        #: shell's reply timer, so a timer armed before the latest reply no longer counts.
        self._replies = 0
        self._target: UserTarget | None = None
        self._client_data: ClientData | None = None
        self._transfer: Transfer | None = None
        self._restart: str | None = None
        self._epsv_all = False
        self._epsv_refused = False
        self._quitting = False
        # RFC 4217 state, one set per side: the gateway terminates TLS on each.
        # Implicit FTPS (an ssl: listener): the control connection is protected from the start.
        self.client_tls = implicit_tls
        self._client_pbsz = False
        self._client_prot = False
        self.upstream_tls = False
        self._upstream_prot = False
        self._after_upstream_tls: Callable[[], list[Effect]] | None = None
        # Forward mode: proxy authentication and what to do once the upstream greets.
        self._proxy_ok = not config.proxy_auth
        self._login: proxy_login.ProxyLogin | None = None
        self._after_connect: Callable[[], list[Effect]] | None = None
        self.logged_in = False
        self.commands = CommandPolicy(config.denied_commands, config.read_only)
        #: The user name last sent upstream (never the password), for the logs.
        self.user: str | None = None
        #: The representation type in force: "a" (ASCII, RFC 959's default) or "b" (binary).
        self.transfer_type = "a"
        self._shutting_down = False

    @property
    def transferring(self) -> bool:
        return self._transfer is not None

    @property
    def mode(self) -> str:
        """How the upstream is chosen: "reverse", "forward" or "transparent"."""
        if self.config.transparent:
            return "transparent"
        return "forward" if self.config.forward else "reverse"

    def shutdown(self, *, immediate: bool = False) -> list[Effect]:
        """The gateway is stopping. An idle session gets 421 and closes now (RFC 959 section
        4.2); a running transfer may finish, after which the session gets 421 instead of
        serving another command. With `immediate` (the grace period is over, or a second
        signal), the transfer ends with 426, so the client knows its file is incomplete."""
        if self.closed:
            return []
        self._shutting_down = True
        transfer = self._transfer
        if transfer is None:
            return self._close(Reply.of(421, SHUTDOWN_TEXT))
        if not immediate:
            return []
        transfer.aborted = True
        return self._complete(
            transfer, Reply.of(426, "Transfer aborted: the gateway is shutting down.")
        )

    @property
    def awaiting_reply(self) -> int | None:
        """While the session waits for the upstream to answer, a mark that changes with every
        upstream reply; None when no wait needs `timeouts.reply`: nothing is asked, or a
        transfer's data side is under way after its 1xx (bounded by `timeouts.data_connect` and
        `timeouts.stall` until the relay's outcome is known, then by this timer again)."""
        if self.closed or not self._expect:
            return None
        transfer = self._transfer
        if (
            transfer is not None
            and transfer.relay_result is None
            and (transfer.relay_started or transfer.preliminary_sent)
        ):
            return None
        return self._replies

    # ----------------------------------------------------------------- inputs from the shell

    def start(self) -> list[Effect]:
        """The client connected."""
        if self.config.transparent:
            refusal = self._check_destination()
            if refusal is not None:
                return refusal
        if self.fixed_upstream is None:
            return [reply(220, self.config.greeting + " Log in as USER name@host[:port].")]
        host, port = self.fixed_upstream
        self._busy = True  # the upstream's greeting answers the connection itself
        return [self._connect_effect(host, port)]

    def _check_destination(self) -> list[Effect] | None:
        """Transparent mode: refuse a connection that was not redirected, or whose original
        destination the upstream policy denies (the gateway must not become an open relay to
        addresses its owner did not allow)."""
        destination = self.destination
        if destination is None:
            text = "This gateway serves redirected connections only; connect to an FTP server."
            log = Log(
                "warn",
                "Refused {client}: {reason}",
                {
                    "reason": "transparent mode, but the connection was not redirected "
                    "(made to the gateway's own address)",
                    "event": Event.SESSION_REFUSED,
                    "reason_key": "not_redirected",
                },
            )
            return [log, *self._close(Reply.of(421, text))]
        decision = self.policy.check(destination.host, destination.port)
        if decision.allowed:
            return None
        text = f"Upstream {destination} is denied by policy: {decision.reason}."
        return [
            _upstream_denied(str(destination), decision.reason),
            *self._close(Reply.of(421, text)),
        ]

    def client_line(self, event: Command | BadLine) -> list[Effect]:
        """A line arrived on the client control connection."""
        if self.closed:
            return []
        if isinstance(event, Command) and event.verb == "ABOR" and self._transfer is not None:
            return self._abort()
        if self._busy:
            if len(self._queue) >= self.config.max_pending_commands:
                return self._close(
                    Reply.of(421, "Too many commands sent without waiting for replies; closing.")
                )
            self._queue.append(event)
            return []
        return self._dispatch(event)

    def upstream_resolved(self, addresses: list[str], error: str | None = None) -> list[Effect]:
        """Forward mode: the upstream name resolved to `addresses` (empty on failure)."""
        target = self._target
        if target is None or self.closed:
            return []
        if not addresses:
            return self._login_refused(f"Cannot resolve {target.host}: {error or 'no address'}.")
        chosen, decision = self.policy.choose(addresses, target.port, target.host)
        if chosen is None:
            return [
                _upstream_denied(target.host, decision.reason),
                *self._login_refused(
                    f"Upstream {target.host} is denied by policy: {decision.reason}."
                ),
            ]
        return [self._connect_effect(chosen, target.port)]

    def _connect_effect(self, host: str, port: int) -> ConnectUpstream:
        if self.config.upstream_tls != "implicit":
            return ConnectUpstream(host, port)
        return ConnectUpstream(host, port, implicit_tls=True, tls_name=self._tls_name())

    def upstream_connected(self, local: HostPort, peer: HostPort) -> list[Effect]:
        """The upstream control connection is open; its greeting comes next."""
        self.upstream_local, self.upstream_peer = local, peer
        self._expect.append((self.sent, self._on_greeting))
        return [Log("info", "Connected to upstream {peer}", {"peer": str(peer)})]

    def upstream_connect_failed(self, reason: str) -> list[Effect]:
        if self.closed:
            return []
        log = Log(
            "warn",
            "Cannot connect to the upstream: {reason}",
            {"reason": reason, "event": Event.UPSTREAM_CONNECT_FAILED},
        )
        if self.fixed_upstream is None:
            target = self._target
            where = f"{target.host}:{target.port}" if target else "the upstream"
            return [log, *self._login_refused(f"Cannot connect to {where}: {reason}.")]
        return [log, *self._close(Reply.of(421, f"Upstream server unavailable: {reason}."))]

    def upstream_tls_ready(self) -> list[Effect]:
        """The upstream control connection's TLS handshake succeeded and was verified."""
        then = self._after_upstream_tls
        self._after_upstream_tls = None
        if self.closed or then is None:
            return []
        self.upstream_tls = True
        return self._protect_upstream(then)

    def upstream_tls_failed(self, reason: str) -> list[Effect]:
        """The upstream's certificate was refused or its handshake failed: never fall back."""
        if self.config.upstream_tls == "auto" and "certificate" in reason:
            # An administrator meets this first with a self-signed upstream: name the fix.
            reason += (
                "; to trust it set tls.upstream_ca_file or tls.upstream_fingerprint, "
                'or set tls.upstream = "off" to use clear text'
            )
        return [
            Log(
                "warn",
                "TLS to upstream {peer} failed: {reason}",
                {"peer": str(self.upstream_peer), "reason": reason},
            ),
            *self._close(Reply.of(421, f"Cannot secure the connection to the upstream: {reason}.")),
        ]

    def upstream_reply(self, answer: Reply, horizon: int | None = None) -> list[Effect]:
        """A complete reply arrived on the upstream control connection. `horizon` is `sent`
        as it was when the bytes of this reply were read: a reply cannot answer a command
        sent after that."""
        if self.closed:
            return []
        if answer.code == 421 and not self._quitting:
            # RFC 959 section 4.2: 421 means the server is closing the control connection.
            return self._close(answer)
        if not self._expect or (horizon is not None and self._expect[0][0] >= horizon):
            return self._unsolicited_reply(answer)
        handler = self._expect[0][1]
        self._replies += 1
        if answer.final:
            self._expect.popleft()
        try:
            return handler(answer)
        except ProtocolError as e:
            # A reply the gateway must understand (227, 229) was malformed.
            transfer = self._transfer
            log = Log("warn", "Bad upstream reply: {error}", {"error": e.message})
            if transfer is not None:
                return [
                    log,
                    *self._complete(
                        transfer, Reply.of(425, f"Cannot open data connection: {e.message}")
                    ),
                ]
            return [log, *self._close(Reply.of(421, f"Upstream server error: {e.message}"))]

    def _unsolicited_reply(self, answer: Reply) -> list[Effect]:
        """A reply no command asked for: dropped. The first is logged, the rest counted (the
        count is logged when the session ends), and a flood ends the session with 421."""
        self._unsolicited += 1
        if self._unsolicited > MAX_UNSOLICITED_REPLIES:
            text = "Upstream server error: too many unsolicited replies."
            return self._close(Reply.of(421, text))
        if self._unsolicited > 1:
            return []
        return [
            Log(
                "warn",
                "Unsolicited upstream reply {reply}",
                {"reply": str(answer.code), "event": Event.UNSOLICITED_REPLY},
            )
        ]

    def _unsolicited_summary(self) -> list[Effect]:
        if self._unsolicited <= 1:
            return []
        fields = {"count": self._unsolicited, "event": Event.UNSOLICITED_REPLIES}
        return [Log("warn", "Upstream sent {count} unsolicited replies in all", fields)]

    def upstream_failed(self, error: ProtocolError) -> list[Effect]:
        """The upstream sent something that is not FTP (e.g. an endless reply)."""
        return [
            Log("warn", "Upstream protocol error: {error}", {"error": str(error)}),
            *self._close(Reply.of(421, f"Upstream server error: {error}")),
        ]

    def upstream_lost(self) -> list[Effect]:
        if self.closed:
            return []
        if self._quitting:
            return self._close(None)
        return self._close(Reply.of(421, "Upstream server closed the connection."))

    def client_lost(self) -> list[Effect]:
        if self.closed:
            return []
        self.closed = True
        return [*self._unsolicited_summary(), CloseData(), CloseUpstream()]

    def _advertised_host(self, local: str) -> str:
        """The address a 227 reply names: the masquerade address, except for clients inside
        the networks that reach the gateway directly (`data.masquerade_except`)."""
        masquerade = self.config.masquerade_address
        if masquerade is None:
            return local
        client = ip_address(self.client_peer.host)
        if isinstance(client, IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        if any(client in network for network in self.config.masquerade_except):
            return local
        return masquerade

    def data_listening(self, side: Side, address: HostPort) -> list[Effect]:
        """A passive listener for `side` is bound to `address`."""
        if side is Side.CLIENT:
            data = self._client_data
            if data is None:
                return []
            data.advertised = True
            if data.verb == "EPSV":
                text = format_epsv_reply(address.port)
                return [reply(229, text), *self._finish()]
            advertised = HostPort.of(self._advertised_host(address.host), address.port)
            return [reply(227, format_pasv_reply(advertised)), *self._finish()]
        transfer = self._transfer
        if transfer is None:
            return []
        advertised = address
        if advertised.family == 4 and not (
            self.config.upstream_data_mode == "client" and transfer.client.verb == "EPRT"
        ):
            command = Command("PORT", format_port_argument(advertised))
        else:
            command = Command("EPRT", format_eprt_argument(advertised))
        return self._send(command, lambda r: self._on_port(transfer, r))

    def data_opened(self, side: Side) -> list[Effect]:
        """The TCP connection of a data channel is up (TLS, if any, not yet negotiated).

        The upstream's transfer command goes out now: a server accepts the TLS handshake on a
        data connection only once it has the command (RFC 4217 section 7), so waiting for the
        handshake first would deadlock."""
        transfer = self._transfer
        if transfer is None or side is not Side.UPSTREAM:
            return []
        transfer.upstream_opened = True
        if not transfer.command_due:
            return []
        return self._send_transfer(transfer)

    def data_connected(self, side: Side) -> list[Effect]:
        """A data channel is ready for the relay (after its TLS handshake, if protected)."""
        transfer = self._transfer
        if transfer is None:
            if side is Side.CLIENT and self._client_data is not None:
                self._client_data.connected = True
            return []
        effects: list[Effect] = []
        if side is Side.UPSTREAM:
            transfer.upstream_opened = transfer.upstream_connected = True
            if transfer.command_due:
                effects += self._send_transfer(transfer)
        else:
            transfer.client_connected = True
        return effects + self._maybe_start_relay(transfer)

    def data_failed(self, side: Side, reason: str) -> list[Effect]:
        log = Log(
            "warn",
            "{side} data connection failed: {reason}",
            {"side": side.value, "reason": reason},
        )
        return [log, *self._data_failed(side, reason)]

    def _data_failed(self, side: Side, reason: str) -> list[Effect]:
        transfer = self._transfer
        if transfer is None:
            data = self._client_data
            if side is not Side.CLIENT or data is None:
                return []
            if data.target is None and not data.advertised:
                # PASV/EPSV waits for its listener, which could not be opened: the command's
                # one final reply is 425 (RFC 959 section 4.2), and the session goes on.
                self._client_data = None
                text = f"Cannot open passive data connection: {reason}."
                return [CloseData(), reply(425, text), *self._finish()]
            data.failure = reason
            return []
        if transfer.relay_started or transfer.relay_result is not None:
            return []  # the relay reports its own outcome
        transfer.relay_result = (False, f"{side.value} data connection failed: {reason}")
        effects: list[Effect] = [CloseData()]
        if not transfer.command_sent:
            # Nothing is pending upstream for this transfer: answer now.
            return effects + self._complete(transfer, setup_failure(transfer))
        return effects + self._maybe_complete(transfer)

    def relay_finished(self, ok: bool, detail: str) -> list[Effect]:
        transfer = self._transfer
        if transfer is None or transfer.relay_result is not None:
            return []
        transfer.relay_result = (ok, detail)
        return self._maybe_complete(transfer)

    # -------------------------------------------------------------------- client commands

    def _dispatch(self, event: Command | BadLine) -> list[Effect]:
        if isinstance(event, BadLine):
            return [ToClient(event.reply)]
        try:
            return self._command(event)
        except ProtocolError as e:
            return [reply(e.reply_code, e.message)]

    def _command(self, command: Command) -> list[Effect]:
        verb = command.verb
        if verb == "QUIT":
            return self._quit()
        if self.config.client_tls == "required" and not self.client_tls and verb not in _BEFORE_TLS:
            return [reply(530, "TLS is required on this gateway: send AUTH TLS first.")]
        if verb in ("AUTH", "PBSZ", "PROT", "CCC"):
            return _TLS_COMMANDS[verb](self, command)
        if verb == "FEAT" and self.upstream_peer is None:
            return [ToClient(features.for_client(None, self.config.client_tls_available))]
        if self.fixed_upstream is None:
            if verb == "USER":
                return self._user_forward(command)
            if self.upstream_peer is None:
                if verb == "PASS":
                    return self._pass_forward(command)
                if verb == "ACCT":
                    return self._acct_forward(command)
                if verb in ("OPEN", "SITE") and self._proxy_ok and command.arg:
                    return self._open(command)
        refusal = self.commands.check(verb, command.arg)
        if refusal is not None:
            code, text = refusal
            return [
                Log(
                    "info",
                    "Refused {verb} by command policy",
                    {"verb": verb, "event": Event.REFUSED, "refused": "command"},
                ),
                reply(code, text),
            ]
        if self.upstream_peer is None:
            if verb in _PRE_LOGIN_COMMANDS:
                return [reply(200 if verb == "NOOP" else 502, _pre_login_text(verb))]
            return [reply(530, "Please log in with USER name@host[:port] first.")]
        handler = _COMMANDS.get(verb)
        if handler is not None:
            return handler(self, command)
        if verb in TRANSFER_SOURCES:
            return self._begin_transfer(command)
        return self._relay(command)

    def _relay(self, command: Command) -> list[Effect]:
        """Send the command upstream and give the client every reply to it."""
        self._busy = True
        if command.verb == "TYPE":
            return self._send(command, lambda answer: self._type_reply(command.arg, answer))
        login = command.verb in ("USER", "PASS", "ACCT")
        return self._send(command, self._login_reply if login else self._relay_reply)

    def _type_reply(self, arg: str, answer: Reply) -> list[Effect]:
        if answer.code == 200:
            # RFC 959 section 3.1.1: A (ASCII) or E are text; I and L 8 move bytes as they are.
            self.transfer_type = "a" if arg[:1].upper() in ("A", "E") else "b"
        return self._relay_reply(answer)

    def _relay_reply(self, answer: Reply) -> list[Effect]:
        effects: list[Effect] = []
        if answer.code == 230 and not self.logged_in:
            self.logged_in = True
            effects.append(
                Log("info", "User {user} logged in", {"user": self.user, "event": Event.LOGGED_IN})
            )
        return [*effects, ToClient(answer), *(self._finish() if answer.final else [])]

    def _login_reply(self, answer: Reply) -> list[Effect]:
        """A reply to USER, PASS or ACCT; 530 (RFC 959 section 4.2: not logged in) is the
        upstream refusing the login, worth a line and a count of its own."""
        if answer.code != 530:
            return self._relay_reply(answer)
        log = Log(
            "warn",
            "Upstream {upstream} refused the login: {text}",
            {
                "upstream": str(self.upstream_peer),
                "text": answer.lines[0],
                "event": Event.UPSTREAM_LOGIN_FAILED,
            },
        )
        return [log, *self._relay_reply(answer)]

    # ------------------------------------------------------------ forward mode: logging in

    def _user_forward(self, command: Command) -> list[Effect]:
        if not self._proxy_ok and self.upstream_peer is None:
            return self._proxy_user(command.arg)
        target = parse_user_target(command.arg)
        if self.upstream_peer is not None:
            current = self._target
            if (
                target is not None
                and current is not None
                and (target.host, target.port) != (current.host, current.port)
            ):
                return [reply(530, f"Already connected to {current.host}; reconnect to change.")]
            user = target.user if target is not None else command.arg
            return self._relay(Command("USER", user))
        if target is None:
            return [reply(530, "Log in as USER name@host[:port] to choose the upstream server.")]
        return self._connect_to(target, self._site_login(target.user, None))

    def _proxy_user(self, arg: str) -> list[Effect]:
        """USER while the gateway still needs the proxy credentials (`gateway.proxy_login`)."""
        self._login, text = proxy_login.begin(arg)
        return [reply(331, text)]

    def _pass_forward(self, command: Command) -> list[Effect]:
        login = self._login
        if login is None or self._proxy_ok:
            return [reply(503, "Log in with USER name@host[:port] first.")]
        if login.style == "joined":
            passwords = proxy_login.split_joined_password(command.arg)
            if passwords is None:
                self._login = None
                return [reply(530, "Send the password as password@proxy_password.")]
            login.site_password, proxy_password = passwords
            return self._authenticate(login.proxy_user, proxy_password)
        if login.style == "joined-acct":
            login.site_password = command.arg
            return [reply(332, "Proxy password required: send it with ACCT.")]
        return self._authenticate(login.proxy_user, command.arg)

    def _acct_forward(self, command: Command) -> list[Effect]:
        login = self._login
        if login is None or login.style != "joined-acct" or login.site_password is None:
            return [reply(503, "ACCT is not expected now.")]
        return self._authenticate(login.proxy_user, command.arg)

    def _open(self, command: Command) -> list[Effect]:
        """OPEN host[:port] (or SITE host) after a proxy login: connect without logging in."""
        try:
            host, port = parse_host_port(command.arg, 21)
        except ValueError as e:
            return [reply(501, f"{command.verb} needs a host[:port]: {e}.")]
        target = UserTarget("", host, port)
        return self._connect_to(target, self._announce(target, 220))

    def _authenticate(self, user: str, password: str) -> list[Effect]:
        self._busy = True
        return [Authenticate(user, password)]

    def proxy_auth_result(
        self, ok: bool, *, throttled: bool = False, unavailable: bool = False
    ) -> list[Effect]:
        """The proxy credentials were checked (`twisted.cred`, in the shell); `unavailable`:
        a user store (a directory) could not answer, which is no fault of the client."""
        login = self._login
        if login is None or self.closed:
            return []
        fields = {"user": login.proxy_user}
        if throttled:
            return [
                Log(
                    "warn",
                    "Proxy login for {user} refused: too many failures",
                    {**fields, "event": Event.REFUSED, "refused": "login_throttle"},
                ),
                *self._close(Reply.of(421, "Too many failed logins from your address; try later.")),
            ]
        if unavailable:
            return self._close(
                Reply.of(
                    421, "Proxy login cannot be checked now (user store unavailable); try later."
                )
            )
        if not ok:
            self._login = None
            return [
                Log(
                    "warn",
                    "Proxy login failed for {user}",
                    {**fields, "event": Event.PROXY_LOGIN_FAILED},
                ),
                reply(530, "Proxy login incorrect."),
                *self._finish(),
            ]
        self._proxy_ok = True
        effects: list[Effect] = [Log("info", "Proxy user {user} authenticated", fields)]
        target = login.target
        if target is None:
            self._login = None
            text = "Proxy login accepted. Now USER name@host[:port], or OPEN host."
            return [*effects, reply(230, text), *self._finish()]
        if login.style == "proxy-user@host":
            return effects + self._connect_to(target, self._announce(target, 230))
        assert login.site_user is not None
        return effects + self._connect_to(
            target, self._site_login(login.site_user, login.site_password)
        )

    def _connect_to(self, target: UserTarget, then: Callable[[], list[Effect]]) -> list[Effect]:
        self._target = target
        self._after_connect = then
        self._busy = True
        if is_ip_literal(target.host):
            return self.upstream_resolved([target.host])
        return [ResolveUpstream(target.host, target.port)]

    def _site_login(self, user: str, password: str | None) -> Callable[[], list[Effect]]:
        """Log in upstream; with `password` already collected (joined styles) answer the
        upstream's 331 ourselves, so the client gets the reply to its own last command."""

        def on_user(answer: Reply) -> list[Effect]:
            if answer.code == 331 and password is not None:
                return self._send(Command("PASS", password), self._login_reply)
            return self._login_reply(answer)

        return lambda: self._send(Command("USER", user), on_user)

    def _announce(self, target: UserTarget, code: int) -> Callable[[], list[Effect]]:
        text = f"Connected to {target.host}; log in with USER and PASS."
        return lambda: [reply(code, text), *self._finish()]

    def timed_out(self, what: str, mark: int | None = None) -> list[Effect]:
        """A session timer ran out: `login`, `idle`, or `reply` (armed with the mark
        `awaiting_reply` gave). Whether it still counts is decided here: a logged-in session
        has no login timer, a transfer in progress keeps the session from being idle (the
        transfer's own timeouts bound it), and a reply timer counts only if no reply came since
        it was armed. A timer that counts ends the session with 421 (RFC 959 section 4.2),
        except the reply timer of a transfer, which ends only the transfer, with 426."""
        if self.closed:
            return []
        if what == "login" and self.logged_in:
            return []
        if what == "idle" and self.transferring:
            return []
        if what == "reply":
            if mark is None or mark != self.awaiting_reply:
                return []
            return self._reply_timed_out()
        text = {
            "login": "Login timed out; closing the connection.",
            "idle": "Idle timeout; closing the connection.",
        }[what]
        return [
            Log("info", "Session {what} timeout", {"what": what}),
            *self._close(Reply.of(421, text)),
        ]

    def peer_not_reading(self, side: Side, seconds: float) -> list[Effect]:
        """`side` left a full buffer of what the gateway sent it unread for `seconds`: 421 and
        close (RFC 959 section 4.2), so a peer that never reads cannot hold the session."""
        who = "client" if side is Side.CLIENT else "upstream"
        fields = {"side": who, "seconds": seconds, "event": Event.CONTROL_NOT_READ}
        text = f"The {who} did not read the control connection for {seconds:g} seconds; closing."
        return [
            Log("warn", "The {side} left its control connection unread for {seconds} s", fields),
            *self._close(Reply.of(421, text)),
        ]

    def _reply_timed_out(self) -> list[Effect]:
        """The upstream left a command unanswered for `timeouts.reply` seconds."""
        seconds = f"{self.config.reply_timeout:g}"
        log = Log(
            "warn",
            "Upstream {peer} sent no reply within {seconds} seconds",
            {"peer": str(self.upstream_peer), "seconds": seconds, "event": Event.REPLY_TIMEOUT},
        )
        if self._quitting:
            return [log, *self._close(Reply.of(221, "Goodbye."))]
        transfer = self._transfer
        if transfer is not None:
            # Its handlers swallow whatever the upstream still sends for it, so replies stay
            # paired if the upstream wakes up; if it stays silent, the next command's wait
            # runs into this timer again and closes the session.
            transfer.aborted = True
            text = f"Transfer aborted: the upstream server sent no reply within {seconds} seconds."
            return [log, *self._complete(transfer, Reply.of(426, text))]
        text = f"The upstream server sent no reply within {seconds} seconds; closing."
        return [log, *self._close(Reply.of(421, text))]

    def _login_refused(self, text: str) -> list[Effect]:
        self._target = None
        self._expect.clear()
        self.upstream_peer = self.upstream_local = None
        return [reply(530, text), *self._finish()]

    def _on_greeting(self, answer: Reply) -> list[Effect]:
        if not answer.final:
            # Reverse mode shows a 120 "ready in n minutes" as it comes.
            return [ToClient(answer)] if self.fixed_upstream is not None else []
        if self.fixed_upstream is not None:
            # Reverse mode: the client sees the upstream's greeting as its own, once the
            # upstream side is secured, so the client's USER and PASS never go out in clear
            # text when policy wants TLS upstream.
            if not answer.positive:
                return self._close(answer)
            return self._secure_upstream(lambda: [ToClient(answer), *self._finish()])
        target = self._target
        assert target is not None
        if not answer.positive:
            return [
                CloseUpstream(),
                *self._login_refused(f"Upstream {target.host} refused the session: {answer.text}"),
            ]
        then = self._after_connect or self._site_login(target.user, None)
        self._after_connect = None
        return self._secure_upstream(then)

    # ------------------------------------------------------------------ TLS, upstream side

    def _tls_name(self) -> str:
        if self.config.upstream_tls_name:
            return self.config.upstream_tls_name
        if self.fixed_upstream is not None:
            return self.fixed_upstream[0]
        assert self._target is not None
        return self._target.host

    def _secure_upstream(self, then: Callable[[], list[Effect]]) -> list[Effect]:
        """Bring the upstream control connection to the TLS state policy asks for, then
        continue with `then` (RFC 4217 sections 4-9: AUTH TLS, PBSZ 0, PROT P)."""
        mode = self.config.upstream_tls
        if mode == "implicit":
            self.upstream_tls = True
            return self._protect_upstream(then)
        if mode == "required" or (mode == "match_client" and self.client_tls):
            return self._upstream_auth(then)
        if mode != "auto":
            return then()

        def on_feat(answer: Reply) -> list[Effect]:
            if not answer.final:
                return []
            if features.offers_auth_tls(answer):
                return self._upstream_auth(then, optional=True)
            return then()

        return self._send(Command("FEAT", ""), on_feat)

    def _upstream_auth(
        self, then: Callable[[], list[Effect]], *, optional: bool = False
    ) -> list[Effect]:
        def on_auth(answer: Reply) -> list[Effect]:
            if not answer.final:
                return []
            if answer.code != 234 and optional:
                # FEAT listed AUTH TLS, AUTH itself was refused (pure-ftpd built with TLS but
                # run without a certificate does this). Nothing is secured yet and nothing
                # secret was sent: carry on as with a server that never offered TLS.
                log = Log(
                    "warn",
                    "Upstream offered AUTH TLS in FEAT but refused it ({answer}); "
                    "continuing in clear text",
                    {"answer": str(answer)},
                )
                return [log, *then()]
            if answer.code != 234:
                return self._close(
                    Reply.of(
                        421,
                        f"The upstream refused TLS ({answer.code} {answer.lines[0]}); "
                        "policy does not allow continuing in clear text.",
                    )
                )
            self._after_upstream_tls = then
            return [StartUpstreamTLS(self._tls_name())]

        return self._send(Command("AUTH", "TLS"), on_auth)

    def _protect_upstream(self, then: Callable[[], list[Effect]]) -> list[Effect]:
        def on_prot(answer: Reply) -> list[Effect]:
            if not answer.final:
                return []
            if not answer.positive:
                return self._close(
                    Reply.of(421, f"The upstream refused data protection: {answer.text}")
                )
            self._upstream_prot = True
            return then()

        def on_pbsz(answer: Reply) -> list[Effect]:
            if not answer.final:
                return []
            return self._send(Command("PROT", "P"), on_prot)

        return self._send(Command("PBSZ", "0"), on_pbsz)

    # -------------------------------------------------------------------- TLS, client side

    def _auth(self, command: Command) -> list[Effect]:
        mechanism = command.arg.strip().upper()
        if not self.config.client_tls_available:
            return [reply(502, "TLS is not available on this gateway.")]
        if mechanism not in ("TLS", "SSL", "TLS-C", "TLS-P"):
            return [reply(504, "Unknown security mechanism; use AUTH TLS.")]
        if self.client_tls:
            return [reply(503, "TLS is already active.")]
        self.client_tls = True
        if mechanism in ("SSL", "TLS-P"):
            # Old clients: AUTH SSL implied protected data (draft-murray-auth-ftp-ssl).
            self._client_pbsz = self._client_prot = True
        effects: list[Effect] = [reply(234, f"AUTH {mechanism} successful."), StartClientTLS()]
        if (
            self.config.upstream_tls == "match_client"
            and self.upstream_peer is not None
            and not self.upstream_tls
        ):
            self._busy = True
            effects += self._upstream_auth(self._finish)
        return effects

    def _pbsz(self, command: Command) -> list[Effect]:
        if not self.client_tls:
            return [reply(503, "PBSZ needs AUTH TLS first.")]
        self._client_pbsz = True
        # RFC 4217 section 9: the only buffer size for TLS is 0.
        return [reply(200, "PBSZ=0")]

    def _prot(self, command: Command) -> list[Effect]:
        if not self.client_tls:
            return [reply(503, "PROT needs AUTH TLS first.")]
        if not self._client_pbsz:
            return [reply(503, "PROT needs PBSZ first.")]
        level = command.arg.strip().upper()
        if level not in ("C", "P"):
            return [
                reply(
                    536 if level in ("S", "E") else 504,
                    f"Protection level {level!r} is not supported; use C or P.",
                )
            ]
        self._client_prot = level == "P"
        return [reply(200, f"Protection level set to {level}.")]

    def _ccc(self, command: Command) -> list[Effect]:
        # RFC 4217 section 12.2 makes CCC optional; clear text after login helps nobody here.
        return [reply(533, "CCC is refused: the control connection stays encrypted.")]

    def _quit(self) -> list[Effect]:
        if self.upstream_peer is None:
            return self._close(Reply.of(221, "Goodbye."))
        self._busy = self._quitting = True

        def on_reply(answer: Reply) -> list[Effect]:
            return self._close(Reply.of(221, "Goodbye.")) if answer.final else []

        return self._send(Command("QUIT", ""), on_reply)

    def _feat(self, command: Command) -> list[Effect]:
        self._busy = True

        def on_reply(answer: Reply) -> list[Effect]:
            if not answer.final:
                return []
            offered = features.for_client(answer, self.config.client_tls_available)
            return [ToClient(offered), *self._finish()]

        return self._send(command, on_reply)

    def _refuse_long(self, command: Command) -> list[Effect]:
        return [reply(502, "Command not implemented; use EPRT or EPSV.")]

    def _rest(self, command: Command) -> list[Effect]:
        # Held until the transfer command, so nothing (EPSV, PASV) comes between the two on the
        # upstream side: RFC 959 section 4.1.3 says REST is followed by the transfer command.
        if not is_ascii_number(command.arg.strip()):
            return [reply(501, "REST needs a byte offset in ASCII digits.")]
        self._restart = command.arg.strip()
        return [reply(350, f"Restarting at {self._restart}. Send STOR or RETR.")]

    # ----------------------------------------------------------- data channel, client side

    def _port(self, command: Command) -> list[Effect]:
        if self._epsv_all:
            return [reply(503, "Only EPSV is allowed after EPSV ALL (RFC 2428 section 4).")]
        if command.verb == "PORT":
            target = parse_port_argument(command.arg)
        else:
            target = parse_eprt_argument(command.arg)
        if target.unspecified and target.family == self.client_peer.family:
            # 0.0.0.0 or :: names no host, so it can only mean "my own address": lftp, for one,
            # sends EPRT |2|::|port| in active mode over IPv6. The control connection's address
            # is where the gateway connects anyway (RFC 2577 section 3), so this opens no bounce.
            target = HostPort(self.client_peer.host, target.port)
        code, decision = check_data_target(
            self.client_peer.host,
            target,
            allow_foreign=self.config.allow_foreign_data_address,
            own=self.policy.own_addresses,
        )
        if not decision.allowed:
            return [
                Log(
                    "warn",
                    "Refused {verb} to {target} from {client}: {reason}",
                    {
                        "verb": command.verb,
                        "target": str(target),
                        "reason": decision.reason,
                        "event": Event.REFUSED,
                        "refused": "data_target",
                    },
                ),
                reply(code, f"Illegal {command.verb} command: {decision.reason}."),
            ]
        effects = self._drop_client_data()
        self._client_data = ClientData(command.verb, self._client_prot, target=target)
        return [*effects, reply(200, f"{command.verb} command successful.")]

    def _pasv(self, command: Command) -> list[Effect]:
        if command.verb == "PASV":
            if self._epsv_all:
                return [reply(503, "Only EPSV is allowed after EPSV ALL (RFC 2428 section 4).")]
            if self.client_local.family != 4:
                return [reply(522, "PASV cannot describe an IPv6 address; use EPSV.")]
        else:
            requested = parse_epsv_argument(command.arg)
            if requested == "ALL":
                self._epsv_all = True
                return [reply(200, "EPSV ALL accepted.")]
            supported = 1 if self.client_local.family == 4 else 2
            if requested is not None and requested != supported:
                # RFC 2428 section 3: answer 522 naming the protocol the server can use.
                return [reply(522, f"Network protocol not supported, use ({supported}).")]
        effects = self._drop_client_data()
        self._client_data = ClientData(command.verb, self._client_prot)
        self._busy = True
        return [*effects, ListenData(Side.CLIENT, tls=self._client_prot)]

    def _drop_client_data(self) -> list[Effect]:
        """A new PORT/PASV replaces the previous one, closing its listener or connection."""
        if self._client_data is None:
            return []
        self._client_data = None
        return [CloseData()]

    # -------------------------------------------------------------------------- transfers

    def _begin_transfer(self, command: Command) -> list[Effect]:
        client = self._client_data
        if client is None:
            return [reply(425, "Use PORT, EPRT, PASV or EPSV first.")]
        if self.config.client_tls == "required" and not client.tls:
            # RFC 4217 section 9: 521 when policy refuses the data protection level.
            return [reply(521, "Data connections must be protected: send PROT P first.")]
        self._client_data = None
        if client.failure is not None:
            return [CloseData(), reply(425, f"Cannot open data connection: {client.failure}.")]
        transfer = Transfer(
            command,
            TRANSFER_SOURCES[command.verb],
            client,
            restart=self._restart,
            client_connected=client.connected,
        )
        self._restart = None
        self._transfer = transfer
        self._busy = True
        assert self.upstream_peer is not None
        mode = upstream_mode(
            self.config.upstream_data_mode,
            client.verb,
            self._epsv_refused,
            self.upstream_peer.family,
        )
        if mode == "active":
            transfer.upstream_active = True
            return [ListenData(Side.UPSTREAM, tls=self._upstream_prot)]
        if mode == "epsv":
            return self._send(Command("EPSV", ""), lambda r: self._on_epsv(transfer, r))
        return self._send(Command("PASV", ""), lambda r: self._on_pasv(transfer, r))

    def _on_epsv(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if transfer.aborted or not answer.final:
            return []
        assert self.upstream_peer is not None
        if answer.code == 229:
            port = parse_epsv_reply(answer.text)
            target = HostPort.of(self.upstream_peer.host, port)
            return [ConnectData(Side.UPSTREAM, target, tls=self._upstream_prot)]
        if self.config.upstream_data_mode == "passive" and answer.permanent:
            # RFC 2428 section 3: a server without EPSV answers 500/502; fall back to PASV and
            # remember, so later transfers in this session go straight to PASV.
            self._epsv_refused = True
            if self.upstream_peer.family == 4:
                return self._send(Command("PASV", ""), lambda r: self._on_pasv(transfer, r))
        return self._complete(transfer, Reply.of(425, f"Upstream refused EPSV: {answer.text}"))

    def _on_pasv(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if transfer.aborted or not answer.final:
            return []
        assert self.upstream_peer is not None
        if answer.code != 227:
            return self._complete(transfer, Reply.of(425, f"Upstream refused PASV: {answer.text}"))
        named = parse_pasv_reply(answer.text)
        effects: list[Effect] = []
        target = HostPort.of(self.upstream_peer.host, named.port)
        if named.host != self.upstream_peer.host:
            if (
                self.config.follow_pasv_address
                and self.policy.check(named.host, named.port).allowed
            ):
                target = named
            else:
                effects.append(
                    Log(
                        "warn",
                        "Upstream {peer} named {named} in its 227 reply; connecting to "
                        "{target} instead (possible reverse bounce)",
                        {
                            "peer": str(self.upstream_peer),
                            "named": str(named),
                            "target": str(target),
                        },
                    )
                )
        return [*effects, ConnectData(Side.UPSTREAM, target, tls=self._upstream_prot)]

    def _on_port(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if transfer.aborted or not answer.final:
            return []
        if not answer.positive:
            return self._complete(transfer, Reply.of(425, f"Upstream refused PORT: {answer.text}"))
        return self._send_transfer(transfer)

    def _send_transfer(self, transfer: Transfer) -> list[Effect]:
        transfer.command_sent = True
        if transfer.restart is None:
            return self._send(transfer.command, lambda r: self._on_transfer(transfer, r))

        def on_rest(answer: Reply) -> list[Effect]:
            if transfer.aborted or not answer.final:
                return []
            if answer.code != 350:
                # Nothing was started upstream: the data connection is useless now.
                return self._complete(transfer, answer)
            return self._send(transfer.command, lambda r: self._on_transfer(transfer, r))

        return self._send(Command("REST", transfer.restart), on_rest)

    def _on_transfer(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        if transfer.aborted:
            return []
        effects: list[Effect] = []
        if answer.preliminary:
            if not transfer.preliminary_sent:
                transfer.preliminary_sent = True
                effects.append(ToClient(answer))
            return effects + self._connect_client(transfer)
        transfer.upstream_final = answer
        if answer.positive and transfer.upstream_opened:
            # Some servers skip the 1xx of an empty transfer; their data connection exists,
            # so the client's is opened too and the relay decides (`final_reply`).
            effects += self._connect_client(transfer)
        return effects + self._maybe_complete(transfer)

    def _connect_client(self, transfer: Transfer) -> list[Effect]:
        """Active mode: connect to the client's PORT/EPRT address, once. RFC 959 section 3.2:
        the server connects after its 1xx."""
        target = transfer.client.target
        if target is None or transfer.client_connecting:
            return []
        transfer.client_connecting = True
        return [ConnectData(Side.CLIENT, target, tls=transfer.client.tls)]

    def _maybe_start_relay(self, transfer: Transfer) -> list[Effect]:
        if (
            transfer.client_connected
            and transfer.upstream_connected
            and not transfer.relay_started
            and transfer.relay_result is None
        ):
            transfer.relay_started = True
            return [StartRelay(transfer.source)]
        return []

    def _maybe_complete(self, transfer: Transfer) -> list[Effect]:
        answer = final_reply(transfer)
        return [] if answer is None else self._complete(transfer, answer)

    def _complete(self, transfer: Transfer, answer: Reply) -> list[Effect]:
        """Give the client the transfer's one final reply and end the transfer."""
        if self._transfer is not transfer:
            return []
        self._transfer = None
        record = Log(
            "info" if answer.positive else "warn",
            "Transfer {verb} {path} via {upstream}: {code} {text}",
            {
                "verb": transfer.command.verb,
                "path": transfer.command.arg,
                "upstream": str(self.upstream_peer),
                "code": answer.code,
                "text": answer.lines[0],
                "direction": "download" if transfer.source is Side.UPSTREAM else "upload",
                "user": self.user,
                "type": self.transfer_type,
                "event": Event.TRANSFER_FINISHED,
            },
        )
        return [CloseData(), ToClient(answer), record, *self._finish()]

    def _abort(self) -> list[Effect]:
        """ABOR during a transfer (RFC 959 section 4.1.3): close both data sides, tell the
        upstream, answer 426 for the transfer and 226 for the ABOR, in that order."""
        transfer = self._transfer
        assert transfer is not None
        transfer.aborted = True
        self._transfer = None
        # Every upstream reply still owed for this transfer is swallowed by its handler (they
        # check `aborted`); the ABOR's own reply is swallowed here.
        record = Log(
            "info",
            "Transfer {verb} {path} aborted by client",
            {
                "verb": transfer.command.verb,
                "path": transfer.command.arg,
                "upstream": str(self.upstream_peer),
                "direction": "download" if transfer.source is Side.UPSTREAM else "upload",
                "user": self.user,
                "type": self.transfer_type,
                "event": Event.TRANSFER_ABORTED,
            },
        )
        effects: list[Effect] = [CloseData(), record]
        effects += self._send(Command("ABOR", ""), lambda r: [])
        effects += [
            reply(426, "Connection closed; transfer aborted."),
            reply(226, "ABOR command successful."),
        ]
        return effects + self._finish()

    # ------------------------------------------------------------------------------ helpers

    def _send(self, command: Command, handler: Handler) -> list[Effect]:
        if command.verb == "USER":
            self.user = command.arg
        self.sent += 1
        self._expect.append((self.sent, handler))
        return [ToUpstream(command)]

    def _finish(self) -> list[Effect]:
        """The client command in progress has its final reply: serve the queued ones, or,
        while the gateway shuts down, say so and close."""
        self._busy = False
        if self._shutting_down:
            return self._close(Reply.of(421, SHUTDOWN_TEXT))
        if self._draining:
            return []
        self._draining = True
        effects: list[Effect] = []
        try:
            while not self._busy and self._queue and not self.closed:
                effects += self._dispatch(self._queue.popleft())
        finally:
            self._draining = False
        return effects

    def _close(self, last: Reply | None) -> list[Effect]:
        if self.closed:
            return []
        self.closed = True
        effects: list[Effect] = [ToClient(last)] if last is not None else []
        return [*self._unsolicited_summary(), *effects, CloseData(), CloseClient(), CloseUpstream()]


_COMMANDS: dict[str, Callable[[Session, Command], list[Effect]]] = {
    "PORT": Session._port,
    "EPRT": Session._port,
    "PASV": Session._pasv,
    "EPSV": Session._pasv,
    "LPRT": Session._refuse_long,
    "LPSV": Session._refuse_long,
    "FEAT": Session._feat,
    "REST": Session._rest,
}


_TLS_COMMANDS: dict[str, Callable[[Session, Command], list[Effect]]] = {
    "AUTH": Session._auth,
    "PBSZ": Session._pbsz,
    "PROT": Session._prot,
    "CCC": Session._ccc,
}


def _upstream_denied(host: str, reason: str) -> Log:
    """The log line (and metrics event) for an upstream the policy refused."""
    fields = {"host": host, "reason": reason, "event": Event.REFUSED, "refused": "upstream"}
    return Log("warn", "Upstream {host} denied by policy: {reason}", fields)


def _pre_login_text(verb: str) -> str:
    return "OK." if verb == "NOOP" else f"{verb} is available after USER name@host[:port]."
