"""Control-channel framing: client bytes into commands, upstream bytes into replies.

Pure and sans-I/O: the Twisted shell feeds received bytes in and writes `encode()` out. Text is
UTF-8 (RFC 2640 section 2.2) decoded with ``surrogateescape``, so a path name in any encoding
reaches the other side byte for byte. Every buffer is bounded, whatever the peer sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto

from gateway.errors import RemoteProtocolError

CRLF = b"\r\n"
#: The longest command line a client may send: the default of `limits.max_line`, kept at or
#: below what upstreams accept (pyftpdlib takes 2048).
DEFAULT_MAX_LINE = 2048
#: The longest upstream reply line, or `limits.max_line` if that is larger: a server's replies
#: (a long path in 257, a long FEAT list) may be longer than what clients send.
MAX_REPLY_LINE = 4096

# RFC 854: the Telnet commands the control connection may carry (RFC 959 section 4.1.1).
_IAC = 255  # "interpret as command"; IAC IAC is a data byte 255
_WILL, _WONT, _DO, _DONT = 251, 252, 253, 254  # option negotiation: IAC <verb> <option>
_IP, _DM = 244, 242  # Interrupt Process and Data Mark, sent before ABOR (RFC 959 section 4.1.3)
_SE = 240  # the lowest Telnet command code; below it a byte after IAC is not a command

# RFC 959 section 5.3.1: <command> ::= <verb> [<SP> <argument>] <CRLF>. RFC 959's verbs are
# alphabetic and at most four letters; extensions (RFC 3659 "MLSD", RFC 2389 "OPTS", ...) stay
# alphabetic, so eight letters leaves room without admitting anything that is not a verb.
_VERB = re.compile(rb"[A-Za-z]{1,8}")
_UPPER_VERB = re.compile(r"[A-Z]{1,8}")
# RFC 959 section 4.2: "ddd<SP>text" is a complete reply (or the last line of a multi-line
# one), "ddd-text" starts a multi-line reply; a bare "ddd" is taken as "ddd " with no text.
_REPLY_LINE = re.compile(rb"([1-5][0-9][0-9])([ -]|\Z)")
# The same shape in text: a middle line like this must be indented when sent (section 4.2).
_LOOKS_LIKE_REPLY = re.compile(r"[0-9]{3}(?:[ -]|\Z)")
_LINE_END_OR_IAC = re.compile(rb"[\n\xff]")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Command:
    """One client command: `verb` upper-cased, `arg` everything after the first space.

    Construction refuses CR, LF and NUL in the argument (and anything but letters in the verb),
    so `encode()` always writes exactly one line: an argument the gateway relays can never
    smuggle a second command past it.
    """

    verb: str
    arg: str = ""

    def __post_init__(self) -> None:
        if not _UPPER_VERB.fullmatch(self.verb):
            raise ValueError(f"not an upper-case FTP verb: {self.verb!r}")
        raw = _encode(self.arg)  # raises UnicodeEncodeError (a ValueError) for lone surrogates
        if b"\r" in raw or b"\n" in raw or b"\0" in raw:
            raise ValueError(f"a command argument cannot contain CR, LF or NUL: {self.arg!r}")

    def encode(self) -> bytes:
        """The wire form, "VERB arg" + CRLF. A data byte 255 is sent as IAC IAC (RFC 1123
        section 3.2.6), which gives back exactly the bytes a client sent."""
        line = _encode(f"{self.verb} {self.arg}" if self.arg else self.verb)
        return line.replace(b"\xff", b"\xff\xff") + CRLF

    def __str__(self) -> str:
        """For logs: the password of PASS and ACCT is masked."""
        if not self.arg:
            return self.verb
        return f"{self.verb} {'****' if self.verb in ('PASS', 'ACCT') else self.arg}"


@dataclass(frozen=True, slots=True)
class Reply:
    """One FTP reply: a code from 100 to 599 and one or more lines of text, without the code.

    Lines may not contain LF (`Reply.of` splits on it), so a reply cannot hide another.
    """

    code: int
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 100 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} is not from 100 to 599")
        if not self.lines:
            raise ValueError("a reply has at least one line")
        if any("\n" in line for line in self.lines):
            raise ValueError("a reply line cannot contain LF; use Reply.of to split text")

    @classmethod
    def of(cls, code: int, text: str) -> Reply:
        """A reply whose lines are the lines of `text`."""
        return cls(code, tuple(text.split("\n")))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    # RFC 959 section 4.2.1: the first digit says how the command fared.
    @property
    def preliminary(self) -> bool:
        """1yz: another reply follows before the client may send its next command."""
        return self.code < 200

    @property
    def final(self) -> bool:
        """2yz to 5yz: the command is done; the next one may be sent."""
        return self.code >= 200

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def encode(self) -> bytes:
        """The wire form (RFC 959 section 4.2).

        One line is "ddd text"; several are "ddd-first", the middle lines, "ddd last". A
        middle line that starts like a reply line is indented by one space so that no client
        can take it for the end of the reply. CR is dropped from the text for the same reason.
        """
        lines = [line.replace("\r", "") for line in self.lines]
        if len(lines) == 1:
            return _encode(f"{self.code} {lines[0]}") + CRLF
        middle = [" " + line if _LOOKS_LIKE_REPLY.match(line) else line for line in lines[1:-1]]
        out = [f"{self.code}-{lines[0]}", *middle, f"{self.code} {lines[-1]}"]
        return b"".join(_encode(line) + CRLF for line in out)

    def __str__(self) -> str:
        """For logs: the code and the first line."""
        return f"{self.code} {self.lines[0]}" + (" ..." if len(self.lines) > 1 else "")


@dataclass(frozen=True, slots=True)
class BadLine:
    """A client line that cannot be a command; `reply` is what to answer."""

    reply: Reply


# RFC 959 section 4.2.1: 500 is "Syntax error, command unrecognized" (line too long included).
_TOO_LONG = BadLine(Reply(500, ("Command line too long.",)))
_EMPTY = BadLine(Reply(500, ("Empty command.",)))
_UNRECOGNIZED = BadLine(Reply(500, ("Syntax error, command unrecognized.",)))
_NUL = BadLine(Reply(500, ("Syntax error: NUL byte in command line.",)))
_BARE_CR = BadLine(Reply(500, ("Syntax error: CR inside command line.",)))


class _Telnet(Enum):
    """Where the reader is in a Telnet command sequence."""

    DATA = auto()
    AFTER_IAC = auto()
    OPTION = auto()  # after IAC WILL/WONT/DO/DONT: one option byte follows


class CommandReader:
    """Frames client bytes into `Command` and `BadLine` events.

    Any chunking works, byte at a time included. Telnet commands are removed (RFC 854, RFC 959
    section 4.1.1) and `IAC IAC` is a data byte 255; IP and DM, which clients send before ABOR
    (RFC 959 section 4.1.3), set `telnet_interrupt`. A line longer than `max_line` bytes
    (counting everything before the LF, CR included) gets a single 500 and is skipped up to its
    LF, so memory stays bounded whatever the client sends.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self.telnet_interrupt = False
        self._line = bytearray()
        self._telnet = _Telnet.DATA
        self._discarding = False  # inside a line already answered as too long

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held; never more than `max_line`."""
        return len(self._line)

    def reset_interrupt(self) -> None:
        self.telnet_interrupt = False

    def discard(self) -> None:
        """Drop whatever is buffered: after AUTH TLS nothing sent in clear text may count."""
        self._line.clear()
        self._telnet = _Telnet.DATA
        self._discarding = False

    def feed(self, data: bytes) -> list[Command | BadLine]:
        """The events completed by `data`, in order."""
        events: list[Command | BadLine] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._telnet is _Telnet.OPTION:
                self._telnet = _Telnet.DATA
                pos += 1
                continue
            if self._telnet is _Telnet.AFTER_IAC:
                byte = data[pos]
                self._telnet = _Telnet.DATA
                if byte < _SE:
                    # Not a Telnet command (RFC 854 codes are 240-255). This is what a client's
                    # "IAC IP IAC DM" looks like when DM went out of band as urgent data and
                    # was lost: keep the byte, it starts the ABOR that follows.
                    continue
                pos += 1
                if byte == _IAC:
                    self._append(b"\xff", events)
                elif byte in (_WILL, _WONT, _DO, _DONT):
                    self._telnet = _Telnet.OPTION  # dropped: the gateway negotiates no option
                elif byte in (_IP, _DM):
                    self.telnet_interrupt = True
                continue
            special = _LINE_END_OR_IAC.search(data, pos)
            stop = end if special is None else special.start()
            if stop > pos:
                self._append(view[pos:stop], events)
            if special is None:
                break
            pos = stop + 1
            if data[stop] == _IAC:
                self._telnet = _Telnet.AFTER_IAC
            else:
                self._end_line(events)
        return events

    def _append(self, chunk: bytes | memoryview, events: list[Command | BadLine]) -> None:
        if self._discarding:
            return
        if len(self._line) + len(chunk) > self.max_line:
            self._line.clear()
            self._discarding = True
            events.append(_TOO_LONG)
            return
        self._line += chunk

    def _end_line(self, events: list[Command | BadLine]) -> None:
        if self._discarding:
            self._discarding = False
        else:
            events.append(_parse_command(bytes(self._line)))
        self._line.clear()


def _parse_command(raw: bytes) -> Command | BadLine:
    """One line, LF removed. The line ends at LF; a CR before it is dropped, so bare LF works."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if b"\0" in raw:
        return _NUL
    if b"\r" in raw:
        # RFC 854: CR is followed by LF or NUL and "avoided in other contexts". Relayed as is, a
        # server that ends lines at CR would read the rest as a command the gateway never saw.
        return _BARE_CR
    if not raw.strip():
        return _EMPTY
    verb, _, arg = raw.partition(b" ")
    if not _VERB.fullmatch(verb):
        return _UNRECOGNIZED
    return Command(verb.decode("ascii").upper(), _decode(arg))


