"""Control-channel framing: client lines into commands, upstream bytes into replies.

Pure and sans-I/O. Text is UTF-8 (RFC 2640) decoded with `surrogateescape`, so any byte a
client puts in a path name comes back out unchanged when the command is relayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import RemoteProtocolError

CRLF = b"\r\n"
DEFAULT_MAX_LINE = 4096

# RFC 854: Telnet commands the control connection may carry (RFC 959 section 4.1.1, 4.1.3).
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
IP, DM = 244, 242

_VERB = re.compile(r"[A-Za-z]{1,8}")
# RFC 959 section 4.2: "ddd text" ends a reply, "ddd-text" starts a multi-line one.
_REPLY_LINE = re.compile(rb"([1-5][0-9][0-9])([ -]|$)")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Command:
    """One client command; `verb` is upper-cased, `arg` is everything after the first space."""

    verb: str
    arg: str = ""

    def encode(self) -> bytes:
        return _encode(f"{self.verb} {self.arg}" if self.arg else self.verb) + CRLF

    def __str__(self) -> str:
        if self.verb in ("PASS", "ACCT") and self.arg:
            return f"{self.verb} ****"
        return f"{self.verb} {self.arg}" if self.arg else self.verb


@dataclass(frozen=True, slots=True)
class Reply:
    """One FTP reply: a code and one or more lines of text (without the code prefix)."""

    code: int
    lines: tuple[str, ...]

    @classmethod
    def of(cls, code: int, text: str) -> Reply:
        return cls(code, tuple(text.split("\n")))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def preliminary(self) -> bool:
        return 100 <= self.code < 200

    @property
    def final(self) -> bool:
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
        return 500 <= self.code < 600

    def encode(self) -> bytes:
        """Wire form. RFC 959 section 4.2: a multi-line reply is "ddd-first", the middle lines,
        "ddd last"; a middle line that looks like a reply line is indented so it cannot end
        the reply early."""
        code = str(self.code)
        lines = [line.replace("\r", "") for line in self.lines] or [""]
        if len(lines) == 1:
            return _encode(f"{code} {lines[0]}") + CRLF
        out = [f"{code}-{lines[0]}"]
        for line in lines[1:-1]:
            out.append(" " + line if _REPLY_LINE.match(_encode(line)) else line)
        out.append(f"{code} {lines[-1]}")
        return b"".join(_encode(line) + CRLF for line in out)

    def __str__(self) -> str:
        return f"{self.code} {self.lines[0]}" + (" ..." if len(self.lines) > 1 else "")


@dataclass(frozen=True, slots=True)
class BadLine:
    """A client line that cannot be a command; `reply` is what to answer."""

    reply: Reply


class CommandReader:
    """Frames client bytes into `Command` and `BadLine` events.

    Accepts any chunking. Telnet sequences are removed (`IAC IAC` is a literal 0xFF); IP and
    DM, which clients send before ABOR (RFC 959 section 4.1.3), set `telnet_interrupt`. A line
    longer than `max_line` gets one 500 and is discarded up to its end without being buffered.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self.telnet_interrupt = False
        self._line = bytearray()
        self._telnet = 0  # 0: data; 1: after IAC; 2: after IAC WILL/WONT/DO/DONT
        self._discarding = False

    @property
    def buffered(self) -> int:
        return len(self._line)

    def reset_interrupt(self) -> None:
        self.telnet_interrupt = False

    def discard(self) -> None:
        """Drop whatever is buffered: after AUTH TLS nothing sent in clear text may count."""
        self._line.clear()
        self._telnet = 0
        self._discarding = False

    def feed(self, data: bytes) -> list[Command | BadLine]:
        events: list[Command | BadLine] = []
        line = self._line
        for byte in data:
            if self._telnet == 1:
                self._telnet = 0
                if byte in (WILL, WONT, DO, DONT):
                    self._telnet = 2
                    continue
                if byte in (IP, DM):
                    self.telnet_interrupt = True
                if byte != IAC:
                    continue
            elif self._telnet == 2:
                self._telnet = 0
                continue
            elif byte == IAC:
                self._telnet = 1
                continue
            if byte == 0x0A:
                if self._discarding:
                    self._discarding = False
                else:
                    events.append(self._event(bytes(line)))
                line.clear()
                continue
            if self._discarding:
                continue
            if len(line) >= self.max_line:
                line.clear()
                self._discarding = True
                events.append(BadLine(Reply.of(500, "Command line too long.")))
                continue
            line.append(byte)
        return events

    def _event(self, raw: bytes) -> Command | BadLine:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\x00" in raw:
            return BadLine(Reply.of(500, "Syntax error: NUL byte in command."))
        text = _decode(raw)
        if not text.strip():
            return BadLine(Reply.of(500, "Empty command."))
        verb, _, arg = text.partition(" ")
        if not _VERB.fullmatch(verb):
            return BadLine(Reply.of(500, "Syntax error, command unrecognized."))
        return Command(verb.upper(), arg)


class ReplyReader:
    """Frames upstream bytes into `Reply` values, bounded in line length, line count and size.

    Anything that is not a well-formed reply raises `RemoteProtocolError` with code 421: an
    upstream that does not speak FTP ends the session rather than confuse the client.
    """

    def __init__(
        self,
        max_line: int = DEFAULT_MAX_LINE,
        max_lines: int = 1000,
        max_bytes: int = 256 * 1024,
    ) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._code: bytes | None = None  # inside a multi-line reply with this code
        self._lines: list[str] = []
        self._size = 0

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    raise RemoteProtocolError("upstream reply line too long", 421)
                return replies
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(raw) > self.max_line:
                raise RemoteProtocolError("upstream reply line too long", 421)
            reply = self._line(raw[:-1] if raw.endswith(b"\r") else raw)
            if reply is not None:
                replies.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        if b"\x00" in raw:
            raise RemoteProtocolError("upstream reply contains a NUL byte", 421)
        self._size += len(raw) + 2
        if self._size > self.max_bytes:
            raise RemoteProtocolError("upstream reply too large", 421)
        match = _REPLY_LINE.match(raw)
        if self._code is None:
            if match is None:
                raise RemoteProtocolError(
                    f"upstream sent a line that is not a reply: {raw[:40]!r}", 421
                )
            code, mark = match.group(1), match.group(2)
            text = _decode(raw[4:])
            if mark == b"-":
                self._code = code
                self._lines = [text]
                return None
            self._size = 0
            return Reply(int(code), (text,))
        if len(self._lines) >= self.max_lines:
            raise RemoteProtocolError("upstream reply has too many lines", 421)
        if match is not None and match.group(1) == self._code and match.group(2) != b"-":
            self._lines.append(_decode(raw[4:]))
            reply = Reply(int(self._code), tuple(self._lines))
            self._code, self._lines, self._size = None, [], 0
            return reply
        if match is not None and match.group(1) == self._code:
            self._lines.append(_decode(raw[4:]))  # servers that prefix every line "ddd-"
        else:
            self._lines.append(_decode(raw))
        return None
