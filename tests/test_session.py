"""The pure session state machine, driven by hand: no sockets, no reactor."""

from __future__ import annotations

import pytest

from gateway.addresses import HostPort
from gateway.codec import Command, CommandReader, Reply
from gateway.config import Config, Data, Limits, Tls, build
from gateway.effects import (
    Authenticate,
    CloseClient,
    CloseData,
    CloseUpstream,
    ConnectBackend,
    ConnectData,
    ConnectUpstream,
    ListenData,
    Log,
    ResolveUpstream,
    RetryBackend,
    Side,
    StartRelay,
    StartUpstreamTLS,
    ToClient,
    ToUpstream,
)
from gateway.policy import Rule
from gateway.session import MAX_OWED_REPLIES, MAX_UNSOLICITED_REPLIES, Session

CLIENT = HostPort.of("192.0.2.10", 40000)
LOCAL = HostPort.of("192.0.2.1", 2121)
UP_LOCAL = HostPort.of("198.51.100.1", 50000)
UP_PEER = HostPort.of("203.0.113.5", 21)


def line(text: str) -> Command:
    (event,) = CommandReader().feed(text.encode() + b"\r\n")
    assert isinstance(event, Command)
    return event


def r(code: int, text: str = "x") -> Reply:
    return Reply.of(code, text)


def to_client(effects: list[object]) -> list[tuple[int, str]]:
    return [(e.reply.code, e.reply.text) for e in effects if isinstance(e, ToClient)]


def to_upstream(effects: list[object]) -> list[str]:
    return [
        f"{e.command.verb} {e.command.arg}".strip() for e in effects if isinstance(e, ToUpstream)
    ]


def without_logs(effects: list[object]) -> list[object]:
    return [e for e in effects if not isinstance(e, Log)]


def reverse(config: Config | None = None) -> Session:
    """A reverse-mode session past the greeting."""
    config = config or Config(upstream=("ftp.test", 21))
    session = Session(config, client_peer=CLIENT, client_local=LOCAL)
    assert session.start() == [ConnectBackend()]
    session.backend_connected(config.for_backend(config.pool_backends[0]))
    session.upstream_connected(UP_LOCAL, UP_PEER)
    # With the default upstream TLS policy "auto", the client sees the greeting at once while
    # the gateway asks for FEAT.
    effects = session.upstream_reply(r(220, "upstream ready"))
    assert to_client(effects) == [(220, "upstream ready")] and to_upstream(effects) == ["FEAT"]
    effects = session.upstream_reply(Reply(211, ("Features:", " SIZE", "End")))
    assert to_client(effects) == [] and to_upstream(effects) == []
    return session


def test_commands_are_relayed_and_replies_paired_in_order_when_pipelined() -> None:
    s = reverse()
    assert to_upstream(s.client_line(line("USER alice"))) == ["USER alice"]
    # Pipelined while USER is outstanding: held, not sent.
    assert s.client_line(line("PASS secret")) == []
    assert s.client_line(line("SYST")) == []
    effects = s.upstream_reply(r(331, "password please"))
    assert to_client(effects) == [(331, "password please")]
    assert to_upstream(effects) == ["PASS secret"]
    effects = s.upstream_reply(r(230, "welcome"))
    assert to_client(effects) == [(230, "welcome")]
    assert to_upstream(effects) == ["SYST"]
    assert to_client(s.upstream_reply(r(215, "UNIX Type: L8"))) == [(215, "UNIX Type: L8")]


def test_too_many_pipelined_commands_close_the_session_with_421() -> None:
    s = reverse(Config(upstream=("ftp.test", 21), limits=Limits(max_pending_commands=2)))
    s.client_line(line("NOOP"))
    s.client_line(line("NOOP"))
    s.client_line(line("NOOP"))
    effects = s.client_line(line("NOOP"))
    assert to_client(effects)[0][0] == 421
    assert CloseClient() in effects and CloseUpstream() in effects


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("PORT 10,0,0,1,200,10", 500),  # someone else's address: bounce
        ("PORT 192,0,2,10,0,21", 504),  # privileged port
        ("EPRT |1|10.0.0.1|5000|", 500),
        ("EPRT |2|::1|5000|", 500),
        ("PORT 192,0,2,10,300,1", 501),  # malformed
        ("EPRT |3|x|1|", 522),
    ],
)
def test_port_refuses_bounce_and_malformed_targets(command: str, code: int) -> None:
    s = reverse()
    effects = s.client_line(line(command))
    assert to_client(effects)[0][0] == code
    assert to_upstream(effects) == []


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("PORT 0,0,0,0,156,64", 200),
        ("EPRT |1|0.0.0.0|40000|", 200),
        ("EPRT |2|::|40000|", 500),  # an IPv6 "any" from an IPv4 client is not its address
        ("PORT 0,0,0,0,0,21", 504),  # still no privileged port
    ],
)
def test_unspecified_port_address_means_the_clients_own(command: str, code: int) -> None:
    """lftp sends EPRT |2|::|port| in active mode over IPv6: "any" can only mean the sender."""
    s = reverse()
    assert to_client(s.client_line(line(command)))[0][0] == code
    if code != 200:
        return
    s.client_line(line("RETR f"))
    s.upstream_reply(r(229, "Entering Extended Passive Mode (|||6446|)"))
    s.data_connected(Side.UPSTREAM)
    effects = s.upstream_reply(r(150, "Opening BINARY mode data connection"))
    assert ConnectData(Side.CLIENT, HostPort.of("192.0.2.10", 40000)) in effects


def _active_download(s: Session, verb: str = "RETR f") -> list[object]:
    assert to_client(s.client_line(line("PORT 192,0,2,10,156,64"))) == [
        (200, "PORT command successful.")
    ]
    effects = s.client_line(line(verb))
    assert to_upstream(effects) == ["EPSV"]
    effects = s.upstream_reply(r(229, "Entering Extended Passive Mode (|||6446|)"))
    assert effects == [ConnectData(Side.UPSTREAM, HostPort.of(UP_PEER.host, 6446))]
    assert to_upstream(s.data_connected(Side.UPSTREAM)) == [verb]
    effects = s.upstream_reply(r(150, "Opening BINARY mode data connection"))
    assert to_client(effects) == [(150, "Opening BINARY mode data connection")]
    assert ConnectData(Side.CLIENT, HostPort.of("192.0.2.10", 40000)) in effects
    return s.data_connected(Side.CLIENT)


