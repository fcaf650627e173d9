"""Control-channel framing: every case fed whole, a byte at a time, split at every position,
and followed by more data; then properties over arbitrary bytes in arbitrary chunks."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.codec import DEFAULT_MAX_LINE, BadLine, Command, CommandReader, Reply, ReplyReader
from gateway.errors import RemoteProtocolError

Event = Command | BadLine

TOO_LONG = BadLine(Reply(500, ("Command line too long.",)))
EMPTY = BadLine(Reply(500, ("Empty command.",)))
UNRECOGNIZED = BadLine(Reply(500, ("Syntax error, command unrecognized.",)))
NUL = BadLine(Reply(500, ("Syntax error: NUL byte in command line.",)))
BARE_CR = BadLine(Reply(500, ("Syntax error: CR inside command line.",)))


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """Whole, one byte at a time, and in two pieces at every position."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def commands(chunks: list[bytes], max_line: int = DEFAULT_MAX_LINE) -> tuple[list[Event], bool]:
    """The events and the final `telnet_interrupt` flag after feeding `chunks`."""
    reader = CommandReader(max_line)
    events = [event for chunk in chunks for event in reader.feed(chunk)]
    return events, reader.telnet_interrupt


def replies(chunks: list[bytes], **bounds: int) -> list[Reply]:
    reader = ReplyReader(**bounds)
    return [reply for chunk in chunks for reply in reader.feed(chunk)]


# ------------------------------------------------------------------------------ commands

# (wire, events, telnet_interrupt)
COMMAND_CASES: list[tuple[bytes, list[Event], bool]] = [
    (b"USER anonymous\r\n", [Command("USER", "anonymous")], False),
    (b"user anonymous\n", [Command("USER", "anonymous")], False),  # bare LF, lower case
    (b"NOOP\r\n", [Command("NOOP")], False),
    (b"PASS \r\n", [Command("PASS")], False),
    (b"RETR my file.txt\r\n", [Command("RETR", "my file.txt")], False),
    (b"STOR  two spaces \r\n", [Command("STOR", " two spaces ")], False),
    (b"ABCDEFGH x\r\n", [Command("ABCDEFGH", "x")], False),
    (b"RETR caf\xc3\xa9\r\n", [Command("RETR", "caf\u00e9")], False),  # RFC 2640 UTF-8
    (b"RETR \xe9t\xe9\r\n", [Command("RETR", "\udce9t\udce9")], False),  # Latin-1 bytes
    (b"RETR a\xff\xffb\r\n", [Command("RETR", "a\udcffb")], False),  # IAC IAC: byte 255
    (b"\xff\xfb\x01NOOP\r\n", [Command("NOOP")], False),  # IAC WILL ECHO
    (b"NO\xff\xfd\x18OP\r\n", [Command("NOOP")], False),  # IAC DO TERMINAL-TYPE mid-line
    (b"\xff\xfe\x01\xff\xfc\x01\xffNOOP\r\n", [Command("NOOP")], False),  # DONT, WONT, IAC
    (b"\xff\xf1NO\xff\xf9OP\r\n", [Command("NOOP")], False),  # IAC NOP, IAC GA
    (b"\xff\xf4\xff\xf2ABOR\r\n", [Command("ABOR")], True),  # IP and Synch before ABOR
    (b"\xff\xf4\xffABOR\r\n", [Command("ABOR")], True),  # the DM went out of band
    (b"\xff\xf2ABOR\n", [Command("ABOR")], True),
    (b"\r\n", [EMPTY], False),
    (b"\n", [EMPTY], False),
    (b" \t \r\n", [EMPTY], False),
    (b"NO\x00OP\r\n", [NUL], False),
    (b"RETR a\x00\r\n", [NUL], False),
    (b"RETR a\rb\r\n", [BARE_CR], False),  # would be two commands to a CR-splitting server
    (b"RETR a\r\r\n", [BARE_CR], False),
    (b"ABCDEFGHI\r\n", [UNRECOGNIZED], False),
    (b"1234\r\n", [UNRECOGNIZED], False),
    (b"RE-TR x\r\n", [UNRECOGNIZED], False),
    (b" NOOP\r\n", [UNRECOGNIZED], False),
    (b"NOOP\tx\r\n", [UNRECOGNIZED], False),
    (b"\xc3\xa9TR x\r\n", [UNRECOGNIZED], False),
    (
        b"USER a\r\nPASS b\nQUIT\r\n",
        [Command("USER", "a"), Command("PASS", "b"), Command("QUIT")],
        False,
    ),
]