class ReplyReader:
    """Frames upstream bytes into `Reply` values (RFC 959 section 4.2), bounded.

    Lines end at LF, with or without CR. A multi-line reply starts "ddd-" and ends at the first
    line that starts "ddd " with the same code (or is just "ddd"); lines in between are kept as
    text, less a "ddd-" prefix of the same code, which many servers put on every line.

    Preliminary (1yz) replies count towards the bounds of the final reply that follows them
    (RFC 959 section 4.2: they answer the same command), so an endless run of single-line 1yz
    replies is cut off like an endless multi-line reply.

    Anything else raises `RemoteProtocolError` with code 421: a line over `max_line` bytes, a
    reply (with the 1yz replies before it) of more than `max_lines` lines or `max_bytes` bytes,
    a reply that does not start with
    a code from 100 to 599, a NUL byte. An upstream that does not speak FTP ends the session
    rather than confuse the client; the reader is not to be fed again after it raised.
    """

    def __init__(
        self,
        max_line: int = MAX_REPLY_LINE,
        max_lines: int = 1000,
        max_bytes: int = 256 * 1024,
    ) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._partial = bytearray()  # the unfinished line, at most max_line bytes
        self._code: bytes | None = None  # the code of the multi-line reply being read
        self._lines: list[str] = []
        self._size = 0  # wire bytes of the reply being read and of the 1yz replies before it
        self._preliminary_lines = 0  # lines of the 1yz replies since the last final reply

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held; never more than `max_line`."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by `data`, in order."""
        replies: list[Reply] = []
        view = memoryview(data)
        pos = 0
        while (stop := data.find(b"\n", pos)) >= 0:
            if len(self._partial) + stop - pos > self.max_line:
                raise self._too_long()
            if self._partial:
                raw = bytes(self._partial) + data[pos:stop]
                self._partial.clear()
            else:
                raw = data[pos:stop]
            pos = stop + 1
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)
        if len(self._partial) + len(data) - pos > self.max_line:
            raise self._too_long()
        self._partial += view[pos:]
        return replies

    def _too_long(self) -> RemoteProtocolError:
        return RemoteProtocolError(f"reply line longer than {self.max_line} bytes.", 421)

    def _line(self, raw: bytes) -> Reply | None:
        if b"\0" in raw:
            raise RemoteProtocolError("NUL byte in a reply.", 421)
        self._size += len(raw) + 1
        if self._size > self.max_bytes:
            raise RemoteProtocolError(f"reply larger than {self.max_bytes} bytes.", 421)
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        match = _REPLY_LINE.match(raw)
        if self._code is None:
            if match is None:
                raise RemoteProtocolError(f"not an FTP reply: {_decode(raw[:40])!r}.", 421)
            if match.group(2) == b"-":
                self._code = match.group(1)
                self._lines = [_decode(raw[4:])]
                return None
            return self._complete(Reply(int(match.group(1)), (_decode(raw[4:]),)))
        if len(self._lines) + self._preliminary_lines >= self.max_lines:
            raise RemoteProtocolError(f"reply of more than {self.max_lines} lines.", 421)
        if match is None or match.group(1) != self._code:
            self._lines.append(_decode(raw))
            return None
        self._lines.append(_decode(raw[4:]))
        if match.group(2) == b"-":
            return None  # "ddd-text" in the middle: a server that prefixes every line
        reply = Reply(int(self._code), tuple(self._lines))
        self._code, self._lines = None, []
        return self._complete(reply)

    def _complete(self, reply: Reply) -> Reply:
        """Start the count afresh after a final reply; after a 1yz reply, carry it on."""
        if self._preliminary_lines + len(reply.lines) > self.max_lines:
            raise RemoteProtocolError(
                f"reply of more than {self.max_lines} lines with the 1yz replies before it.", 421
            )
        if reply.final:
            self._size = self._preliminary_lines = 0
        else:
            self._preliminary_lines += len(reply.lines)
        return reply