def test_active_client_download_through_passive_upstream_holds_226_until_relay_done() -> None:
    s = reverse()
    assert _active_download(s) == [StartRelay(Side.UPSTREAM)]
    # The upstream's 226 overtakes the relayed bytes: it must not reach the client yet.
    assert to_client(s.upstream_reply(r(226, "Transfer complete"))) == []
    effects = s.relay_finished(True, "1000 bytes")
    assert to_client(effects) == [(226, "Transfer complete")]
    assert CloseData() in effects


def test_failed_relay_turns_upstream_226_into_426() -> None:
    s = reverse()
    _active_download(s)
    s.upstream_reply(r(226, "Transfer complete"))
    effects = s.relay_finished(False, "receiving side closed the connection after 10 bytes")
    (answer,) = to_client(effects)
    assert answer[0] == 426 and "closed the connection" in answer[1]


def test_relay_failure_before_upstream_answer_waits_for_it_then_426() -> None:
    s = reverse()
    _active_download(s)
    assert to_client(s.relay_finished(False, "connection reset")) == []
    assert to_client(s.upstream_reply(r(426, "Failure writing network stream")))[0][0] == 426


def test_upstream_error_without_data_reaches_client_and_closes_data() -> None:
    s = reverse()
    s.client_line(line("PASV"))
    s.data_listening(Side.CLIENT, HostPort.of(LOCAL.host, 30000))
    s.client_line(line("RETR missing"))
    s.upstream_reply(r(229, "(|||7000|)"))
    s.data_connected(Side.UPSTREAM)
    effects = s.upstream_reply(r(550, "No such file"))
    assert to_client(effects) == [(550, "No such file")]
    assert CloseData() in effects


def test_passive_client_gets_gateway_address_and_relay_starts_when_both_sides_connected() -> None:
    s = reverse()
    effects = s.client_line(line("PASV"))
    assert effects == [ListenData(Side.CLIENT)]
    effects = s.data_listening(Side.CLIENT, HostPort.of(LOCAL.host, 30001))
    assert to_client(effects) == [(227, "Entering Passive Mode (192,0,2,1,117,49).")]
    assert s.data_connected(Side.CLIENT) == []  # curl connects before sending the command
    assert to_upstream(s.client_line(line("STOR up.bin"))) == ["EPSV"]
    s.upstream_reply(r(229, "(|||7001|)"))
    effects = s.data_connected(Side.UPSTREAM)
    # The client connected long ago: the relay starts as soon as the upstream side is up.
    assert to_upstream(effects) == ["STOR up.bin"]
    assert effects[-1] == StartRelay(Side.CLIENT)


def test_upload_relay_starts_with_client_as_source() -> None:
    s = reverse()
    s.client_line(line("EPSV"))
    effects = s.data_listening(Side.CLIENT, HostPort.of(LOCAL.host, 30002))
    assert to_client(effects) == [(229, "Entering Extended Passive Mode (|||30002|)")]
    s.client_line(line("STOR up.bin"))
    s.upstream_reply(r(229, "(|||7002|)"))
    s.data_connected(Side.UPSTREAM)
    s.upstream_reply(r(150, "Ok to send data."))
    assert s.data_connected(Side.CLIENT) == [StartRelay(Side.CLIENT)]


def test_masquerade_address_replaces_the_227_address() -> None:
    s = reverse(Config(upstream=("ftp.test", 21), data=Data(masquerade_address="203.0.113.99")))
    s.client_line(line("PASV"))
    effects = s.data_listening(Side.CLIENT, HostPort.of(LOCAL.host, 30001))
    assert to_client(effects) == [(227, "Entering Passive Mode (203,0,113,99,117,49).")]


def test_epsv_refused_falls_back_to_pasv_and_remembers() -> None:
    s = reverse()
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("LIST"))
    effects = s.upstream_reply(r(500, "EPSV not understood"))
    assert to_upstream(effects) == ["PASV"]
    effects = s.upstream_reply(r(227, "Entering Passive Mode (203,0,113,5,27,88)"))
    assert effects == [ConnectData(Side.UPSTREAM, HostPort.of(UP_PEER.host, 7000))]
    s.data_connected(Side.UPSTREAM)
    s.upstream_reply(r(150, "listing"))
    s.data_connected(Side.CLIENT)
    s.relay_finished(True, "")
    s.upstream_reply(r(226, "done"))
    s.client_line(line("PORT 192,0,2,10,156,65"))
    assert to_upstream(s.client_line(line("NLST"))) == ["PASV"]


def test_pasv_reply_naming_a_third_host_is_not_followed() -> None:
    s = reverse()
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("RETR f"))
    s.upstream_reply(r(500, "no EPSV"))
    effects = s.upstream_reply(r(227, "Entering Passive Mode (10,1,2,3,27,88)"))
    assert ConnectData(Side.UPSTREAM, HostPort.of(UP_PEER.host, 7000)) in effects
    assert any(isinstance(e, Log) and e.level == "warn" for e in effects)


def test_abor_during_transfer_answers_426_then_226_and_swallows_upstream_replies() -> None:
    s = reverse()
    _active_download(s)
    effects = s.client_line(line("ABOR"))
    assert to_client(effects) == [
        (426, "Connection closed; transfer aborted."),
        (226, "ABOR command successful."),
    ]
    assert to_upstream(effects) == ["ABOR"]
    assert CloseData() in effects
    # The upstream's answers to RETR and to ABOR stay with the gateway...
    assert to_client(s.upstream_reply(r(426, "aborted"))) == []
    assert to_client(s.upstream_reply(r(226, "ABOR ok"))) == []
    # ...and the next command's reply is paired with it, not with the old ones.
    s.client_line(line("PWD"))
    assert to_client(s.upstream_reply(r(257, '"/"'))) == [(257, '"/"')]


def test_abor_while_upstream_reply_pending_keeps_pairing() -> None:
    s = reverse()
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("RETR f"))  # EPSV outstanding
    s.client_line(line("ABOR"))
    assert s.upstream_reply(r(229, "(|||6446|)")) == []  # no data connection for a dead transfer
    assert s.upstream_reply(r(225, "no transfer")) == []
    s.client_line(line("NOOP"))
    assert to_client(s.upstream_reply(r(200, "noop"))) == [(200, "noop")]