@pytest.mark.parametrize(("wire", "expected", "interrupt"), COMMAND_CASES)
def test_command_reader(wire: bytes, expected: list[Event], interrupt: bool) -> None:
    for chunks in chunkings(wire):
        assert commands(chunks) == (expected, interrupt), chunks
        assert commands([*chunks, b"NOOP\r\n"]) == ([*expected, Command("NOOP")], interrupt)


def test_an_unfinished_line_is_held_until_its_lf() -> None:
    reader = CommandReader()
    assert reader.feed(b"RETR file\r") == []
    assert reader.buffered == len(b"RETR file\r")
    assert reader.feed(b"\n") == [Command("RETR", "file")]
    assert reader.buffered == 0


def test_telnet_interrupt_stays_set_until_reset() -> None:
    reader = CommandReader()
    assert reader.feed(b"\xff\xf4\xff\xf2") == []
    assert reader.telnet_interrupt
    assert reader.feed(b"ABOR\r\nNOOP\r\n") == [Command("ABOR"), Command("NOOP")]
    assert reader.telnet_interrupt
    reader.reset_interrupt()
    assert not reader.telnet_interrupt
    reader.feed(b"NOOP\r\n")
    assert not reader.telnet_interrupt


def test_discard_drops_the_unfinished_line_and_telnet_state() -> None:
    reader = CommandReader()
    reader.feed(b"USER secret\xff")
    reader.discard()
    assert reader.buffered == 0
    assert reader.feed(b"\xff\xf4NOOP\r\n") == [Command("NOOP")]
    assert reader.telnet_interrupt


MAX = 16


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        # The limit counts every byte before the LF, CR included.
        (b"NOOP " + b"x" * (MAX - 6) + b"\r\n", [Command("NOOP", "x" * (MAX - 6))]),
        (b"NOOP " + b"x" * (MAX - 5) + b"\r\n", [TOO_LONG]),
        (b"NOOP " + b"x" * (MAX - 5) + b"\n", [Command("NOOP", "x" * (MAX - 5))]),
        (b"A" * (MAX + 1) + b"\n", [TOO_LONG]),
        (b"A" * 100 + b"\r\nNOOP\r\n", [TOO_LONG, Command("NOOP")]),
        (b"A" * 40 + b"\n" + b"B" * 40 + b"\n", [TOO_LONG, TOO_LONG]),
        # Telnet sequences are not part of the line; IAC IAC is one byte of it.
        (b"NOOP\xff\xf1\xff\xf1\xff\xf1\xff\xf1\xff\xf1\xff\xf1\r\n", [Command("NOOP")]),
        (b"NOOP " + b"\xff\xff" * (MAX - 6) + b"\r\n", [Command("NOOP", "\udcff" * (MAX - 6))]),
    ],
)
def test_line_length_bound(wire: bytes, expected: list[Event]) -> None:
    for chunks in chunkings(wire):
        assert commands(chunks, MAX)[0] == expected, chunks
        assert commands([*chunks, b"QUIT\r\n"], MAX)[0] == [*expected, Command("QUIT")]


def test_interrupt_inside_an_over_long_line_is_still_seen() -> None:
    events, interrupt = commands([b"A" * 100 + b"\xff\xf4" + b"A" * 100 + b"\r\n"], MAX)
    assert events == [TOO_LONG]
    assert interrupt


def test_a_mebibyte_without_lf_stays_bounded() -> None:
    reader = CommandReader(max_line=1024)
    assert reader.feed(b"A" * (1 << 20)) == [TOO_LONG]
    assert reader.buffered <= 1024
    for _ in range(256):
        assert reader.feed(b"B" * 4096) == []
        assert reader.buffered <= 1024
    assert reader.feed(b"\r\nNOOP\r\n") == [Command("NOOP")]


@pytest.mark.parametrize(
    "wire",
    [
        b"RETR \xe9\xe8\x80 \xc3(\r\n",  # not UTF-8
        b"STOR caf\xc3\xa9.txt\r\n",  # UTF-8
        b"RETR \xff\xff\xfe\r\n",  # a data byte 255, sent as IAC IAC
        b"SITE CHMOD 755 a\tb\r\n",
        b"CWD /\xed\xa0\x80\r\n",  # an encoded surrogate, invalid UTF-8
    ],
)
def test_arguments_round_trip_byte_exact(wire: bytes) -> None:
    (command,) = CommandReader().feed(wire)
    assert isinstance(command, Command)
    assert command.encode() == wire


