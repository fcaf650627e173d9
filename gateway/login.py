"""Forward mode's login: the gateway's own credentials (proxy login), then the upstream the
client names, then the login there. Pure, no I/O.

Proxy-aware clients log in to a proxy in a few established styles; lftp's
`ftp:proxy-auth-type` names them, and the gateway accepts each:

- user:             USER proxyuser; PASS proxypassword; then USER name@host or OPEN host
- proxy-user@host:  USER proxyuser@host; PASS proxypassword; then USER and PASS for the site
- joined:           USER user@proxyuser@host; PASS password@proxypassword
- joined-acct:      USER user@host proxyuser; PASS password; ACCT proxypassword

Without proxy authentication, `USER name@host[:port]` alone chooses the upstream. Either way the
upstream is resolved once, judged by policy, and connected to at exactly the approved address;
what happens once it has greeted (and is secured) is a `Plan`, decided when the client chose it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.addresses import (
    HostPort,
    UserTarget,
    is_ip_literal,
    parse_host_port,
    parse_user_target,
)
from gateway.codec import Command, Reply
from gateway.effects import Authenticate, CloseUpstream, Effect, Log, ResolveUpstream, ToClient
from gateway.events import Event
from gateway.policy import UpstreamPolicy
from gateway.view import Phase, SessionView

ProxyLoginStyle = Literal["user", "proxy-user@host", "joined", "joined-acct"]


@dataclass(slots=True)
class ProxyLogin:
    """A login to the gateway in progress."""

    style: ProxyLoginStyle
    proxy_user: str
    target: UserTarget | None = None
    site_user: str | None = None
    site_password: str | None = None


def begin(arg: str) -> tuple[ProxyLogin, str]:
    """The login that USER `arg` starts, and the text of the 331 that asks for what comes next.
    Raises ClientProtocolError (501) for a malformed host or port."""
    name, space, account = arg.partition(" ")
    if space and "@" in name:
        target = parse_user_target(name)
        assert target is not None
        login = ProxyLogin("joined-acct", account.strip(), target, target.user)
        return login, "Password required."
    target = parse_user_target(arg)
    if target is not None and "@" in target.user:
        site_user, _, proxy_user = target.user.rpartition("@")
        site = UserTarget(site_user, target.host, target.port)
        return ProxyLogin("joined", proxy_user, site, site_user), (
            "Password required: send password@proxy_password."
        )
    if target is not None:
        login = ProxyLogin("proxy-user@host", target.user, target)
        return login, f"Proxy password required for {target.user}."
    return ProxyLogin("user", arg), f"Proxy password required for {arg}."


def split_joined_password(arg: str) -> tuple[str, str] | None:
    """`password@proxypassword` (joined style) as (site password, proxy password), or None.
    The proxy password follows the last "@", so site passwords may contain one."""
    site_password, sep, proxy_password = arg.rpartition("@")
    return (site_password, proxy_password) if sep else None


@dataclass(frozen=True, slots=True)
class SiteLogin:
    """Once connected, log in upstream as `user`. With `password` already collected (joined
    styles) the gateway answers the upstream's 331 itself, so the client gets the reply to its
    own last command."""

    user: str
    password: str | None = None


@dataclass(frozen=True, slots=True)
class Announce:
    """Once connected, tell the client with `code` (220 after OPEN, 230 after a proxy login
    that named the host) and let it log in with USER and PASS."""

    code: int


Plan = SiteLogin | Announce


class LoginView(SessionView, Protocol):
    """What the login needs of the session beyond `SessionView`."""

    def enter(self, phase: Phase) -> None: ...

    def connect(self, host: str, port: int) -> list[Effect]:
        """The effect that opens the upstream control connection to an approved address."""
        ...

    def forget_upstream(self) -> None:
        """The upstream chosen is refused or gone: the client may choose another."""
        ...

    def pass_through(self, command: Command) -> list[Effect]:
        """Send `command` upstream and give the client every reply to it."""
        ...

    def pass_back(self, answer: Reply, *, login: bool = False) -> list[Effect]:
        """Give the client the upstream's final `answer` to a command passed through;
        `login`: to USER, PASS or ACCT."""
        ...


class Login:
    """Forward mode's login machine (see the module docstring)."""

    def __init__(self, view: LoginView, *, proxy_auth: bool) -> None:
        self._view = view
        self.proxy_ok = not proxy_auth
        #: The proxy user the gateway accepted, once it has.
        self.proxy_user: str | None = None
        self._pending: ProxyLogin | None = None
        #: The upstream the client chose, once chosen.
        self.target: UserTarget | None = None
        self._plan: Plan | None = None

    # ---------------------------------------------------------------- client commands

    def user(self, command: Command) -> list[Effect]:
        if not self.proxy_ok and self._view.upstream_peer is None:
            # USER while the gateway still needs the proxy credentials.
            self._pending, text = begin(command.arg)
            return self._view.answer(Reply.of(331, text))
        target = parse_user_target(command.arg)
        current = self.target
        if self._view.upstream_peer is not None:
            if (
                target is not None
                and current is not None
                and (target.host, target.port) != (current.host, current.port)
            ):
                text = f"Already connected to {current.host}; reconnect to change."
                return self._view.answer(Reply.of(530, text))
            user = target.user if target is not None else command.arg
            return self._view.pass_through(Command("USER", user))
        if target is None:
            text = "Log in as USER name@host[:port] to choose the upstream server."
            return self._view.answer(Reply.of(530, text))
        return self._connect_to(target, SiteLogin(target.user))

    def password(self, command: Command) -> list[Effect]:
        """PASS before an upstream is chosen: the proxy password (or both, joined style)."""
        login = self._pending
        if login is None or self.proxy_ok:
            return self._view.answer(Reply.of(503, "Log in with USER name@host[:port] first."))
        if login.style == "joined":
            passwords = split_joined_password(command.arg)
            if passwords is None:
                self._pending = None
                text = "Send the password as password@proxy_password."
                return self._view.answer(Reply.of(530, text))
            login.site_password, proxy_password = passwords
            return self._authenticate(login.proxy_user, proxy_password)
        if login.style == "joined-acct":
            login.site_password = command.arg
            text = "Proxy password required: send it with ACCT."
            return self._view.answer(Reply.of(332, text))
        return self._authenticate(login.proxy_user, command.arg)

    def account(self, command: Command) -> list[Effect]:
        login = self._pending
        if login is None or login.style != "joined-acct" or login.site_password is None:
            return self._view.answer(Reply.of(503, "ACCT is not expected now."))
        return self._authenticate(login.proxy_user, command.arg)

    def open(self, command: Command) -> list[Effect]:
        """OPEN host[:port] (or SITE host) after a proxy login: connect without logging in."""
        try:
            host, port = parse_host_port(command.arg, 21)
        except ValueError as e:
            return self._view.answer(Reply.of(501, f"{command.verb} needs a host[:port]: {e}."))
        return self._connect_to(UserTarget("", host, port), Announce(220))

    def handler(self, command: Command) -> Callable[[Command], list[Effect]] | None:
        """The login's handler for `command`, if the login takes it now."""
        if command.verb == "USER":
            return self.user
        if self._view.upstream_peer is not None:
            return None
        if command.verb == "PASS":
            return self.password
        if command.verb == "ACCT":
            return self.account
        if command.verb in ("OPEN", "SITE") and self.proxy_ok and command.arg:
            return self.open
        return None

    def _authenticate(self, user: str, password: str) -> list[Effect]:
        return [Authenticate(user, password)]

    # ------------------------------------------------------------- answers from the shell

    def proxy_auth_result(
        self,
        ok: bool,
        *,
        throttled: bool = False,
        unavailable: bool = False,
        groups: frozenset[str] = frozenset(),
    ) -> list[Effect]:
        """The proxy credentials were checked (`twisted.cred`, in the shell); `groups` are
        unused here: only reverse mode's routes (`gateway.routelogin`) match them."""
        login = self._pending
        if login is None:
            return []
        fields = {"user": login.proxy_user}
        closing = proxy_check_closes(self._view, login.proxy_user, throttled, unavailable)
        if closing is not None:
            return closing
        if not ok:
            self._pending = None
            return proxy_login_refused(self._view, login.proxy_user)
        self.proxy_ok = True
        self.proxy_user = login.proxy_user
        self._view.enter(Phase.LOGIN)
        fields["event"] = Event.PROXY_LOGGED_IN
        effects: list[Effect] = [Log("info", "Proxy user {user} authenticated", fields)]
        target = login.target
        if target is None:
            self._pending = None
            text = "Proxy login accepted. Now USER name@host[:port], or OPEN host."
            return [*effects, *self._view.answer(Reply.of(230, text))]
        if login.style == "proxy-user@host":
            return effects + self._connect_to(target, Announce(230))
        assert login.site_user is not None
        return effects + self._connect_to(target, SiteLogin(login.site_user, login.site_password))

    def _connect_to(self, target: UserTarget, plan: Plan) -> list[Effect]:
        self.target, self._plan = target, plan
        self._view.enter(Phase.GREETING)
        if is_ip_literal(target.host):
            return self.resolved([target.host])
        return [ResolveUpstream(target.host, target.port)]

    def resolved(self, addresses: list[str], error: str | None = None) -> list[Effect]:
        """The upstream name resolved to `addresses` (empty on failure): judge and connect."""
        target = self.target
        if target is None:
            return []
        if not addresses:
            return self.refused(f"Cannot resolve {target.host}: {error or 'no address'}.")
        chosen, decision = self._view.policy.choose(addresses, target.port, target.host)
        if chosen is None:
            return [
                upstream_denied(target.host, decision.reason),
                *self.refused(f"Upstream {target.host} is denied by policy: {decision.reason}."),
            ]
        return self._view.connect(chosen, target.port)

    def connect_failed(self, reason: str) -> list[Effect]:
        target = self.target
        where = f"{target.host}:{target.port}" if target else "the upstream"
        return self.refused(f"Cannot connect to {where}: {reason}.")

    def greeted(self, answer: Reply) -> list[Effect]:
        """The upstream's final greeting; 2xx goes on to securing it (the session does that)."""
        target = self.target
        assert target is not None
        text = f"Upstream {target.host} refused the session: {answer.text}"
        return [CloseUpstream(), *self.refused(text)]

    def upstream_ready(self) -> list[Effect]:
        """The upstream greeted and is as secure as policy wants: carry out the plan."""
        self._view.enter(Phase.LOGIN)
        target = self.target
        assert target is not None
        plan = self._plan
        assert plan is not None
        if isinstance(plan, Announce):
            text = f"Connected to {target.host}; log in with USER and PASS."
            return self._view.answer(Reply.of(plan.code, text))
        return log_in_upstream(self._view, plan.user, plan.password)

    def refused(self, text: str) -> list[Effect]:
        """The chosen upstream cannot be used: forget it and answer 530."""
        self.target = None
        self._view.forget_upstream()
        self._view.enter(Phase.LOGIN)
        return self._view.answer(Reply.of(530, text))