def test_aborts_an_upstream_never_answers_end_the_session_with_421() -> None:
    """Only ABOR sends upstream without waiting for a reply: a client aborting transfer after
    transfer while the upstream answers nothing must not pile up commands without bound."""
    s = reverse()
    for _ in range(MAX_OWED_REPLIES):
        s.client_line(line("PORT 192,0,2,10,156,64"))
        assert to_upstream(s.client_line(line("RETR f"))) == ["EPSV"]  # never answered
        effects = s.client_line(line("ABOR"))
        if s.closed:
            break
    assert s.closed and to_upstream(effects) == []
    ((code, text),) = to_client(effects)
    assert code == 421 and "commands unanswered" in text
    assert CloseUpstream() in effects


def test_rest_is_held_and_sent_right_before_the_transfer_command() -> None:
    s = reverse()
    assert to_client(s.client_line(line("REST 100")))[0][0] == 350
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("RETR f"))
    s.upstream_reply(r(229, "(|||6446|)"))
    assert to_upstream(s.data_connected(Side.UPSTREAM)) == ["REST 100"]
    assert to_upstream(s.upstream_reply(r(350, "Restart position accepted"))) == ["RETR f"]


def test_transfer_without_port_or_pasv_gets_425() -> None:
    s = reverse()
    assert to_client(s.client_line(line("RETR f"))) == [
        (425, "Use PORT, EPRT, PASV or EPSV first.")
    ]


def test_epsv_all_refuses_other_data_commands() -> None:
    s = reverse()
    assert to_client(s.client_line(line("EPSV ALL")))[0][0] == 200
    assert to_client(s.client_line(line("PORT 192,0,2,10,156,64")))[0][0] == 503
    assert to_client(s.client_line(line("PASV")))[0][0] == 503
    assert s.client_line(line("EPSV")) == [ListenData(Side.CLIENT)]


def test_feat_advertises_gateway_features_and_hides_tls() -> None:
    s = reverse()
    s.client_line(line("FEAT"))
    effects = s.upstream_reply(
        Reply(211, ("Features:", " AUTH TLS", " PBSZ", " SIZE", " MDTM", "End"))
    )
    ((code, text),) = to_client(effects)
    assert code == 211
    assert " SIZE" in text.split("\n") and " EPSV" in text.split("\n")
    assert " EPRT" in text.split("\n") and "AUTH" not in text


def test_feat_advertises_tls_when_a_certificate_is_configured() -> None:
    s = reverse(Config(upstream=("ftp.test", 21), tls=Tls(certificate="gw.pem")))
    s.client_line(line("FEAT"))
    ((code, text),) = to_client(s.upstream_reply(Reply(211, ("Features:", " AUTH TLS", "End"))))
    assert code == 211
    assert " AUTH TLS" in text.split("\n") and " PROT" in text.split("\n")


def test_upstream_421_is_relayed_and_closes_everything() -> None:
    s = reverse()
    effects = s.upstream_reply(r(421, "Timeout"))
    assert to_client(effects) == [(421, "Timeout")]
    assert CloseClient() in effects


def forward(config: Config | None = None) -> Session:
    session = Session(config or Config(), client_peer=CLIENT, client_local=LOCAL)
    assert to_client(session.start())[0][0] == 220
    return session


def test_forward_mode_connects_to_host_after_last_at_and_logs_in_with_the_rest() -> None:
    s = forward()
    assert s.client_line(line("USER alice@corp@8.8.8.7:2121")) == [ConnectUpstream("8.8.8.7", 2121)]
    s.upstream_connected(UP_LOCAL, HostPort.of("8.8.8.7", 2121))
    effects = s.upstream_reply(r(220, "hello"))
    assert to_client(effects) == []  # the upstream greeting is the gateway's to swallow
    assert to_upstream(effects) == ["FEAT"]
    effects = s.upstream_reply(r(500, "FEAT not understood"))
    assert to_upstream(effects) == ["USER alice@corp"]
    assert to_client(s.upstream_reply(r(331, "pass"))) == [(331, "pass")]


def test_forward_mode_resolves_names_and_connects_to_the_checked_address() -> None:
    s = forward()
    assert s.client_line(line("USER bob@ftp.example.net")) == [
        ResolveUpstream("ftp.example.net", 21)
    ]
    effects = s.upstream_resolved(["10.0.0.5", "8.8.8.8"])
    assert effects == [ConnectUpstream("8.8.8.8", 21)]


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]", "224.0.0.1"])
def test_forward_mode_refuses_denied_upstreams_with_530(host: str) -> None:
    s = forward()
    effects = without_logs(s.client_line(line(f"USER x@{host}")))
    ((code, text),) = to_client(effects)
    assert code == 530 and "denied by policy" in text
    assert not any(isinstance(e, ConnectUpstream) for e in effects)
    # The session stays usable: a later allowed USER works.
    assert s.client_line(line("USER x@8.8.4.4")) == [ConnectUpstream("8.8.4.4", 21)]


def test_forward_mode_allow_rule_opens_loopback() -> None:
    s = forward(build({"allow_upstream": ["127.0.0.0/8"]}))
    assert s.client_line(line("USER x@127.0.0.1:2100")) == [ConnectUpstream("127.0.0.1", 2100)]


def test_forward_mode_commands_before_login_are_refused() -> None:
    s = forward()
    assert to_client(s.client_line(line("LIST")))[0][0] == 530
    assert to_client(s.client_line(line("PASS x")))[0][0] == 503
    assert to_client(s.client_line(line("USER plainname")))[0][0] == 530


def test_forward_mode_unreachable_upstream_gets_530_and_session_survives() -> None:
    s = forward()
    s.client_line(line("USER x@8.8.4.4"))
    ((code, text),) = to_client(s.upstream_connect_failed("Connection refused"))
    assert code == 530 and "Connection refused" in text
    assert to_client(s.client_line(line("NOOP")))[0][0] == 200


def test_quit_relays_to_upstream_then_closes() -> None:
    s = reverse()
    assert to_upstream(s.client_line(line("QUIT"))) == ["QUIT"]
    effects = s.upstream_reply(r(221, "bye"))
    assert to_client(effects) == [(221, "Goodbye.")]
    assert CloseClient() in effects and CloseUpstream() in effects


def test_client_data_listener_timeout_before_transfer_gives_425_on_transfer() -> None:
    s = reverse()
    s.client_line(line("PASV"))
    s.data_listening(Side.CLIENT, HostPort.of(LOCAL.host, 30001))
    s.data_failed(Side.CLIENT, "no data connection within 30 seconds")
    (answer,) = to_client(s.client_line(line("RETR f")))
    assert answer[0] == 425 and "30 seconds" in answer[1]


