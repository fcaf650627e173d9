"""The pure session's part in a graceful stop (`Session.shutdown`) and in the per-transfer
record the transfer log is written from: no sockets, no reactor."""

from __future__ import annotations

from test_session import _active_download, line, r, reverse, to_client

from gateway.effects import CloseClient, CloseData, CloseUpstream, Log, Side, StartRelay


def test_idle_session_gets_421_and_closes() -> None:
    s = reverse()
    effects = s.shutdown()
    assert to_client(effects) == [(421, "Service shutting down.")]
    assert CloseClient() in effects and CloseUpstream() in effects
    assert s.closed and s.shutdown(immediate=True) == []


def test_running_transfer_finishes_then_the_session_gets_421() -> None:
    s = reverse()
    assert _active_download(s) == [StartRelay(Side.UPSTREAM)]
    assert s.shutdown() == []  # the transfer goes on
    assert not s.closed
    assert s.client_line(line("PWD")) == []  # queued behind the transfer, never served
    s.upstream_reply(r(226, "Transfer complete"))
    effects = s.relay_finished(True, "1000 bytes")
    assert to_client(effects) == [(226, "Transfer complete"), (421, "Service shutting down.")]
    assert CloseClient() in effects and s.closed


def test_transfer_still_running_when_the_grace_ends_gets_426_then_421() -> None:
    s = reverse()
    _active_download(s)
    assert s.shutdown() == []
    effects = s.shutdown(immediate=True)
    assert to_client(effects) == [
        (426, "Transfer aborted: the gateway is shutting down."),
        (421, "Service shutting down."),
    ]
    assert CloseData() in effects and CloseClient() in effects
    # The upstream's late 226 and the relay's end reach nobody.
    assert to_client(s.upstream_reply(r(226, "Transfer complete"))) == []
    assert to_client(s.relay_finished(True, "1000 bytes")) == []


def test_immediate_shutdown_without_grace_ends_the_transfer_at_once() -> None:
    s = reverse()
    _active_download(s)
    assert [code for code, _ in to_client(s.shutdown(immediate=True))] == [426, 421]


def test_transfer_record_names_user_type_and_direction() -> None:
    s = reverse()
    s.client_line(line("USER alice"))
    s.upstream_reply(r(331, "password please"))
    s.client_line(line("PASS secret"))
    logged_in = [e for e in s.upstream_reply(r(230, "welcome")) if isinstance(e, Log)]
    assert [(e.level, e.fields.get("event"), e.fields.get("user")) for e in logged_in] == [
        ("info", "logged_in", "alice")
    ]
    assert all("secret" not in str(e.fields) for e in logged_in)
    s.client_line(line("TYPE I"))
    s.upstream_reply(r(200, "Type set to I"))
    _active_download(s)
    s.upstream_reply(r(226, "Transfer complete"))
    (record,) = [
        e
        for e in s.relay_finished(True, "1000 bytes")
        if isinstance(e, Log) and e.fields.get("event") == "transfer_finished"
    ]
    assert record.fields["user"] == "alice" and record.fields["type"] == "b"
    assert record.fields["direction"] == "download" and record.fields["path"] == "f"
    assert s.user == "alice" and s.config.mode == "reverse"


def test_transfer_type_stays_ascii_when_the_upstream_refuses_type() -> None:
    s = reverse()
    s.client_line(line("TYPE I"))
    s.upstream_reply(r(504, "Type not supported"))
    assert s.transfer_type == "a"