def log_in_upstream(view: LoginView, user: str, password: str | None) -> list[Effect]:
    """Send USER upstream and, on 331, the PASS the gateway holds; any other answer (and the
    answer to PASS) goes to the client as the login's reply."""

    def on_user(answer: Reply) -> list[Effect]:
        if answer.code == 331 and password is not None:
            return view.pass_through(Command("PASS", password))
        return view.pass_back(answer, login=True)

    return view.send(Command("USER", user), on_user, on_preliminary=lambda r: [ToClient(r)])


def proxy_check_closes(
    view: SessionView, user: str, throttled: bool, unavailable: bool
) -> list[Effect] | None:
    """A proxy-credential check that ends the session: the client's address has failed too
    often, or the user store cannot answer (421, RFC 959 section 4.2). None otherwise."""
    if throttled:
        log = Log(
            "warn",
            "Proxy login for {user} refused: too many failures",
            {"user": user, "event": Event.REFUSED, "refused": "login_throttle"},
        )
        text = "Too many failed logins from your address; try later."
        return [log, *view.close(Reply.of(421, text))]
    if unavailable:
        text = "Proxy login cannot be checked now (user store unavailable); try later."
        return view.close(Reply.of(421, text))
    return None


def proxy_login_refused(view: SessionView, user: str) -> list[Effect]:
    """Wrong proxy credentials: logged, and the login command answered with 530."""
    log = Log(
        "warn", "Proxy login failed for {user}", {"user": user, "event": Event.PROXY_LOGIN_FAILED}
    )
    return [log, *view.answer(Reply.of(530, "Proxy login incorrect."))]


def check_destination(
    destination: HostPort | None, policy: UpstreamPolicy
) -> tuple[list[Effect], Reply] | None:
    """Transparent mode: the log lines and the 421 that refuse a connection that was not
    redirected, or whose original destination the upstream policy denies (the gateway must not
    become an open relay to addresses its owner did not allow); None to go on."""
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
        return [log], Reply.of(421, text)
    decision = policy.check(destination.host, destination.port)
    if decision.allowed:
        return None
    text = f"Upstream {destination} is denied by policy: {decision.reason}."
    return [upstream_denied(str(destination), decision.reason)], Reply.of(421, text)


def upstream_denied(host: str, reason: str) -> Log:
    """The log line (and metrics event) for an upstream the policy refused."""
    fields = {"host": host, "reason": reason, "event": Event.REFUSED, "refused": "upstream"}
    return Log("warn", "Upstream {host} denied by policy: {reason}", fields)