def test_upstream_data_connect_failure_answers_425_without_sending_the_command() -> None:
    s = reverse()
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("RETR f"))
    s.upstream_reply(r(229, "(|||6446|)"))
    effects = s.data_failed(Side.UPSTREAM, "Connection refused")
    assert to_upstream(effects) == []
    (answer,) = to_client(effects)
    assert answer[0] == 425 and "Connection refused" in answer[1]


# ----------------------------------------------------------------- proxy authentication

AUTH = build({"proxy_auth": ["memory:proxy:secret"], "allow_upstream": ["127.0.0.0/8"]})


def authenticated(s: Session, effects: list[object], ok: bool = True) -> list[object]:
    assert Authenticate("proxy", "secret") in effects or not ok
    return s.proxy_auth_result(ok)


def greet(s: Session, peer: str = "127.0.0.1") -> list[object]:
    s.upstream_connected(UP_LOCAL, HostPort.of(peer, 2100))
    s.upstream_reply(r(220, "hello"))
    return s.upstream_reply(r(500, "no FEAT"))


def test_auth_user_style_then_user_at_host() -> None:
    s = forward(AUTH)
    assert to_client(s.client_line(line("USER proxy")))[0][0] == 331
    effects = s.client_line(line("PASS secret"))
    assert effects == [Authenticate("proxy", "secret")]
    assert to_client(s.proxy_auth_result(True))[0][0] == 230
    assert s.client_line(line("USER site@127.0.0.1:2100")) == [ConnectUpstream("127.0.0.1", 2100)]
    assert to_upstream(greet(s)) == ["USER site"]


def test_auth_open_style() -> None:
    s = forward(AUTH)
    s.client_line(line("USER proxy"))
    s.client_line(line("PASS secret"))
    s.proxy_auth_result(True)
    assert s.client_line(line("OPEN 127.0.0.1:2100")) == [ConnectUpstream("127.0.0.1", 2100)]
    assert to_client(greet(s))[0][0] == 220
    assert to_upstream(s.client_line(line("USER site"))) == ["USER site"]


def test_auth_joined_style_sends_site_password_itself() -> None:
    s = forward(AUTH)
    assert to_client(s.client_line(line("USER site@proxy@127.0.0.1:2100")))[0][0] == 331
    effects = s.client_line(line("PASS sitepw@secret"))
    assert effects == [Authenticate("proxy", "secret")]
    assert s.proxy_auth_result(True)[-1] == ConnectUpstream("127.0.0.1", 2100)
    assert to_upstream(greet(s)) == ["USER site"]
    effects = s.upstream_reply(r(331, "password"))
    assert to_client(effects) == [] and to_upstream(effects) == ["PASS sitepw"]
    assert to_client(s.upstream_reply(r(230, "in"))) == [(230, "in")]
    assert s.logged_in


def test_auth_joined_acct_style() -> None:
    s = forward(AUTH)
    assert to_client(s.client_line(line("USER site@127.0.0.1:2100 proxy")))[0][0] == 331
    assert to_client(s.client_line(line("PASS sitepw")))[0][0] == 332
    assert s.client_line(line("ACCT secret")) == [Authenticate("proxy", "secret")]
    s.proxy_auth_result(True)
    assert to_upstream(greet(s)) == ["USER site"]
    assert to_upstream(s.upstream_reply(r(331, "password"))) == ["PASS sitepw"]


def test_auth_failure_is_530_and_nothing_is_contacted() -> None:
    s = forward(AUTH)
    s.client_line(line("USER site@proxy@127.0.0.1:2100"))
    s.client_line(line("PASS sitepw@wrong"))
    effects = s.proxy_auth_result(False)
    assert to_client(effects) == [(530, "Proxy login incorrect.")]
    assert not any(isinstance(e, ConnectUpstream | ResolveUpstream) for e in effects)
    assert to_client(s.proxy_auth_result(False, throttled=True)) == []  # no login pending


def test_auth_throttled_closes_with_421() -> None:
    s = forward(AUTH)
    s.client_line(line("USER proxy"))
    s.client_line(line("PASS x"))
    effects = s.proxy_auth_result(False, throttled=True)
    assert to_client(effects)[0][0] == 421 and CloseClient() in effects


def test_auth_required_refuses_plain_user_at_host_without_contacting_upstream() -> None:
    s = forward(AUTH)
    effects = s.client_line(line("USER site@127.0.0.1:2100"))
    assert to_client(effects)[0][0] == 331  # proxy-user@host style: the password is the proxy's
    assert not any(isinstance(e, ConnectUpstream) for e in effects)


@pytest.mark.parametrize(
    "verb",
    [
        "STOR x",
        "DELE x",
        "RNFR x",
        "MKD d",
        "SITE CHMOD 1 x",
        "APPE x",
        "MFMT 20200101000000 x",
        "MFF modify=20200101000000; x",
        "MFCT 20200101000000 x",
        "SITE UTIME x 20200101000000 20200101000000 20200101000000 UTC",
        "MDTM 20200101000000 x",
    ],
)
def test_read_only_preset_refuses_writes(verb: str) -> None:
    s = reverse(build({"upstream": "ftp.test", "commands.read_only": True}))
    effects = s.client_line(line(verb))
    assert to_client(effects)[0][0] == 550 and to_upstream(effects) == []
    assert to_upstream(s.client_line(line("RETR x"))) == []  # no PORT yet: 425, not refused


def test_read_only_preset_still_reads_times() -> None:
    s = reverse(build({"upstream": "ftp.test", "commands.read_only": True}))
    assert to_upstream(s.client_line(line("MDTM x"))) == ["MDTM x"]


@pytest.mark.parametrize("arg", ["\u0661\u0660\u0660", "\uff11\uff10\uff10", "\u00b2", "-1", "1e3"])
def test_rest_and_allo_take_ascii_digits_only(arg: str) -> None:
    s = reverse()
    for verb in ("REST", "ALLO"):
        effects = s.client_line(line(f"{verb} {arg}"))
        assert to_client(effects)[0][0] == 501 and to_upstream(effects) == [], verb
    assert to_client(s.client_line(line("REST 100")))[0][0] == 350
    assert to_upstream(s.client_line(line("ALLO 100"))) == ["ALLO 100"]


def test_command_deny_list() -> None:
    s = reverse(build({"upstream": "ftp.test", "commands.deny": ["SITE", "mdtm"]}))
    assert to_client(s.client_line(line("MDTM f")))[0][0] == 502
    assert to_upstream(s.client_line(line("SIZE f"))) == ["SIZE f"]


def test_timeouts_close_with_421() -> None:
    s = reverse()
    effects = s.timed_out("idle")
    assert to_client(effects)[0] == (421, "Idle timeout; closing the connection.")
    assert CloseUpstream() in effects


