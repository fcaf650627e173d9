"""Generated command streams against the pure session, with a well-behaved simulated upstream.

Whatever the client sends, in whatever order, the session must not raise, must answer every
client line with exactly one final reply (ABOR during a transfer: 426 for the transfer command,
226 for the ABOR), and those replies must be well-formed.
"""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.addresses import HostPort
from gateway.codec import BadLine, CommandReader, Reply
from gateway.config import Config
from gateway.effects import (
    CloseClient,
    ConnectData,
    ListenData,
    StartRelay,
    ToClient,
    ToUpstream,
)
from gateway.session import Session

CLIENT = HostPort.of("192.0.2.10", 40000)
LOCAL = HostPort.of("192.0.2.1", 2121)

VOCABULARY = [
    "USER a",
    "PASS b",
    "PWD",
    "CWD /x",
    "TYPE I",
    "TYPE A",
    "MODE S",
    "NOOP",
    "SYST",
    "FEAT",
    "PASV",
    "EPSV",
    "EPSV 1",
    "EPSV 2",
    "EPSV ALL",
    "PORT 192,0,2,10,200,1",
    "PORT 10,0,0,1,200,1",
    "PORT 192,0,2,10,0,20",
    "PORT 1,2,3",
    "EPRT |1|192.0.2.10|5000|",
    "EPRT |2|::1|5000|",
    "EPRT garbage",
    "LPRT 4,4,1,2,3,4,2,1,1",
    "RETR f",
    "STOR g",
    "APPE g",
    "STOU",
    "LIST",
    "NLST",
    "MLSD",
    "REST 10",
    "REST x",
    "ABOR",
    "SIZE f",
    "MDTM f",
    "AUTH TLS",
    "PROT P",
    "SITE CHMOD 644 f",
    "HELP",
    "XYZZY",
    "STAT",
]

UPSTREAM_ANSWERS = {
    "EPSV": Reply.of(229, "Entering Extended Passive Mode (|||7000|)"),
    "PASV": Reply.of(227, "Entering Passive Mode (203,0,113,5,27,88)"),
    "REST": Reply.of(350, "Restarting"),
    "FEAT": Reply(211, ("Features:", " SIZE", "End")),
    "QUIT": Reply.of(221, "bye"),
}
TRANSFERS = {"RETR", "STOR", "APPE", "STOU", "LIST", "NLST", "MLSD"}


def drive(lines: list[bytes], epsv_works: bool) -> tuple[list[Reply], bool]:
    session = Session(Config(upstream=("ftp.test", 21)), client_peer=CLIENT, client_local=LOCAL)
    owed: deque[list[Reply]] = deque()
    to_client: list[Reply] = []
    closed = False

    def apply(effects: list[object]) -> None:
        nonlocal closed
        for effect in effects:
            match effect:
                case ToClient(answer):
                    to_client.append(answer)
                case ToUpstream(command):
                    verb = command.verb
                    if verb in TRANSFERS:
                        owed.append([Reply.of(150, "go"), Reply.of(226, "done")])
                    elif verb == "EPSV" and not epsv_works:
                        owed.append([Reply.of(500, "no")])
                    else:
                        owed.append([UPSTREAM_ANSWERS.get(verb, Reply.of(200, "ok"))])
                case ListenData(side):
                    apply(session.data_listening(side, HostPort.of("192.0.2.1", 30000)))
                    apply(session.data_connected(side))  # the peer connects at once
                case ConnectData(side, _):
                    apply(session.data_connected(side))
                case StartRelay():
                    apply(session.relay_finished(True, "0 bytes"))
                case CloseClient():
                    closed = True

    apply(session.start())
    apply(
        session.upstream_connected(HostPort.of("198.51.100.1", 5), HostPort.of("203.0.113.5", 21))
    )
    apply(session.upstream_reply(Reply.of(220, "hi")))
    while owed:  # the FEAT the gateway asks before login
        for answer in owed.popleft():
            apply(session.upstream_reply(answer))
    greeting = len(to_client)
    assert greeting == 1
    reader = CommandReader()
    for raw in lines:
        for event in reader.feed(raw):
            apply(session.client_line(event))
        # Let the upstream answer one command between client lines, sometimes none.
        for _ in range(3):
            if owed:
                for answer in owed.popleft():
                    apply(session.upstream_reply(answer))
    for _ in range(200):
        if not owed:
            break
        for answer in owed.popleft():
            apply(session.upstream_reply(answer))
    return to_client[greeting:], closed


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(VOCABULARY), max_size=25),
    st.booleans(),
)
def test_every_command_gets_exactly_one_final_reply(commands: list[str], epsv_works: bool) -> None:
    lines = [c.encode() + b"\r\n" for c in commands]
    replies, closed = drive(lines, epsv_works)
    finals = [r for r in replies if r.final]
    assert not closed
    assert len(finals) == len(commands)
    for answer in replies:
        assert 100 <= answer.code <= 599
        assert answer.encode().endswith(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_arbitrary_bytes_never_raise_and_every_line_is_answered(chunks: list[bytes]) -> None:
    reader = CommandReader()
    expected = sum(1 for c in chunks for _ in reader.feed(c))
    replies, closed = drive(chunks, True)
    finals = [r for r in replies if r.final]
    if not closed:
        assert len(finals) == expected


def test_bad_line_gets_a_5xx_reply() -> None:
    (event,) = CommandReader().feed(b"\x00\x01\r\n")
    assert isinstance(event, BadLine) and event.reply.code >= 500
    session = Session(Config(), client_peer=CLIENT, client_local=LOCAL)
    session.start()
    (effect,) = session.client_line(event)
    assert isinstance(effect, ToClient) and effect.reply.code >= 500
