"""Reply pairing (`gateway.pairing`) alone: which upstream reply reaches which handler."""

from __future__ import annotations

from gateway.codec import Command, Reply
from gateway.effects import Effect, ToClient, ToUpstream
from gateway.pairing import Pairing


def r(code: int, text: str = "x") -> Reply:
    return Reply.of(code, text)


class Recorder:
    """A handler that records what it was given, by name."""

    def __init__(self, log: list[tuple[str, int]], name: str) -> None:
        self.log, self.name = log, name

    def __call__(self, answer: Reply) -> list[Effect]:
        self.log.append((self.name, answer.code))
        return [ToClient(answer)]


def test_replies_reach_the_oldest_waiting_command_in_order() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    assert pairing.send(Command("CWD", "a"), Recorder(seen, "cwd")) == [
        ToUpstream(Command("CWD", "a"))
    ]
    pairing.send(Command("PWD", ""), Recorder(seen, "pwd"))
    pairing.deliver(r(250))
    pairing.deliver(r(257))
    assert seen == [("cwd", 250), ("pwd", 257)]
    assert not pairing.waiting
    assert pairing.deliver(r(200)) is None  # nobody asked: unsolicited


def test_a_1xx_goes_to_its_own_handler_or_nowhere_and_keeps_the_command_waiting() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    pairing.send(
        Command("RETR", "f"), Recorder(seen, "final"), on_preliminary=Recorder(seen, "1xx")
    )
    pairing.send(Command("NOOP", ""), Recorder(seen, "noop"))
    assert pairing.deliver(r(150)) == [ToClient(r(150))]
    pairing.deliver(r(226))
    assert pairing.deliver(r(120)) == []  # NOOP wants no 1xx: dropped, NOOP still waits
    pairing.deliver(r(200))
    assert seen == [("1xx", 150), ("final", 226), ("noop", 200)]
    assert pairing.delivered == 4  # every reply moves the mark the reply timer is armed with


def test_dropped_work_keeps_its_place_but_its_replies_reach_nobody() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    transfer = object()
    pairing.send(Command("EPSV", ""), Recorder(seen, "epsv"), owner=transfer)
    pairing.send(Command("RETR", "f"), Recorder(seen, "retr"), owner=transfer)
    pairing.send(Command("PWD", ""), Recorder(seen, "pwd"))
    pairing.drop(transfer)
    assert pairing.deliver(r(229)) == []
    assert pairing.deliver(r(150)) == []
    assert pairing.deliver(r(426)) == []
    assert pairing.deliver(r(257)) == [ToClient(r(257))]
    assert seen == [("pwd", 257)]


def test_a_reply_read_before_a_command_was_sent_cannot_answer_it() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    horizon = pairing.horizon  # the bytes were read now, nothing sent yet
    pairing.send(Command("NOOP", ""), Recorder(seen, "noop"))
    assert pairing.deliver(r(200), horizon) is None
    assert pairing.deliver(r(200), pairing.horizon) == [ToClient(r(200))]
    assert seen == [("noop", 200)]


def test_the_greeting_is_awaited_without_a_command() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    pairing.expect(Recorder(seen, "greeting"))
    assert pairing.deliver(r(220), pairing.horizon) == [ToClient(r(220))]
    assert seen == [("greeting", 220)] and pairing.sent == 0


def test_a_225_to_abor_also_ends_the_aborted_command_that_got_no_final_reply() -> None:
    # pyftpdlib answers ABOR of a transfer still waiting for its data connection with one
    # 225 and never answers the transfer command: 225 answers only ABOR (RFC 959 section 5.4).
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    transfer = object()
    pairing.send(Command("STOR", "f"), Recorder(seen, "stor"), owner=transfer)
    assert pairing.abort(transfer) == [ToUpstream(Command("ABOR", ""))]
    pairing.send(Command("NOOP", ""), Recorder(seen, "noop"))
    assert pairing.deliver(r(225)) == []
    assert pairing.deliver(r(200)) == [ToClient(r(200))]
    assert seen == [("noop", 200)]
    assert not pairing.waiting


def test_426_then_226_after_abor_pair_with_the_transfer_and_abor_as_before() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    transfer = object()
    pairing.send(Command("RETR", "f"), Recorder(seen, "retr"), owner=transfer)
    pairing.abort(transfer)
    pairing.send(Command("NOOP", ""), Recorder(seen, "noop"))
    pairing.deliver(r(426))  # the transfer's
    pairing.deliver(r(226))  # ABOR's
    assert pairing.owed == 1  # NOOP still waits: neither reply was taken for it
    pairing.deliver(r(200))
    assert seen == [("noop", 200)]


def test_a_225_reaching_a_command_that_was_not_aborted_is_its_reply() -> None:
    seen: list[tuple[str, int]] = []
    pairing = Pairing()
    pairing.send(Command("SITE", "x"), Recorder(seen, "site"))
    pairing.send(Command("NOOP", ""), Recorder(seen, "noop"))
    pairing.deliver(r(225))
    assert seen == [("site", 225)]