def test_upstream_active_mode_sends_the_command_once_when_the_server_connects_early() -> None:
    """pyftpdlib connects to a PORT address before it answers 200; RETR must still go once."""
    s = reverse(Config(upstream=("ftp.test", 21), data=Data(upstream_mode="active")))
    s.client_line(line("PASV"))
    s.data_listening(Side.CLIENT, HostPort.of("192.0.2.1", 5000))
    assert without_logs(s.client_line(line("RETR f"))) == [ListenData(Side.UPSTREAM, tls=False)]
    effects = s.data_listening(Side.UPSTREAM, HostPort.of("198.51.100.1", 6000))
    assert to_upstream(effects) == ["PORT 198,51,100,1,23,112"]
    assert to_upstream(s.data_opened(Side.UPSTREAM)) == []
    assert to_upstream(s.data_connected(Side.UPSTREAM)) == []
    assert to_upstream(s.upstream_reply(r(200, "PORT command successful"))) == ["RETR f"]
    effects = s.upstream_reply(r(125, "Data connection already open. Transfer starting."))
    assert to_client(effects) == [(125, "Data connection already open. Transfer starting.")]
    assert StartRelay(Side.UPSTREAM) in s.data_connected(Side.CLIENT)
    assert to_client(s.upstream_reply(r(226, "Transfer complete."))) == []
    assert to_client(s.relay_finished(True, "1 byte")) == [(226, "Transfer complete.")]


def test_upstream_active_mode_relay_that_starts_before_the_port_reply_still_ends_in_226() -> None:
    """The client is already connected and pyftpdlib connects before answering PORT: the relay
    starts before RETR goes out, and its outcome still decides the final reply."""
    s = reverse(Config(upstream=("ftp.test", 21), data=Data(upstream_mode="active")))
    s.client_line(line("PASV"))
    s.data_listening(Side.CLIENT, HostPort.of("192.0.2.1", 5000))
    assert s.data_connected(Side.CLIENT) == []
    s.client_line(line("RETR f"))
    s.data_listening(Side.UPSTREAM, HostPort.of("198.51.100.1", 6000))
    assert s.data_connected(Side.UPSTREAM) == [StartRelay(Side.UPSTREAM)]
    assert to_upstream(s.upstream_reply(r(200, "PORT command successful"))) == ["RETR f"]
    assert to_client(s.upstream_reply(r(150, "Opening data connection."))) == [
        (150, "Opening data connection.")
    ]
    assert to_client(s.relay_finished(True, "1 byte")) == []
    assert to_client(s.upstream_reply(r(226, "Transfer complete."))) == [
        (226, "Transfer complete.")
    ]


def test_auto_tls_upstream_that_offers_auth_but_refuses_it_is_used_in_clear_text() -> None:
    """pure-ftpd without a certificate lists AUTH TLS in FEAT and answers AUTH TLS with 500."""
    s = Session(Config(upstream=("ftp.test", 21)), client_peer=CLIENT, client_local=LOCAL)
    s.start()
    s.upstream_connected(UP_LOCAL, UP_PEER)
    effects = s.upstream_reply(r(220, "pure-ftpd ready"))
    assert to_upstream(effects) == ["FEAT"] and to_client(effects) == [(220, "pure-ftpd ready")]
    assert s.client_line(line("USER alice")) == []  # waits until TLS is settled
    effects = s.upstream_reply(Reply(211, ("Extensions supported:", " AUTH TLS", " EPSV", "End.")))
    assert to_upstream(effects) == ["AUTH TLS"]
    effects = s.upstream_reply(r(500, "This security scheme is not implemented"))
    assert to_upstream(effects) == ["USER alice"]
    assert any(isinstance(e, Log) and e.level == "warn" for e in effects)
    assert not s.upstream_tls


def test_auto_tls_shows_the_greeting_at_once_and_holds_commands_until_secured() -> None:
    """The FEAT round trip overlaps the client's: the greeting goes out with FEAT, and the
    client's USER and PASS wait until the upstream is secured, then go out under TLS only."""
    config = Config(upstream=("ftp.test", 21))
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    s.start()
    s.backend_connected(config.for_backend(config.pool_backends[0]))
    s.upstream_connected(UP_LOCAL, UP_PEER)
    effects = s.upstream_reply(r(220, "ready"))
    assert to_client(effects) == [(220, "ready")] and to_upstream(effects) == ["FEAT"]
    assert s.client_line(line("USER alice")) == []
    assert s.client_line(line("PASS secret")) == []
    effects = s.upstream_reply(Reply(211, ("Features:", " AUTH TLS", "End")))
    assert to_upstream(effects) == ["AUTH TLS"]
    assert s.upstream_reply(r(234, "go ahead")) == [StartUpstreamTLS("ftp.test")]
    assert to_upstream(s.upstream_tls_ready()) == ["PBSZ 0"]
    assert to_upstream(s.upstream_reply(r(200, "PBSZ=0"))) == ["PROT P"]
    effects = s.upstream_reply(r(200, "PROT ok"))
    assert to_client(effects) == [] and to_upstream(effects) == ["USER alice"]
    assert s.upstream_tls


def test_auto_tls_that_fails_after_the_greeting_closes_with_421_and_sends_no_user() -> None:
    config = Config(upstream=("ftp.test", 21))
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    s.start()
    s.backend_connected(config.for_backend(config.pool_backends[0]))
    s.upstream_connected(UP_LOCAL, UP_PEER)
    s.upstream_reply(r(220, "ready"))
    s.upstream_reply(Reply(211, ("Features:", " AUTH TLS", "End")))
    assert s.client_line(line("USER alice")) == []
    s.upstream_reply(r(234, "go ahead"))
    effects = s.upstream_tls_failed("the upstream's certificate is signed by an unknown CA")
    assert to_client(effects)[0][0] == 421 and CloseClient() in effects
    assert to_upstream(effects) == []


def test_required_tls_holds_the_greeting_until_secured() -> None:
    config = Config(upstream=("ftp.test", 21), tls=Tls(upstream="required"))
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    s.start()
    s.backend_connected(config.for_backend(config.pool_backends[0]))
    s.upstream_connected(UP_LOCAL, UP_PEER)
    effects = s.upstream_reply(r(220, "ready"))
    assert to_client(effects) == [] and to_upstream(effects) == ["AUTH TLS"]


