"""The pure rules the session is built from, each alone: transfer outcome and upstream data mode
(`gateway.transfer`), proxy login styles (`gateway.login`), FEAT (`gateway.features`)."""

from __future__ import annotations

import pytest

from gateway import features, transfer
from gateway import login as proxy_login
from gateway.addresses import UserTarget
from gateway.codec import Command, Reply
from gateway.effects import Side
from gateway.errors import ClientProtocolError

OK = Reply.of(226, "Transfer complete.")
REFUSED = Reply.of(550, "No such file.")


def a_transfer(**state: object) -> transfer.Transfer:
    t = transfer.Transfer(
        Command("RETR", "f"), Side.UPSTREAM, transfer.ClientData("PASV", False), restart=None
    )
    for name, value in state.items():
        setattr(t, name, value)
    return t


RELAYING = transfer.TransferPhase.RELAYING
RELAYED = transfer.TransferPhase.RELAYED
FAILED = transfer.TransferPhase.FAILED
OPENING = Reply.of(150, "Opening data connection.")


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ({}, None),  # nothing from the upstream yet
        ({"upstream_final": OK, "phase": RELAYING}, None),  # 226 overtook the bytes
        ({"upstream_final": OK, "preliminary": OPENING}, None),  # client still connecting
        ({"upstream_final": REFUSED}, 550),  # refused before any data: relayed as is
        ({"upstream_final": OK, "phase": RELAYED, "relay_result": (True, "done")}, 226),
        ({"upstream_final": OK, "phase": RELAYED, "relay_result": (False, "reset")}, 426),
        ({"upstream_final": OK, "phase": FAILED, "relay_result": (False, "no connection")}, 425),
        ({"phase": RELAYED, "relay_result": (False, "reset")}, None),  # upstream owes a reply
        ({"upstream_final": REFUSED, "phase": RELAYED, "relay_result": (True, "")}, 550),
        # 226 with no 1xx and no data connection at all: a transfer that never happened.
        ({"upstream_final": OK}, 451),
        # 226 with no 1xx, but the upstream's data connection exists (an empty transfer on
        # servers that skip the 1xx): the relay decides.
        ({"upstream_final": OK, "upstream_opened": True}, None),
        (
            {
                "upstream_final": OK,
                "upstream_opened": True,
                "phase": RELAYED,
                "relay_result": (True, "0 b"),
            },
            226,
        ),
    ],
)
def test_final_reply_never_reports_an_incomplete_transfer_as_done(
    state: dict[str, object], code: int | None
) -> None:
    answer = transfer.final_reply(a_transfer(**state))
    assert (answer.code if answer else None) == code


def test_success_without_a_data_connection_says_nothing_was_transferred() -> None:
    answer = transfer.final_reply(a_transfer(upstream_final=OK))
    assert answer is not None and answer.code == 451
    assert "without ever opening a data connection" in answer.text
    assert "nothing was transferred" in answer.text


def test_failed_relay_reply_says_why() -> None:
    cut = a_transfer(upstream_final=OK, phase=RELAYED, relay_result=(False, "reset by peer"))
    assert transfer.final_reply(cut) == Reply.of(426, "Transfer failed: reset by peer.")
    never = a_transfer(upstream_final=OK, phase=FAILED, relay_result=(False, "timed out"))
    assert transfer.final_reply(never) == Reply.of(425, "Cannot open data connection: timed out.")


@pytest.mark.parametrize(
    ("setting", "client_verb", "epsv_refused", "family", "mode"),
    [
        ("passive", "PORT", False, 4, "epsv"),
        ("passive", "PORT", True, 4, "pasv"),  # remembered after the first refusal
        ("passive", "PASV", True, 6, "epsv"),  # PASV cannot name an IPv6 address
        ("pasv", "EPSV", False, 4, "pasv"),
        ("pasv", "EPSV", False, 6, "epsv"),
        ("epsv", "PASV", False, 4, "epsv"),
        ("active", "EPSV", False, 4, "active"),
        ("client", "PORT", False, 4, "active"),
        ("client", "EPRT", False, 6, "active"),
        ("client", "PASV", False, 4, "pasv"),
        ("client", "EPSV", False, 4, "epsv"),
    ],
)
def test_upstream_mode(
    setting: str, client_verb: str, epsv_refused: bool, family: int, mode: str
) -> None:
    assert transfer.upstream_mode(setting, client_verb, epsv_refused, family) == mode


