"""Reverse mode by user (routes, user_hash, proxy logins): the pure session, driven by hand."""

from __future__ import annotations

from gateway.addresses import HostPort
from gateway.codec import Command, CommandReader, Reply
from gateway.config import Config, build
from gateway.effects import Authenticate, CloseClient, ConnectBackend, Log, ToClient, ToUpstream
from gateway.events import Event
from gateway.session import Session

CLIENT = HostPort.of("192.0.2.10", 40000)
LOCAL = HostPort.of("192.0.2.1", 2121)
UP_LOCAL = HostPort.of("198.51.100.1", 50000)
UP_PEER = HostPort.of("203.0.113.5", 21)
BACKENDS = [
    {"name": "a", "address": "203.0.113.5:21", "group": "east"},
    {"name": "b", "address": "203.0.113.6:21", "group": "east"},
    {"name": "c", "address": "203.0.113.7:21"},
]


def line(text: str) -> Command:
    (event,) = CommandReader().feed(text.encode() + b"\r\n")
    assert isinstance(event, Command)
    return event


def replies(effects: list[object]) -> list[tuple[int, str]]:
    return [(e.reply.code, e.reply.text) for e in effects if isinstance(e, ToClient)]


def sent(effects: list[object]) -> list[str]:
    return [
        f"{e.command.verb} {e.command.arg}".strip() for e in effects if isinstance(e, ToUpstream)
    ]


def started(config: Config) -> Session:
    session = Session(config, client_peer=CLIENT, client_local=LOCAL)
    assert replies(session.start()) == [(220, "FTP gateway ready.")]
    return session


def connect(session: Session, config: Config, name: str) -> list[object]:
    """The shell connected backend `name`, which greets; the effects of its greeting."""
    backend = next(b for b in config.backends if b.name == name)
    session.backend_connected(config.for_backend(backend))
    session.upstream_connected(UP_LOCAL, UP_PEER)
    return list(session.upstream_reply(Reply.of(220, "backend ready")))


ROUTED = build(
    {
        "backends": BACKENDS,
        "tls.upstream": "off",
        "routes": [
            {"user": "*@east", "backend_group": "east", "upstream_user": "{local}"},
            {"user": "carol", "backend": "c"},
        ],
    }
)


def test_user_is_routed_and_rewritten_before_connecting() -> None:
    s = started(ROUTED)
    effects = s.client_line(line("USER alice@east"))
    assert [e for e in effects if not isinstance(e, Log)] == [
        ConnectBackend(user="alice@east", names=frozenset({"a", "b"}))
    ]
    # The client's PASS waits until the backend answered the USER the gateway sends.
    assert s.client_line(line("PASS secret")) == []
    effects = connect(s, ROUTED, "a")
    assert sent(effects) == ["USER alice"] and replies(effects) == []
    effects = s.upstream_reply(Reply.of(331, "Password please."))
    assert replies(effects) == [(331, "Password please.")]
    assert sent(effects) == ["PASS secret"]
    assert replies(s.upstream_reply(Reply.of(230, "Welcome."))) == [(230, "Welcome.")]
    assert s.logged_in


def test_a_name_no_route_matches_gets_530_and_may_try_again() -> None:
    s = started(ROUTED)
    effects = s.client_line(line("USER mallory"))
    assert replies(effects) == [(530, "No route for this user on this gateway.")]
    assert not any(isinstance(e, ConnectBackend) for e in effects)
    logs = [e for e in effects if isinstance(e, Log)]
    assert logs[0].fields["event"] == "refused" and logs[0].fields["refused"] == "route"
    assert s.client_line(line("USER carol"))[-1] == ConnectBackend(
        user="carol", names=frozenset({"c"})
    )


def test_before_login_only_noop_is_answered() -> None:
    s = started(ROUTED)
    assert replies(s.client_line(line("NOOP"))) == [(200, "OK.")]
    assert replies(s.client_line(line("LIST"))) == [
        (530, "Please log in with USER and PASS first.")
    ]
    assert replies(s.client_line(line("PASS x"))) == [(503, "Log in with USER first.")]


def test_user_hash_without_routes_connects_by_the_login_name() -> None:
    config = build({"backends": BACKENDS, "balance": "user_hash", "tls.upstream": "off"})
    s = started(config)
    assert s.client_line(line("USER bob")) == [
        Log(
            "info",
            "User {user} routed to {backends} as {upstream_user}",
            {
                "user": "bob",
                "backends": "any backend",
                "upstream_user": "bob",
                "event": Event.ROUTED,
            },
        ),
        ConnectBackend(user="bob", names=None),
    ]
    assert sent(connect(s, config, "b")) == ["USER bob"]


PROXIED = build(
    {
        "backends": BACKENDS,
        "tls.upstream": "off",
        "proxy_auth": ["memory:alice:pw"],
        "routes": [
            {
                "user": "alice",
                "proxy_group": "cn=ops",
                "backend": "c",
                "upstream_user": "svc-ops",
                "upstream_password": "route-secret",
            },
            {"user": "alice", "backend": "a", "upstream_user": "svc", "upstream_password": "s2"},
            {"user": "*", "backend_group": "east"},
        ],
    }
)