def test_required_tls_upstream_that_refuses_auth_is_closed_with_421() -> None:
    config = Config(upstream=("ftp.test", 21), tls=Tls(upstream="required"))
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    s.start()
    s.backend_connected(config.for_backend(config.pool_backends[0]))
    s.upstream_connected(UP_LOCAL, UP_PEER)
    assert to_upstream(s.upstream_reply(r(220, "ready"))) == ["AUTH TLS"]
    effects = s.upstream_reply(r(500, "This security scheme is not implemented"))
    assert to_client(effects)[0][0] == 421
    assert CloseClient() in effects


def test_replies_read_with_the_234_are_dropped_and_none_answers_a_later_command() -> None:
    """RFC 4217 section 4: what followed 234 in the same clear-text read is not from the TLS
    peer. The session, not the shell, drops it; and no reply of that read can answer the PBSZ
    sent after it (the horizon)."""
    config = Config(upstream=("ftp.test", 21), tls=Tls(upstream="required"))
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    s.start()
    s.backend_connected(config.for_backend(config.pool_backends[0]))
    s.upstream_connected(UP_LOCAL, UP_PEER)
    assert to_upstream(s.upstream_reply(r(220, "ready"))) == ["AUTH TLS"]
    effects = s.upstream_replies([r(234, "go ahead"), r(200, "injected before the handshake")])
    assert effects == [StartUpstreamTLS("ftp.test")]
    assert to_upstream(s.upstream_tls_ready()) == ["PBSZ 0"]
    # Read before PROT went out: the second reply cannot be PROT's.
    effects = s.upstream_replies([r(200, "PBSZ=0"), r(200, "early")])
    assert to_upstream(effects) == ["PROT P"] and to_client(effects) == []
    assert [e.format for e in effects if isinstance(e, Log)] == [
        "Unsolicited upstream reply {reply}"
    ]
    assert to_client(s.upstream_replies([r(200, "PROT ok")])) == [(220, "ready")]


def test_transparent_mode_connects_to_the_original_destination() -> None:
    config = Config(transparent=True, upstream_rules=(Rule.parse("allow", "198.18.0.0/15"),))
    server = HostPort.of("198.19.0.2", 2100)
    s = Session(config, client_peer=CLIENT, client_local=LOCAL, destination=server)
    assert s.start() == [ConnectUpstream("198.19.0.2", 2100)]
    s.upstream_connected(UP_LOCAL, server)
    effects = s.upstream_reply(r(220, "server ready"))
    assert to_upstream(effects) == ["FEAT"]
    assert to_client(effects) == [(220, "server ready")]  # the server's own greeting
    s.upstream_reply(Reply(211, ("Features:", " SIZE", "End")))


@pytest.mark.parametrize(
    ("destination", "words"),
    [
        (None, "redirected connections only"),  # connected to the gateway itself
        (HostPort.of("10.1.2.3", 21), "denied by policy"),  # private: not allowed by default
    ],
)
def test_transparent_mode_refuses_unredirected_and_denied_connections(
    destination: HostPort | None, words: str
) -> None:
    s = Session(
        Config(transparent=True), client_peer=CLIENT, client_local=LOCAL, destination=destination
    )
    effects = s.start()
    [(code, text)] = to_client(effects)
    assert code == 421 and words in text
    assert CloseClient() in effects
    assert not any(isinstance(e, ConnectUpstream) for e in effects)


def test_unsolicited_replies_are_logged_once_and_a_flood_closes_with_421() -> None:
    s = reverse()
    logs: list[Log] = []
    for _ in range(MAX_UNSOLICITED_REPLIES):
        effects = s.upstream_reply(r(200, "nobody asked"))
        assert to_client(effects) == []
        logs += [e for e in effects if isinstance(e, Log)]
    assert [log.fields.get("event") for log in logs] == ["unsolicited_reply"]
    # The session still pairs replies with commands.
    assert to_upstream(s.client_line(line("NOOP"))) == ["NOOP"]
    assert to_client(s.upstream_reply(r(200, "NOOP ok"))) == [(200, "NOOP ok")]
    effects = s.upstream_reply(r(200, "one too many"))
    assert to_client(effects)[0][0] == 421
    assert CloseClient() in effects and CloseUpstream() in effects
    summary = [e for e in effects if isinstance(e, Log)]
    assert [log.fields["count"] for log in summary] == [MAX_UNSOLICITED_REPLIES + 1]


# ------------------------------------------------------- one final reply for every command


@pytest.mark.parametrize("verb", ["PASV", "EPSV"])
def test_passive_listener_that_cannot_open_answers_425_and_the_session_goes_on(verb: str) -> None:
    s = reverse()
    assert s.client_line(line(verb)) == [ListenData(Side.CLIENT)]
    assert s.client_line(line("NOOP")) == []  # pipelined behind the passive command
    effects = s.data_failed(Side.CLIENT, "no free port in the passive range")
    (answer,) = to_client(effects)
    assert answer == (
        425,
        "Cannot open passive data connection: no free port in the passive range.",
    )
    assert to_upstream(effects) == ["NOOP"]  # the queue moves on
    assert to_client(s.upstream_reply(r(200, "NOOP ok"))) == [(200, "NOOP ok")]
    # Nothing is left behind: a transfer needs a new PORT/PASV first.
    assert to_client(s.client_line(line("RETR f"))) == [
        (425, "Use PORT, EPRT, PASV or EPSV first.")
    ]


def test_reply_timer_closes_a_session_whose_upstream_never_answers_with_421() -> None:
    s = reverse()
    assert s.awaiting_reply is None  # nothing asked: no timer
    s.client_line(line("PWD"))
    mark = s.awaiting_reply
    assert mark is not None
    effects = s.timed_out("reply", mark)
    (answer,) = to_client(effects)
    assert answer[0] == 421 and "no reply within 120 seconds" in answer[1]
    assert CloseClient() in effects and CloseUpstream() in effects


def test_reply_timer_armed_before_the_latest_reply_does_not_count() -> None:
    s = reverse()
    s.client_line(line("PWD"))
    stale = s.awaiting_reply
    s.client_line(line("NOOP"))
    s.upstream_reply(r(257, '"/"'))  # PWD answered; NOOP now waits
    assert s.awaiting_reply is not None and s.awaiting_reply != stale
    assert s.timed_out("reply", stale) == []
    assert not s.closed
    assert to_client(s.upstream_reply(r(200, "NOOP ok"))) == [(200, "NOOP ok")]
    assert s.awaiting_reply is None
    assert s.timed_out("reply", stale) == []