@given(st.binary(min_size=1, max_size=64).map(lambda b: b.translate(None, b"\r\n\0")))
def test_any_argument_bytes_round_trip(arg: bytes) -> None:
    wire = b"RETR " + arg.replace(b"\xff", b"\xff\xff") + b"\r\n"
    (command,) = CommandReader().feed(wire)
    assert isinstance(command, Command)
    assert command.encode() == (wire if arg else b"RETR\r\n")


def test_command_encode_and_str() -> None:
    assert Command("NOOP").encode() == b"NOOP\r\n"
    assert Command("RETR", "a b").encode() == b"RETR a b\r\n"
    assert str(Command("RETR", "a b")) == "RETR a b"
    assert str(Command("USER", "anonymous")) == "USER anonymous"
    assert str(Command("PASS", "secret")) == "PASS ****"
    assert str(Command("ACCT", "secret")) == "ACCT ****"
    assert str(Command("PASS")) == "PASS"


@pytest.mark.parametrize(
    ("verb", "arg"),
    [
        ("noop", ""),
        ("", ""),
        ("RE TR", ""),
        ("ABCDEFGHI", ""),
        ("RETR", "a\r\nDELE b"),
        ("RETR", "a\nb"),
        ("RETR", "a\rb"),
        ("RETR", "a\0b"),
        ("RETR", "\ud800"),  # a lone surrogate has no bytes
    ],
)
def test_a_command_that_cannot_be_one_line_cannot_be_made(verb: str, arg: str) -> None:
    with pytest.raises(ValueError):
        Command(verb, arg)


# -------------------------------------------------------------------------------- replies


def test_reply_values() -> None:
    reply = Reply.of(211, "Features:\n SIZE\nEnd")
    assert reply.lines == ("Features:", " SIZE", "End")
    assert reply.text == "Features:\n SIZE\nEnd"
    assert str(reply) == "211 Features: ..."
    assert str(Reply.of(200, "OK")) == "200 OK"


@pytest.mark.parametrize(
    ("code", "kinds"),
    [
        (150, {"preliminary"}),
        (226, {"final", "positive"}),
        (331, {"final", "intermediate"}),
        (425, {"final", "transient"}),
        (550, {"final", "permanent"}),
        (100, {"preliminary"}),
        (599, {"final", "permanent"}),
    ],
)
def test_reply_kinds(code: int, kinds: set[str]) -> None:
    reply = Reply.of(code, "text")
    names = ("preliminary", "final", "positive", "intermediate", "transient", "permanent")
    assert {name for name in names if getattr(reply, name)} == kinds


@pytest.mark.parametrize(
    ("code", "lines"),
    [(99, ("x",)), (600, ("x",)), (200, ()), (200, ("a\nb",)), (200, ("a", "b\n"))],
)
def test_a_reply_that_cannot_be_framed_cannot_be_made(code: int, lines: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Reply(code, lines)


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply.of(200, "OK"), b"200 OK\r\n"),
        (Reply.of(200, ""), b"200 \r\n"),
        (Reply.of(226, "a\nb"), b"226-a\r\n226 b\r\n"),
        (Reply.of(211, "Features:\n SIZE\nEnd"), b"211-Features:\r\n SIZE\r\n211 End\r\n"),
        # RFC 959 section 4.2: a middle line that looks like a reply line is indented.
        (
            Reply.of(226, "a\n226 fake end\n211-other\n123\n12 x\nok"),
            b"226-a\r\n 226 fake end\r\n 211-other\r\n 123\r\n12 x\r\n226 ok\r\n",
        ),
        # CR is dropped: a client must not see a line end the gateway did not frame.
        (Reply.of(550, "no\r\nsuch\rfile"), b"550-no\r\n550 suchfile\r\n"),
        (Reply.of(257, '"/\udce9" created'), b'257 "/\xe9" created\r\n'),
    ],
)
def test_reply_encode(reply: Reply, wire: bytes) -> None:
    assert reply.encode() == wire


