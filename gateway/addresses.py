"""Data-channel addresses: strict parsing and formatting of PORT, 227, EPRT and 229, and of the
`USER name@host[:port]` a forward proxy is asked to connect to.

Strict on purpose: ASCII decimal digits where numbers belong (no signs, no other scripts'
digits), bytes 0-255, ports 1-65535, IP literals exactly as `ipaddress` reads them. A parser
that strips what it does not understand accepts addresses nobody sent, and every address here
ends up as a connection the gateway makes or a hole in a policy check.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from gateway.errors import ClientProtocolError, RemoteProtocolError
from gateway.numbers import ascii_number, is_ascii_number

# RFC 959 section 4.1.2: <host-port> ::= <host-number>,<port-number>, six decimal bytes.
# [0-9] and not \d, which also matches digits of other scripts that int() accepts.
_SIX = r"([0-9]{1,3}),([0-9]{1,3}),([0-9]{1,3}),([0-9]{1,3}),([0-9]{1,3}),([0-9]{1,3})"
_PORT_ARGUMENT = re.compile(r" *" + _SIX + r" *")
# RFC 1123 section 4.1.2.6: a user-FTP scans the 227 text for the address, with or without
# parentheses. The six numbers must stand alone: a longer run of numbers, or a signed one, is
# not an address.
_PASV_REPLY = re.compile(r"(?<![0-9,+-])" + _SIX + r"(?![0-9,])")
# RFC 2428 section 3: the 229 text carries "(<d><d><d><tcp-port><d>)", d in ASCII 33-126.
# Digits are left out of d: with a digit delimiter the port has no unambiguous end.
_EPSV_REPLY = re.compile(r"\(([!-/:-~])\1\1([0-9]{1,5})\1\)")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_HOST_NAME = 253  # RFC 1035 section 2.3.4: 255 octets on the wire, 253 as text

_EPRT_SYNTAX = "Syntax error in EPRT argument; expected |af|address|port|."
_UNSUPPORTED_AF = "Network protocol not supported, use (1,2)."


@functools.lru_cache(maxsize=1024)
def _normal_ip(text: str) -> str:
    """The canonical text of an IP literal; IPv4-mapped IPv6 becomes IPv4. Raises ValueError.

    Cached: a session checks the same few addresses (its client's, the upstream's, its own)
    a dozen times as it starts, and parsing one costs more than the rest of the check. A
    failed parse raises, which the cache does not keep, so it holds valid addresses only."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise ValueError(f"{text!r}: scoped IPv6 addresses are not supported")
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


def _port(text: str) -> int | None:
    """A TCP port written in ASCII decimal, or None."""
    port = ascii_number(text, max_digits=5)
    return port if port is not None and 1 <= port <= 65535 else None


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP address in canonical text (no brackets, IPv4-mapped IPv6 as IPv4) and a TCP port.

    Construction checks both, so a `HostPort` is always something a socket can connect to and
    two of them are equal exactly when they name the same endpoint. `HostPort.of` normalises.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if _normal_ip(self.host) != self.host:
            raise ValueError(f"{self.host!r} is not in canonical form; use HostPort.of")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not from 1 to 65535")

    @classmethod
    def of(cls, host: str, port: int) -> HostPort:
        """Validate and normalise an IP literal (IPv6 may be in brackets); raises ValueError."""
        if host.startswith("[") and host.endswith("]") and ":" in host:
            host = host[1:-1]
        return cls(_normal_ip(host), port)

    @property
    def family(self) -> int:
        """4 or 6."""
        return 6 if ":" in self.host else 4

    @property
    def unspecified(self) -> bool:
        """Whether the address is 0.0.0.0 or ::, which names no host."""
        return ipaddress.ip_address(self.host).is_unspecified

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == 6 else f"{self.host}:{self.port}"


def is_ip_literal(host: str) -> bool:
    """Whether `host` is an IP address rather than a name to resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _from_six(numbers: tuple[str, ...]) -> HostPort | None:
    """h1..h4 and p1, p2 (RFC 959 section 4.1.2) as an address, or None if out of range."""
    values = [int(n) for n in numbers]
    if any(v > 255 for v in values):
        return None
    port = values[4] * 256 + values[5]
    if port == 0:
        return None
    return HostPort(".".join(str(v) for v in values[:4]), port)


def parse_port_argument(arg: str) -> HostPort:
    """PORT h1,h2,h3,h4,p1,p2 (RFC 959 section 4.1.2); raises ClientProtocolError 501."""
    match = _PORT_ARGUMENT.fullmatch(arg)
    parsed = _from_six(match.groups()) if match else None
    if parsed is None:
        raise ClientProtocolError("Syntax error in PORT argument; expected h1,h2,h3,h4,p1,p2.", 501)
    return parsed


def format_port_argument(hp: HostPort) -> str:
    """The PORT argument for an IPv4 address; raises ValueError for IPv6 (use EPRT)."""
    if hp.family != 4:
        raise ValueError("PORT can only carry an IPv4 address")
    return ",".join([*hp.host.split("."), str(hp.port >> 8), str(hp.port & 0xFF)])


def parse_pasv_reply(text: str) -> HostPort:
    """The address in a 227 reply's text; raises RemoteProtocolError 425."""
    match = _PASV_REPLY.search(text)
    parsed = _from_six(match.groups()) if match else None
    if parsed is None:
        raise RemoteProtocolError("the upstream's 227 reply holds no valid address.", 425)
    return parsed


def format_pasv_reply(hp: HostPort) -> str:
    """The text of a 227 reply (RFC 959 section 4.2.2); raises ValueError for IPv6."""
    return f"Entering Passive Mode ({format_port_argument(hp)})."