def test_silent_upstream_after_a_transfer_gives_426_and_the_session_goes_on() -> None:
    s = reverse()
    assert _active_download(s) == [StartRelay(Side.UPSTREAM)]
    assert s.awaiting_reply is None  # the relay is moving bytes: timeouts.stall bounds it
    assert to_client(s.relay_finished(True, "1000 bytes")) == []
    mark = s.awaiting_reply
    assert mark is not None  # the upstream owes the transfer's final reply
    effects = s.timed_out("reply", mark)
    (answer,) = to_client(effects)
    assert answer[0] == 426 and "no reply within 120 seconds" in answer[1]
    assert CloseData() in effects and CloseClient() not in effects
    assert to_upstream(s.client_line(line("NOOP"))) == ["NOOP"]
    # The upstream wakes up: its late 226 belongs to the abandoned transfer, not to NOOP.
    assert to_client(s.upstream_reply(r(226, "Transfer complete"))) == []
    assert to_client(s.upstream_reply(r(200, "NOOP ok"))) == [(200, "NOOP ok")]


def test_upstream_that_stays_silent_after_a_timed_out_transfer_closes_the_session() -> None:
    s = reverse()
    _active_download(s)
    s.relay_finished(False, "no data moved for 300 seconds after 0 bytes")
    s.timed_out("reply", s.awaiting_reply)
    s.client_line(line("NOOP"))
    effects = s.timed_out("reply", s.awaiting_reply)
    assert to_client(effects)[0][0] == 421
    assert CloseClient() in effects


def test_reply_timer_at_quit_says_goodbye() -> None:
    s = reverse()
    s.client_line(line("QUIT"))
    effects = s.timed_out("reply", s.awaiting_reply)
    assert to_client(effects) == [(221, "Goodbye.")]
    assert CloseClient() in effects


def test_idle_and_login_timers_count_only_when_the_session_decides_so() -> None:
    s = reverse()
    _active_download(s)
    assert s.timed_out("idle") == []  # a transfer is not idleness; its own timers bound it
    s.client_line(line("USER alice"))
    s.relay_finished(True, "1 byte")
    s.upstream_reply(r(226, "Transfer complete"))
    s.upstream_reply(r(230, "welcome"))
    assert s.timed_out("login") == []  # logged in: the login timer no longer counts
    assert to_client(s.timed_out("idle"))[0][0] == 421


def test_upstream_success_without_1xx_or_data_connection_is_451_not_226() -> None:
    s = reverse(Config(upstream=("ftp.test", 21), data=Data(upstream_mode="active")))
    s.client_line(line("PASV"))
    s.data_listening(Side.CLIENT, HostPort.of("192.0.2.1", 5000))
    s.data_connected(Side.CLIENT)
    s.client_line(line("RETR f"))
    s.data_listening(Side.UPSTREAM, HostPort.of("198.51.100.1", 6000))
    assert to_upstream(s.upstream_reply(r(200, "PORT command successful"))) == ["RETR f"]
    effects = s.upstream_reply(r(226, "Transfer complete."))  # never connected, no 150
    (answer,) = to_client(effects)
    assert answer[0] == 451 and "without ever opening a data connection" in answer[1]
    assert CloseData() in effects
    assert any(isinstance(e, Log) and e.level == "warn" for e in effects)
    assert to_upstream(s.client_line(line("NOOP"))) == ["NOOP"]  # the session goes on


def test_empty_transfer_without_1xx_connects_an_active_client_and_waits_for_the_relay() -> None:
    s = reverse()
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("LIST"))
    s.upstream_reply(r(229, "(|||6446|)"))
    assert to_upstream(s.data_opened(Side.UPSTREAM)) == ["LIST"]
    s.data_connected(Side.UPSTREAM)
    effects = s.upstream_reply(r(226, "Transfer complete."))  # no 150 (an empty listing)
    assert to_client(effects) == []
    assert ConnectData(Side.CLIENT, HostPort.of("192.0.2.10", 40000)) in effects
    assert s.data_connected(Side.CLIENT) == [StartRelay(Side.UPSTREAM)]
    assert to_client(s.relay_finished(True, "0 bytes")) == [(226, "Transfer complete.")]


@pytest.mark.parametrize(
    ("client", "advertised"),
    [
        ("10.1.2.3", "Entering Passive Mode (192,0,2,1,117,49)."),  # inside: the local address
        ("::ffff:10.1.2.3", "Entering Passive Mode (192,0,2,1,117,49)."),
        ("198.51.100.7", "Entering Passive Mode (203,0,113,99,117,49)."),  # outside: masquerade
    ],
)
def test_masquerade_except_networks_get_the_local_address(client: str, advertised: str) -> None:
    config = build(
        {
            "upstream": "ftp.test:21",
            "data.masquerade_address": "203.0.113.99",
            "data.masquerade_except": ["10.0.0.0/8"],
        }
    )
    s = Session(config, client_peer=HostPort.of(client, 40000), client_local=LOCAL)
    s.start()
    s.upstream_connected(UP_LOCAL, UP_PEER)
    s.upstream_reply(r(220, "upstream ready"))
    s.upstream_reply(Reply(211, ("Features:", " SIZE", "End")))
    s.client_line(line("PASV"))
    effects = s.data_listening(Side.CLIENT, HostPort.of(LOCAL.host, 30001))
    assert to_client(effects) == [(227, advertised)]


def test_unredirected_transparent_connection_is_logged_at_warn_with_its_reason() -> None:
    s = Session(Config(transparent=True), client_peer=CLIENT, client_local=LOCAL, destination=None)
    [log] = [e for e in s.start() if isinstance(e, Log)]
    assert log.level == "warn"
    assert "not redirected" in log.fields["reason"]
    assert log.fields["event"] == "session_refused"


@pytest.mark.parametrize(("mode", "hint"), [("auto", True), ("required", False)])
def test_untrusted_upstream_certificate_in_auto_mode_names_the_settings(
    mode: str, hint: bool
) -> None:
    s = Session(
        Config(upstream=("ftp.test", 21), tls=Tls(upstream=mode)),
        client_peer=CLIENT,
        client_local=LOCAL,
    )
    s.start()
    s.upstream_connected(UP_LOCAL, UP_PEER)
    effects = s.upstream_tls_failed("the upstream's certificate is signed by an unknown CA")
    [(code, text)] = to_client(effects)
    assert code == 421
    named = ("tls.upstream_ca_file", "tls.upstream_fingerprint", 'tls.upstream = "off"')
    assert all(name in text for name in named) is hint
    [log] = [e for e in effects if isinstance(e, Log)]
    assert ("tls.upstream_ca_file" in log.fields["reason"]) is hint