HOST = "ftp.example"


@pytest.mark.parametrize(
    ("arg", "style", "proxy_user", "target", "site_user"),
    [
        ("proxyuser", "user", "proxyuser", None, None),
        ("proxyuser@ftp.example", "proxy-user@host", "proxyuser", ("proxyuser", HOST, 21), None),
        ("me@proxyuser@ftp.example:2121", "joined", "proxyuser", ("me", HOST, 2121), "me"),
        ("me@ftp.example proxyuser", "joined-acct", "proxyuser", ("me", HOST, 21), "me"),
        # The host follows the last "@": user names may hold one.
        ("a@b@proxy@[2001:db8::1]:21", "joined", "proxy", ("a@b", "2001:db8::1", 21), "a@b"),
    ],
)
def test_proxy_login_styles(
    arg: str,
    style: str,
    proxy_user: str,
    target: tuple[str, str, int] | None,
    site_user: str | None,
) -> None:
    login, text = proxy_login.begin(arg)
    assert (login.style, login.proxy_user, login.site_user) == (style, proxy_user, site_user)
    assert login.target == (UserTarget(*target) if target else None)
    assert text  # the 331 says what to send next


def test_proxy_login_with_a_bad_port_is_a_501() -> None:
    with pytest.raises(ClientProtocolError) as refused:
        proxy_login.begin("proxyuser@ftp.example:99999")
    assert refused.value.reply_code == 501


@pytest.mark.parametrize(
    ("arg", "split"),
    [
        ("secret@proxysecret", ("secret", "proxysecret")),
        ("se@cret@proxysecret", ("se@cret", "proxysecret")),
        ("@proxysecret", ("", "proxysecret")),
        ("no-separator", None),
    ],
)
def test_joined_password(arg: str, split: tuple[str, str] | None) -> None:
    assert proxy_login.split_joined_password(arg) == split


def test_feat_for_client_keeps_upstream_features_and_replaces_tls_and_data_ones() -> None:
    upstream = Reply(
        211, ("Features:", " MDTM", " AUTH TLS", " PBSZ", " LPSV", " EPSV", " MLST size*;", "End")
    )
    assert features.for_client(upstream, tls=False).lines == (
        "Features:", " MDTM", " MLST size*;", " EPRT", " EPSV", "End",
    )  # fmt: skip
    with_tls = features.for_client(upstream, tls=True).lines
    assert with_tls[-5:] == (" AUTH TLS", " AUTH SSL", " PBSZ", " PROT", "End")
    assert features.for_client(Reply.of(500, "FEAT not understood"), tls=False).lines == (
        "Features:", " EPRT", " EPSV", "End",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "code", "offers"),
    [
        (("Features:", " AUTH TLS", "End"), 211, True),
        (("Extensions supported:", " AUTH TLS;SSL", " PBSZ", "End."), 211, True),
        (("Features:", " MDTM", "End"), 211, False),
        (("FEAT not understood",), 500, False),
    ],
)
def test_offers_auth_tls(lines: tuple[str, ...], code: int, offers: bool) -> None:
    assert features.offers_auth_tls(Reply(code, lines)) is offers


@pytest.mark.parametrize(
    ("orderly", "close_notify_sent", "unacknowledged", "delivered"),
    [
        (True, True, 0, True),  # FIN after acknowledging every byte and our close_notify
        (False, True, 0, False),  # a reset is never a normal end
        (True, False, 0, False),  # the gateway had not finished sending
        (True, True, 1, False),  # bytes still unacknowledged: the client closed early
        (True, True, None, False),  # unknown: keep the strict rule
    ],
)
def test_download_without_client_close_notify_counts_only_when_everything_arrived(
    orderly: bool, close_notify_sent: bool, unacknowledged: int | None, delivered: bool
) -> None:
    close = transfer.ReceiverClose(orderly, close_notify_sent, unacknowledged)
    assert transfer.download_delivered(close) is delivered
