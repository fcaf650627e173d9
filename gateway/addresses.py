"""Data-channel addresses: strict parsing and formatting of PORT, 227, EPRT and 229.

Strict on purpose: only decimal digits where numbers belong, bytes 0-255, ports 1-65535. A
lenient parser (one that strips non-digits first) accepts addresses nobody sent.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from gateway.errors import ClientProtocolError, RemoteProtocolError

# RFC 959 section 4.1.2: <host-port> ::= <host-number>,<port-number>, six decimal bytes.
_SIX = r"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})"
_PORT_ARG = re.compile(r"\s*" + _SIX + r"\s*")
# RFC 1123 section 4.1.2.6: scan a 227 reply for the first six numbers, parentheses optional.
_PASV_REPLY = re.compile(r"(?<![\d,])" + _SIX + r"(?![\d,])")
# RFC 2428 section 3: "(<d><d><d><tcp-port><d>)", d any of the printable ASCII set.
_EPSV_REPLY = re.compile(r"\(([!-~])\1\1(\d{1,5})\1\)")
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]{1,253}")


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP address and a TCP port. IPv4-mapped IPv6 addresses are stored in IPv4 form."""

    host: str
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> HostPort:
        """Validate and normalise; raises ValueError."""
        address = ipaddress.ip_address(host.strip("[]"))
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            elif address.scope_id:
                raise ValueError("scoped IPv6 addresses are not supported")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        return cls(str(address), port)

    @property
    def family(self) -> int:
        return 6 if ":" in self.host else 4

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == 6 else f"{self.host}:{self.port}"


def _from_six(numbers: tuple[str, ...]) -> HostPort | None:
    values = [int(n) for n in numbers]
    if any(v > 255 for v in values):
        return None
    port = values[4] * 256 + values[5]
    if port == 0:
        return None
    return HostPort(".".join(str(v) for v in values[:4]), port)


def parse_port_argument(arg: str) -> HostPort:
    """PORT h1,h2,h3,h4,p1,p2 (RFC 959 section 4.1.2)."""
    match = _PORT_ARG.fullmatch(arg)
    parsed = _from_six(match.groups()) if match else None
    if parsed is None:
        raise ClientProtocolError("Syntax error in PORT argument; expected h1,h2,h3,h4,p1,p2.", 501)
    return parsed


def format_port_argument(hp: HostPort) -> str:
    if hp.family != 4:
        raise ValueError("PORT can only carry an IPv4 address")
    return ",".join([*hp.host.split("."), str(hp.port >> 8), str(hp.port & 0xFF)])


def parse_pasv_reply(text: str) -> HostPort:
    """The address in a 227 reply, with or without parentheses (RFC 1123 section 4.1.2.6)."""
    match = _PASV_REPLY.search(text)
    parsed = _from_six(match.groups()) if match else None
    if parsed is None:
        raise RemoteProtocolError("upstream sent a 227 reply without a valid address", 425)
    return parsed


def format_pasv_reply(hp: HostPort) -> str:
    return f"Entering Passive Mode ({format_port_argument(hp)})."


def parse_eprt_argument(arg: str) -> HostPort:
    """EPRT <d><af><d><addr><d><port><d> (RFC 2428 section 2)."""
    arg = arg.strip()
    if len(arg) < 7 or not "!" <= arg[0] <= "~" or arg[-1] != arg[0]:
        raise ClientProtocolError("Syntax error in EPRT argument; expected |af|address|port|.", 501)
    parts = arg[1:-1].split(arg[0])
    if len(parts) != 3:
        raise ClientProtocolError("Syntax error in EPRT argument; expected |af|address|port|.", 501)
    af, host, port = parts
    if af not in ("1", "2"):
        raise ClientProtocolError("Network protocol not supported, use (1,2).", 522)
    if not port.isdigit() or not 1 <= int(port) <= 65535 or len(port) > 5:
        raise ClientProtocolError("EPRT port must be a number from 1 to 65535.", 501)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ClientProtocolError(f"EPRT address {host!r} is not an IP address.", 501) from None
    if (af == "1") != (address.version == 4):
        raise ClientProtocolError("EPRT address does not match its address family.", 501)
    return HostPort.of(str(address), int(port))


def format_eprt_argument(hp: HostPort) -> str:
    return f"|{1 if hp.family == 4 else 2}|{hp.host}|{hp.port}|"


def parse_epsv_reply(text: str) -> int:
    """The port in a 229 reply (RFC 2428 section 3)."""
    match = _EPSV_REPLY.search(text)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise RemoteProtocolError("upstream sent a 229 reply without a valid port", 425)
    return int(match.group(2))


def format_epsv_reply(port: int) -> str:
    return f"Entering Extended Passive Mode (|||{port}|)"


def parse_epsv_argument(arg: str) -> int | str | None:
    """EPSV's optional argument (RFC 2428 section 3): none, a protocol number, or ALL."""
    arg = arg.strip()
    if not arg:
        return None
    if arg.upper() == "ALL":
        return "ALL"
    if arg.isdigit() and len(arg) < 4:
        if arg in ("1", "2"):
            return int(arg)
        raise ClientProtocolError("Network protocol not supported, use (1,2).", 522)
    raise ClientProtocolError("Syntax error in EPSV argument.", 501)


@dataclass(frozen=True, slots=True)
class UserTarget:
    """A forward-proxy login: `USER user@host[:port]`."""

    user: str
    host: str
    port: int


def _host_and_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:port")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        host, port_text = text, None  # a bare IPv6 literal
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: put IPv6 addresses in brackets, [addr]:port") from None
    else:
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or IP address")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """ "host", "host:port", "[v6]:port" or a bare IPv6 literal; raises ValueError."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    return _host_and_port(text, default_port)


def parse_user_target(arg: str, default_port: int = 21) -> UserTarget | None:
    """`name@host[:port]`, the host after the last "@"; None when there is no "@"."""
    user, sep, where = arg.rpartition("@")
    if not sep:
        return None
    if not user or not where:
        raise ClientProtocolError("Log in as USER name@host[:port].", 501)
    try:
        host, port = _host_and_port(where, default_port)
    except ValueError as e:
        raise ClientProtocolError(f"Bad upstream in user name: {e}.", 501) from None
    return UserTarget(user, host, port)