def test_login_name_is_the_user_the_upstream_accepted() -> None:
    """`limits.rate_per_user` counts a session's transfers against this name."""
    s = reverse()
    s.client_line(line("USER alice"))
    s.upstream_reply(r(331, "password please"))
    s.client_line(line("PASS wrong"))
    s.upstream_reply(r(530, "no"))
    assert s.login_name is None  # refused: nobody's yet
    s.client_line(line("USER bob"))
    s.upstream_reply(r(331, "password please"))
    s.client_line(line("PASS right"))
    s.upstream_reply(r(230, "welcome"))
    assert s.login_name == "bob"


def test_login_name_after_a_proxy_login_is_the_proxy_user() -> None:
    s = forward(AUTH)
    s.client_line(line("USER site@proxy@127.0.0.1:2100"))
    s.client_line(line("PASS sitepw@secret"))
    s.proxy_auth_result(True)
    assert s.login_name == "proxy"
    greet(s)
    s.upstream_reply(r(331, "password"))
    s.upstream_reply(r(230, "in"))
    assert s.logged_in and s.login_name == "proxy"  # not the site user "site"


def test_client_data_failure_after_the_upstream_1xx_answers_425_at_once_and_aborts() -> None:
    # The upstream has the command and waits for a data connection the gateway closed; some
    # servers (pyftpdlib) never give the command a final reply then, and answer ABOR alone
    # with 225. The client must not wait for a reply that will not come.
    s = reverse()
    s.client_line(line("PORT 192,0,2,10,156,64"))
    s.client_line(line("STOR f"))
    s.upstream_reply(r(229, "(|||6446|)"))
    assert to_upstream(s.data_opened(Side.UPSTREAM)) == ["STOR f"]
    s.data_connected(Side.UPSTREAM)
    effects = s.upstream_reply(r(150, "About to open data connection."))
    assert ConnectData(Side.CLIENT, HostPort.of("192.0.2.10", 40000)) in effects
    effects = s.data_failed(Side.CLIENT, "Connection refused")
    assert to_upstream(effects) == ["ABOR"]
    (answer,) = to_client(effects)
    assert answer[0] == 425 and "Connection refused" in answer[1]
    assert CloseData() in effects
    # The next command waits behind the ABOR; ABOR's lone 225 ends the aborted STOR too.
    assert to_upstream(s.client_line(line("NOOP"))) == ["NOOP"]
    assert to_client(s.upstream_reply(r(225, "ABOR command successful."))) == []
    assert to_client(s.upstream_reply(r(200, "NOOP ok."))) == [(200, "NOOP ok.")]


def test_the_upstream_line_names_the_backend_when_its_name_is_not_its_address() -> None:
    config = build({"backends": [{"name": "east", "address": "ftp.test:21"}]})
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    assert s.start() == [ConnectBackend()]
    s.backend_connected(config.for_backend(config.pool_backends[0]), "east")
    (log,) = [e for e in s.upstream_connected(UP_LOCAL, UP_PEER) if isinstance(e, Log)]
    assert log.format.endswith("backend {backend}") and log.fields["backend"] == "east"
    # One upstream: the backend's name is its address, said once.
    config = build({"upstream": f"{UP_PEER.host}:{UP_PEER.port}"})
    plain = Session(config, client_peer=CLIENT, client_local=LOCAL)
    plain.start()
    (backend,) = config.pool_backends
    plain.backend_connected(config.for_backend(backend), backend.name)
    (log,) = [e for e in plain.upstream_connected(UP_LOCAL, UP_PEER) if isinstance(e, Log)]
    assert log.format == "Connected to upstream {peer}", backend.name


def _two_tls_backends() -> tuple[Config, Session]:
    config = build(
        {
            "backends": [
                {"name": "east", "address": "ftp-east.test:21"},
                {"name": "west", "address": "ftp-west.test:21"},
            ],
            "tls.upstream": "required",
        }
    )
    s = Session(config, client_peer=CLIENT, client_local=LOCAL)
    assert s.start() == [ConnectBackend()]
    east, _ = config.pool_backends
    s.backend_connected(config.for_backend(east), "east")
    s.upstream_connected(UP_LOCAL, UP_PEER)
    assert to_upstream(s.upstream_reply(r(220, "east ready"))) == ["AUTH TLS"]
    return config, s


@pytest.mark.parametrize("failure", ["handshake", "auth refused"])
def test_required_tls_failing_on_a_backend_tries_the_next_before_the_client_sees_anything(
    failure: str,
) -> None:
    config, s = _two_tls_backends()
    assert s.client_line(line("USER alice")) == []  # queued: the greeting is still held
    if failure == "handshake":
        assert s.upstream_reply(r(234, "go ahead")) == [StartUpstreamTLS("ftp-east.test")]
        effects = s.upstream_tls_failed("certificate verify failed")
    else:
        effects = s.upstream_reply(r(502, "AUTH not understood"))
    assert len([e for e in effects if isinstance(e, RetryBackend)]) == 1
    assert to_client(effects) == [] and CloseClient() not in effects
    assert any(isinstance(e, Log) and e.level == "warn" for e in effects)
    # The next backend: the session starts over with it, and the client sees one greeting.
    _, west = config.pool_backends
    s.backend_connected(config.for_backend(west), "west")
    s.upstream_connected(UP_LOCAL, HostPort.of("198.51.100.2", 21))
    assert to_upstream(s.upstream_reply(r(220, "west ready"))) == ["AUTH TLS"]
    assert s.upstream_reply(r(234, "go ahead")) == [StartUpstreamTLS("ftp-west.test")]
    assert to_upstream(s.upstream_tls_ready()) == ["PBSZ 0"]
    assert to_upstream(s.upstream_reply(r(200, "PBSZ=0"))) == ["PROT P"]
    effects = s.upstream_reply(r(200, "PROT ok"))
    assert to_client(effects) == [(220, "west ready")] and to_upstream(effects) == ["USER alice"]


def test_no_backend_left_after_a_tls_failure_ends_with_its_421() -> None:
    _, s = _two_tls_backends()
    s.upstream_reply(r(234, "go ahead"))
    effects = s.upstream_tls_failed("certificate verify failed")
    assert [e for e in effects if isinstance(e, RetryBackend)] == [
        RetryBackend("certificate verify failed")
    ]
    effects = s.upstream_connect_failed("backend east: certificate verify failed")
    text = "Cannot secure the connection to the upstream: certificate verify failed."
    assert to_client(effects) == [(421, text)] and CloseClient() in effects
