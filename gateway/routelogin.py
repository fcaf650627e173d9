"""Reverse mode's login when the backend depends on who logs in: pure, no I/O.

With `[[routes]]`, `balance = "user_hash"` or a proxy login (`proxy_auth`) in reverse mode,
the gateway cannot connect before it knows the user. It greets with its own 220, takes USER
(and, with a proxy login, PASS, checked by `twisted.cred` in the shell), decides the route
(`gateway.routes`), and asks the shell for a backend among the route's (`ConnectBackend`). Once
that backend has greeted and is as secure as policy wants, the gateway logs in there with the
route's name, and with the route's password or the client's own: the client gets the backend's
reply to its USER (331) or, when the gateway already has the password, to its PASS (230).

A login name no route matches gets 530 and may try another; a proxy login that fails counts
against the client's address like any other (`limits.max_failed_logins`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.backends import backend_groups
from gateway.codec import Command, Reply
from gateway.effects import Authenticate, ConnectBackend, Effect, Log
from gateway.events import Event
from gateway.login import LoginView, log_in_upstream, proxy_check_closes, proxy_login_refused
from gateway.routes import Decision, decide
from gateway.view import Phase

#: What the client may send before it is connected to a backend, other than USER and PASS.
_BEFORE_LOGIN = {"NOOP": Reply.of(200, "OK.")}
_LOG_IN_FIRST = "Please log in with USER and PASS first."


@dataclass(slots=True)
class _Upstream:
    """Once connected: log in as `user`, with `password` if the gateway already has one."""

    user: str
    password: str | None = field(default=None, repr=False)


class RouteLogin:
    """See the module docstring. Same face to the session as `gateway.login.Login`."""

    def __init__(self, view: LoginView) -> None:
        self._view = view
        config = view.config
        self._proxy_auth = bool(config.proxy_auth)
        self._routes = config.routes
        self._groups = backend_groups(config.pool_backends)
        #: The login name the client gave, while its proxy password is due.
        self._pending: str | None = None
        #: Who the proxy login authenticated, once it did (`limits.rate_per_user` counts by it).
        self.proxy_user: str | None = None
        self._plan: _Upstream | None = None

    def handler(self, command: Command) -> Callable[[Command], list[Effect]] | None:
        """The login's handler for `command`: every command while no backend is connected;
        then USER only, which would log in as a name no route decided (or, behind a proxy
        login, try other accounts on the backend)."""
        if self._view.upstream_peer is not None:
            return self._relogin if command.verb == "USER" else None
        if command.verb == "USER":
            return self.user
        if command.verb == "PASS":
            return self.password
        return self._before_login

    def _relogin(self, command: Command) -> list[Effect]:
        return self._view.answer(Reply.of(530, "Reconnect to log in as another user."))

    def _before_login(self, command: Command) -> list[Effect]:
        answer = _BEFORE_LOGIN.get(command.verb, Reply.of(530, _LOG_IN_FIRST))
        return self._view.answer(answer)

    def user(self, command: Command) -> list[Effect]:
        name = command.arg
        if not name:
            return self._view.answer(Reply.of(501, "USER needs a login name."))
        if self._proxy_auth:
            self._pending = name
            self._view.enter(Phase.PROXY_LOGIN)
            return self._view.answer(Reply.of(331, f"Password required for {name}."))
        return self._route(name, frozenset(), None)

    def password(self, command: Command) -> list[Effect]:
        name = self._pending
        if name is None:
            return self._view.answer(Reply.of(503, "Log in with USER first."))
        self._plan = _Upstream(name, command.arg)  # the client's password, until routed
        return [Authenticate(name, command.arg)]

    def proxy_auth_result(
        self,
        ok: bool,
        *,
        throttled: bool = False,
        unavailable: bool = False,
        groups: frozenset[str] = frozenset(),
    ) -> list[Effect]:
        """The proxy credentials were checked; `groups`: the directory groups the login was
        found in (`ProxyIdentity.groups`), for routes with `proxy_group`."""
        name, plan = self._pending, self._plan
        if name is None or plan is None:
            return []
        closing = proxy_check_closes(self._view, name, throttled, unavailable)
        if closing is not None:
            return closing
        self._pending = self._plan = None
        if not ok:
            self._view.enter(Phase.PROXY_LOGIN)
            return proxy_login_refused(self._view, name)
        self.proxy_user = name
        fields = {"user": name, "event": Event.PROXY_LOGGED_IN}
        log = Log("info", "Proxy user {user} authenticated", fields)
        return [log, *self._route(name, groups, plan.password)]

    def _refuse_route(self, name: str, log_format: str, text: str) -> list[Effect]:
        """The routes give `name` nowhere to go: 530 with `text`, and the login starts over."""
        log = Log("warn", log_format, {"user": name, "event": Event.REFUSED, "refused": "route"})
        self._view.enter(Phase.PROXY_LOGIN if self._proxy_auth else Phase.LOGIN)
        return [log, *self._view.answer(Reply.of(530, text))]

    def _route(self, name: str, groups: frozenset[str], password: str | None) -> list[Effect]:
        """Send the session where the routes say, or refuse the name with 530."""
        if self._routes:
            decision: Decision | None = decide(self._routes, name, groups, self._groups)
            if decision is None:
                return self._refuse_route(
                    name, "No route for user {user}", "No route for this user on this gateway."
                )
            user = decision.upstream_user
            if not user:
                # "USER @site-b" with upstream_user = "{local}": an empty USER upstream would
                # get a 501 the client cannot make sense of, with no way to log in again.
                return self._refuse_route(
                    name,
                    "Route for user {user} gives an empty upstream name",
                    "The route for this user gives no name to log in with.",
                )
            password = decision.upstream_password or password
            names: frozenset[str] | None = decision.names
        else:
            user, names = name, None
        self._plan = _Upstream(user, password)
        self._view.enter(Phase.GREETING)
        log = Log(
            "info",
            "User {user} routed to {backends} as {upstream_user}",
            {
                "user": name,
                "backends": ", ".join(sorted(names)) if names is not None else "any backend",
                "upstream_user": user,
                "event": Event.ROUTED,
            },
        )
        return [log, ConnectBackend(user=name, names=names)]

    def greeted(self, answer: Reply) -> list[Effect]:
        """Not reached: the shell hands over only backends that greeted with 220."""
        return self._view.close(Reply.of(421, f"Backend refused the session: {answer.text}"))

    def upstream_ready(self) -> list[Effect]:
        """The backend greeted and is secured: log in there as the route says."""
        self._view.enter(Phase.LOGIN)
        plan = self._plan
        assert plan is not None
        self._plan = None
        return log_in_upstream(self._view, plan.user, plan.password)