def test_route_account_logs_in_upstream_after_the_proxy_login() -> None:
    s = started(PROXIED)
    assert replies(s.client_line(line("USER alice"))) == [(331, "Password required for alice.")]
    assert s.client_line(line("PASS pw")) == [Authenticate("alice", "pw")]
    effects = s.proxy_auth_result(True, groups=frozenset({"cn=ops"}))
    assert effects[-1] == ConnectBackend(user="alice", names=frozenset({"c"}))
    assert sent(connect(s, PROXIED, "c")) == ["USER svc-ops"]
    effects = s.upstream_reply(Reply.of(331, "Password please."))
    assert sent(effects) == ["PASS route-secret"] and replies(effects) == []
    # The route's password is in no log line, and the command logs masked.
    assert not [e for e in effects if isinstance(e, Log) and "route-secret" in repr(e)]
    assert [str(e.command) for e in effects if isinstance(e, ToUpstream)] == ["PASS ****"]
    assert replies(s.upstream_reply(Reply.of(230, "In."))) == [(230, "In.")]


def test_proxy_group_decides_between_routes() -> None:
    s = started(PROXIED)
    s.client_line(line("USER alice"))
    s.client_line(line("PASS pw"))
    effects = s.proxy_auth_result(True, groups=frozenset())
    assert effects[-1] == ConnectBackend(user="alice", names=frozenset({"a"}))


def test_without_a_route_password_the_clients_own_goes_upstream() -> None:
    s = started(PROXIED)
    s.client_line(line("USER bob"))
    s.client_line(line("PASS bobs-pw"))
    assert s.proxy_auth_result(True)[-1] == ConnectBackend(user="bob", names=frozenset({"a", "b"}))
    assert sent(connect(s, PROXIED, "b")) == ["USER bob"]
    assert sent(s.upstream_reply(Reply.of(331, "Password please."))) == ["PASS bobs-pw"]


def test_failed_and_throttled_proxy_logins() -> None:
    s = started(PROXIED)
    s.client_line(line("USER alice"))
    s.client_line(line("PASS wrong"))
    effects = s.proxy_auth_result(False)
    assert replies(effects) == [(530, "Proxy login incorrect.")]
    assert not any(isinstance(e, ConnectBackend) for e in effects)
    s.client_line(line("USER alice"))
    s.client_line(line("PASS again"))
    effects = s.proxy_auth_result(False, throttled=True)
    assert replies(effects)[0][0] == 421 and CloseClient() in effects


def test_no_backend_left_closes_with_421_and_the_reason() -> None:
    s = started(ROUTED)
    s.client_line(line("USER carol"))
    effects = s.upstream_connect_failed("backend c: Connection refused")
    assert replies(effects) == [
        (421, "Upstream server unavailable: backend c: Connection refused.")
    ]
    assert s.closed


def test_connect_first_reverse_mode_relays_the_backends_greeting() -> None:
    config = build({"backends": BACKENDS, "tls.upstream": "off"})
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    assert s.start() == [ConnectBackend()]
    assert replies(connect(s, config, "a")) == [(220, "backend ready")]


def test_a_second_user_command_is_refused_once_a_backend_is_chosen() -> None:
    s = started(PROXIED)
    s.client_line(line("USER alice"))
    s.client_line(line("PASS pw"))
    s.proxy_auth_result(True)
    connect(s, PROXIED, "a")
    s.upstream_reply(Reply.of(331, "Password please."))
    s.upstream_reply(Reply.of(230, "In."))
    effects = s.client_line(line("USER root"))
    assert replies(effects) == [(530, "Reconnect to log in as another user.")]
    assert sent(effects) == []


def test_the_proxy_user_names_the_session_for_per_user_rates() -> None:
    s = started(PROXIED)
    s.client_line(line("USER bob"))
    s.client_line(line("PASS pw"))
    assert s.login_name is None
    s.proxy_auth_result(True)
    assert s.login_name == "bob"


def test_a_route_that_leaves_no_upstream_name_gets_530_before_connecting() -> None:
    """USER @east: the route's {local} is empty. Sending "USER " upstream would get the
    backend's 501 (as if the client had given no name) and leave the session connected
    with no way to log in; the gateway refuses the name itself, and the client may retry."""
    s = started(ROUTED)
    effects = s.client_line(line("USER @east"))
    assert not [e for e in effects if isinstance(e, ConnectBackend)]
    assert replies(effects) == [(530, "The route for this user gives no name to log in with.")]
    logs = [e for e in effects if isinstance(e, Log)]
    assert [(e.level, e.fields.get("refused")) for e in logs] == [("warn", "route")]
    effects = s.client_line(line("USER alice@east"))
    assert [e for e in effects if isinstance(e, ConnectBackend)]