# (wire, replies)
REPLY_CASES: list[tuple[bytes, list[Reply]]] = [
    (b"220 Welcome\r\n", [Reply.of(220, "Welcome")]),
    (b"220 Welcome\n", [Reply.of(220, "Welcome")]),
    (b"200\r\n", [Reply.of(200, "")]),
    (b"220 \r\n", [Reply.of(220, "")]),
    (b"226-First\r\n line\r\n226 End\r\n", [Reply.of(226, "First\n line\nEnd")]),
    (
        b"211-Features:\r\n MDTM\r\n SIZE\r\n211 End\r\n",
        [Reply(211, ("Features:", " MDTM", " SIZE", "End"))],
    ),
    # Many servers put the code on every line.
    (b"230-Hello\r\n230-world\r\n230 done\r\n", [Reply.of(230, "Hello\nworld\ndone")]),
    # Lines that look like codes, but not this reply's final one, are text.
    (
        b"226-a\r\n150 not the end\r\n2260 nor this\r\n226-b\r\n226 c\r\n",
        [Reply.of(226, "a\n150 not the end\n2260 nor this\nb\nc")],
    ),
    (b"226-a\r\n226\r\n", [Reply.of(226, "a\n")]),
    (b"226-a\nb\n226 c\n", [Reply.of(226, "a\nb\nc")]),
    (b"220-\r\n\r\n220 \r\n", [Reply.of(220, "\n\n")]),
    (b'257 "/\xe9" created\r\n', [Reply.of(257, '"/\udce9" created')]),
    (b"220 a\rb\r\n", [Reply(220, ("a\rb",))]),
    (b"150 Opening\r\n226 Done\r\n", [Reply.of(150, "Opening"), Reply.of(226, "Done")]),
]


@pytest.mark.parametrize(("wire", "expected"), REPLY_CASES)
def test_reply_reader(wire: bytes, expected: list[Reply]) -> None:
    for chunks in chunkings(wire):
        assert replies(chunks) == expected, chunks
        assert replies([*chunks, b"200 OK\r\n"]) == [*expected, Reply.of(200, "OK")]


def test_reply_reader_holds_an_unfinished_reply() -> None:
    reader = ReplyReader()
    assert reader.feed(b"226-a\r\n226 b") == []
    assert reader.buffered == len(b"226 b")
    assert reader.feed(b"\r\n") == [Reply.of(226, "a\nb")]
    assert reader.buffered == 0


# (bounds, wire)
BAD_REPLIES: list[tuple[dict[str, int], bytes]] = [
    ({}, b"hello\r\n"),
    ({}, b"\r\n"),
    ({}, b" 220 x\r\n"),
    ({}, b"099 x\r\n"),
    ({}, b"600 x\r\n"),
    ({}, b"22 x\r\n"),
    ({}, b"2200 x\r\n"),
    ({}, b"220x\r\n"),
    ({}, b"+20 x\r\n"),
    ({}, b"220 a\x00b\r\n"),
    ({}, b"220-a\r\nb\x00\r\n220 c\r\n"),
    ({"max_line": 16}, b"220 " + b"x" * 20 + b"\r\n"),
    ({"max_line": 16}, b"220 " + b"x" * 20),  # no LF yet: the bound holds all the same
    ({"max_line": 16}, b"220-a\r\n" + b"x" * 20 + b"\r\n220 b\r\n"),
    ({"max_lines": 3}, b"226-a\r\nb\r\nc\r\n226 d\r\n"),
    ({"max_bytes": 64}, b"200 " + b"x" * 59 + b"\r\n"),  # 65 bytes
    ({"max_bytes": 64}, b"226-" + b"x" * 30 + b"\r\n" + b"x" * 30 + b"\r\n226 \r\n"),
    # 1yz replies count towards the reply that ends the command (RFC 959 section 4.2).
    ({"max_lines": 3}, b"150 a\r\n150 b\r\n150 c\r\n226 d\r\n"),
    ({"max_lines": 3}, b"150 a\r\n150 b\r\n150 c\r\n150 d\r\n"),  # no final reply at all
    ({"max_lines": 3}, b"150 a\r\n150 b\r\n226-c\r\n226 d\r\n"),
    ({"max_lines": 3}, b"150-a\r\nb\r\n150 c\r\n226 d\r\n"),
    ({"max_bytes": 64}, (b"150 " + b"x" * 26 + b"\r\n") * 2 + b"226 \r\n"),  # 70 bytes
]


@pytest.mark.parametrize(("bounds", "wire"), BAD_REPLIES)
def test_reply_reader_refuses(bounds: dict[str, int], wire: bytes) -> None:
    for chunks in chunkings(wire):
        with pytest.raises(RemoteProtocolError) as caught:
            replies(chunks, **bounds)
        assert caught.value.reply_code == 421
        assert caught.value.message