def parse_eprt_argument(arg: str) -> HostPort:
    """EPRT <d><af><d><addr><d><port><d> (RFC 2428 section 2); raises ClientProtocolError.

    501 for bad syntax, 522 for an address family other than 1 (IPv4) or 2 (IPv6). The
    address must be of the family named, IPv4 as a strict dotted quad.
    """
    arg = arg.strip(" ")
    if len(arg) < 2 or not "!" <= arg[0] <= "~" or arg[-1] != arg[0]:
        raise ClientProtocolError(_EPRT_SYNTAX, 501)
    parts = arg[1:-1].split(arg[0])
    if len(parts) != 3:
        raise ClientProtocolError(_EPRT_SYNTAX, 501)
    af, host, port_text = parts
    if ascii_number(af, max_digits=5) is None:
        raise ClientProtocolError(_EPRT_SYNTAX, 501)
    if af not in ("1", "2"):
        # RFC 2428 section 2: 522 names the families the server supports.
        raise ClientProtocolError(_UNSUPPORTED_AF, 522)
    port = _port(port_text)
    if port is None:
        raise ClientProtocolError("EPRT port must be a number from 1 to 65535.", 501)
    version = ipaddress.IPv4Address if af == "1" else ipaddress.IPv6Address
    try:
        version(host)
        return HostPort.of(host, port)
    except ValueError:
        raise ClientProtocolError(
            f"EPRT address {host!r} is not an IPv{4 if af == '1' else 6} address.", 501
        ) from None


def format_eprt_argument(hp: HostPort) -> str:
    """The EPRT argument (RFC 2428 section 2), "|1|addr|port|" or "|2|addr|port|"."""
    return f"|{1 if hp.family == 4 else 2}|{hp.host}|{hp.port}|"


def parse_epsv_reply(text: str) -> int:
    """The port in a 229 reply's text (RFC 2428 section 3); raises RemoteProtocolError 425."""
    match = _EPSV_REPLY.search(text)
    port = _port(match.group(2)) if match else None
    if port is None:
        raise RemoteProtocolError("the upstream's 229 reply holds no valid port.", 425)
    return port


def format_epsv_reply(port: int) -> str:
    """The text of a 229 reply (RFC 2428 section 3); raises ValueError for a bad port."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not from 1 to 65535")
    return f"Entering Extended Passive Mode (|||{port}|)"


def parse_epsv_argument(arg: str) -> int | str | None:
    """EPSV's optional argument (RFC 2428 section 3): None, 1, 2 or "ALL".

    Raises ClientProtocolError: 522 for another protocol number, 501 for anything else.
    """
    arg = arg.strip(" ")
    if not arg:
        return None
    if arg.upper() == "ALL":
        return "ALL"
    if arg in ("1", "2"):
        return int(arg)
    if ascii_number(arg, max_digits=5) is not None:
        raise ClientProtocolError(_UNSUPPORTED_AF, 522)
    raise ClientProtocolError("Syntax error in EPSV argument; expected 1, 2 or ALL.", 501)


@dataclass(frozen=True, slots=True)
class UserTarget:
    """A forward-proxy login, `USER user@host[:port]`: who to log in as, and where."""

    user: str
    host: str  # a host name, or an IP literal in canonical form without brackets
    port: int = 21


def _host(text: str) -> str:
    """A host name (checked loosely) or an IP literal, normalised; raises ValueError."""
    try:
        return _normal_ip(text)
    except ValueError:
        if ":" in text or "%" in text:
            raise
    name = text.removesuffix(".")  # a fully qualified name may end in a dot
    labels = name.split(".")
    if (
        not _HOST_NAME.fullmatch(text)
        or len(name) > _MAX_HOST_NAME
        or not all(0 < len(label) <= 63 for label in labels)
    ):
        raise ValueError(f"{text!r} is not a host name or IP address")
    if is_ascii_number(labels[-1]):
        # RFC 1123 section 2.1: a host name's last label is never all digits. What looks like
        # one is a malformed IPv4 address ("127.1", "2130706433"), which a resolver might
        # still read as an address; refuse it rather than guess.
        raise ValueError(f"{text!r} is not a valid IPv4 address")
    return text


def _host_and_port(text: str, default_port: int) -> tuple[str, int]:
    port_text: str | None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6 address]:port")
        if ":" not in inner:
            raise ValueError(f"{inner!r} is not an IPv6 address")
        host, port_text = _host(inner), (rest[1:] if rest else None)
    elif text.count(":") > 1:
        try:
            host, port_text = _host(text), None  # a bare IPv6 literal, which has no port
        except ValueError:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [addr]:port") from None
    else:
        name, colon, port_part = text.partition(":")
        host, port_text = _host(name), (port_part if colon else None)
    if port_text is None:
        return host, default_port
    port = _port(port_text)
    if port is None:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, port


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """ "host", "host:port", "[IPv6]:port" or a bare IPv6 literal; raises ValueError.

    For configuration values such as the upstream server; IP literals come back canonical.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    return _host_and_port(text, default_port)


def parse_user_target(arg: str, default_port: int = 21) -> UserTarget | None:
    """`name@host[:port]`, or None when there is no "@"; raises ClientProtocolError 501.

    The host follows the last "@", since user names may contain one; an IPv6 address goes in
    brackets when a port follows it.
    """
    user, at, where = arg.rpartition("@")
    if not at:
        return None
    if not user or not where:
        raise ClientProtocolError("Log in as USER name@host[:port].", 501)
    try:
        host, port = _host_and_port(where, default_port)
    except ValueError as e:
        raise ClientProtocolError(f"Bad upstream server in the user name: {e}.", 501) from None
    return UserTarget(user, host, port)