@pytest.mark.parametrize(
    ("bounds", "wire"),
    [
        ({"max_line": 16}, b"220 " + b"x" * 10 + b"\r\n"),  # 16 bytes before the LF
        ({"max_lines": 3}, b"226-a\r\nb\r\n226 d\r\n"),
        ({"max_bytes": 64}, b"200 " + b"x" * 58 + b"\r\n"),  # 64 bytes
    ],
)
def test_reply_reader_accepts_up_to_its_bounds(bounds: dict[str, int], wire: bytes) -> None:
    for chunks in chunkings(wire):
        assert len(replies([*chunks, wire], **bounds)) == 2  # and the count starts again


def test_reply_reader_counts_1yz_replies_per_command() -> None:
    """Up to the bounds with 1yz replies, and the count starts again after each final reply;
    an endless run of single-line 1yz replies is cut off at `max_lines`."""
    wire = b"150 a\r\n150 b\r\n226 d\r\n"  # 3 lines, 24 bytes
    for chunks in chunkings(wire):
        assert [r.code for r in replies([*chunks, wire], max_lines=3, max_bytes=24)] == [
            150,
            150,
            226,
        ] * 2
    reader = ReplyReader(max_lines=1000)
    with pytest.raises(RemoteProtocolError) as caught:
        for _ in range(1001):
            reader.feed(b"120 Service ready soon.\r\n")
    assert caught.value.reply_code == 421


def test_reply_reader_bounds_a_mebibyte_without_lf() -> None:
    reader = ReplyReader(max_line=1024)
    reader.feed(b"220 " + b"x" * 1020)
    assert reader.buffered == 1024
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"x")
    with pytest.raises(RemoteProtocolError):
        ReplyReader(max_line=1024).feed(b"x" * (1 << 20))


# ----------------------------------------------------------------------------- properties

# Pieces that make the readers' interesting cases likely, mixed with arbitrary bytes.
FRAGMENTS = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"\xff", b"\xf4", b"\xf2", b"\xfb", b"\0", b" ", b"-", b"USER",
     b"abor", b"226", b"226-", b"226 ", b"150 ", b"x", b"\xe9", b"999"]
)  # fmt: skip
BYTES = st.lists(st.one_of(FRAGMENTS, st.binary(max_size=8)), max_size=40).map(b"".join)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary positions."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=500)
@given(st.data(), BYTES, st.integers(1, 32))
def test_command_reader_takes_anything(data: st.DataObject, wire: bytes, max_line: int) -> None:
    chunks = data.draw(split(wire))
    reader = CommandReader(max_line)
    events: list[Event] = []
    for chunk in chunks:
        events += reader.feed(chunk)
        assert reader.buffered <= max_line
    for event in events:
        if isinstance(event, BadLine):
            assert event.reply.permanent
        else:
            assert re.fullmatch("[A-Z]{1,8}", event.verb)
    # Framing does not depend on how the bytes were cut.
    assert commands([wire], max_line) == (events, reader.telnet_interrupt)


@settings(max_examples=500)
@given(st.data(), BYTES, st.integers(4, 32), st.integers(1, 4), st.integers(8, 128))
def test_reply_reader_takes_anything(
    data: st.DataObject, wire: bytes, max_line: int, max_lines: int, max_bytes: int
) -> None:
    bounds = {"max_line": max_line, "max_lines": max_lines, "max_bytes": max_bytes}
    chunks = data.draw(split(wire))
    try:
        whole: list[Reply] | None = replies([wire], **bounds)
    except RemoteProtocolError as e:
        assert e.reply_code == 421
        whole = None
    try:
        assert replies(chunks, **bounds) == whole
    except RemoteProtocolError:
        assert whole is None


LINE = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0")),
    st.binary().map(lambda b: b.translate(None, b"\r\n\0").decode("utf-8", "surrogateescape")),
    st.sampled_from(["226 end?", "226-more", "150 x", "123", " 226 x", ""]),
)


@given(st.data(), st.integers(100, 599), st.lists(LINE, min_size=1, max_size=6))
def test_reply_round_trip(data: st.DataObject, code: int, lines: list[str]) -> None:
    reply = Reply(code, tuple(lines))
    middle = [" " + x if re.match(r"[0-9]{3}([ -]|\Z)", x) else x for x in lines[1:-1]]
    expected = Reply(code, (lines[0], *middle, lines[-1]) if len(lines) > 1 else (lines[0],))
    assert replies(data.draw(split(reply.encode()))) == [expected]
