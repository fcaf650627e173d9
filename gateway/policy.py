"""Security decisions as values: which upstreams a session may reach, which data addresses a
client may name, which commands it may send.

Nothing here performs I/O: the caller resolves names, this module judges addresses. Every
decision carries a sentence that can go into an FTP reply and a log line unchanged.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.addresses import HostPort
from gateway.numbers import ascii_number

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Entries of the IANA special-purpose address registries (RFC 6890) that are not globally
#: reachable but that the `ipaddress` tables of Python 3.11 and 3.12 still call global or only
#: reserved; newer Pythons know most of them, and a duplicate costs nothing. Everything else
#: comes from `ipaddress`'s own registry-backed properties (see `special_purpose`).
REGISTRY_ADDITIONS: tuple[tuple[str, IPNetwork], ...] = tuple(
    (label, ipaddress.ip_network(net))
    for label, net in (
        ("IETF protocol assignment", "192.0.0.0/24"),  # RFC 6890 section 2.2.2
        ("6to4 relay anycast", "192.88.99.0/24"),  # RFC 7526: deprecated
        ("local-use NAT64", "64:ff9b:1::/48"),  # RFC 8215
        ("discard-only", "100::/64"),  # RFC 6666
        ("documentation", "3fff::/20"),  # RFC 9637
        ("segment routing", "5f00::/16"),  # RFC 9602
    )
)

#: The NAT64 well-known prefix (RFC 6052 section 2.1) is globally reachable in the registry:
#: whether an address in it may be reached is decided by the IPv4 address inside.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

#: `ipaddress` properties in the order their names go into a refusal.
_PROPERTIES = (
    ("unspecified", "is_unspecified"),
    ("loopback", "is_loopback"),
    ("link-local", "is_link_local"),
    ("multicast", "is_multicast"),
    ("site-local", "is_site_local"),
    ("reserved", "is_reserved"),
    ("private", "is_private"),
)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, each with the name of its form.

    A connection to one of them can end at the IPv4 address inside (a NAT64 translator, a
    6to4 or Teredo relay, a dual-stack socket), so each is judged like a direct connection.
    """
    value = int(addr)
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if addr.ipv4_mapped is not None:
        found.append(("IPv4-mapped", addr.ipv4_mapped))  # RFC 4291 section 2.5.5.2
    elif addr in _IPV4_COMPATIBLE and value > 1:
        found.append(("IPv4-compatible", ipaddress.IPv4Address(value & 0xFFFFFFFF)))  # 2.5.5.1
    if addr in NAT64_PREFIX:
        found.append(("NAT64", ipaddress.IPv4Address(value & 0xFFFFFFFF)))  # RFC 6052 2.2
    if addr in _NAT64_LOCAL:
        # RFC 6052 section 2.2, a /48 prefix: bits 48-63 and 72-87 hold the IPv4 address.
        high, low = (value >> 64) & 0xFFFF, (value >> 40) & 0xFFFF
        found.append(("NAT64", ipaddress.IPv4Address(high << 16 | low)))
    if addr.sixtofour is not None:
        found.append(("6to4", addr.sixtofour))  # RFC 3056 section 2
    if addr.teredo is not None:
        server, client = addr.teredo  # RFC 4380 section 4; the client part de-obfuscated
        found += [("Teredo server", server), ("Teredo client", client)]
    return found


def special_purpose(addr: IPAddress) -> str | None:
    """Why `addr` is not a public address an egress proxy may reach by default, or None.

    Derived from `ipaddress`'s registry-backed properties (`is_private`, `is_reserved`,
    `is_global`, ...) and `REGISTRY_ADDITIONS`; an IPv6 address that carries an IPv4
    address is refused when the IPv4 address would be.
    """
    if isinstance(addr, ipaddress.IPv6Address):
        for form, inner in embedded_ipv4(addr):
            why = special_purpose(inner)
            if why is not None:
                return f"{form} address of a {why} address ({inner})"
        if addr in NAT64_PREFIX:
            return None
    for label, network in REGISTRY_ADDITIONS:
        if addr.version == network.version and addr in network:
            return label
    for label, name in _PROPERTIES:
        if getattr(addr, name, False):
            return label
    if not addr.is_global:
        return "special-purpose"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy check; `reason` is a sentence for the reply and the log."""

    allowed: bool
    reason: str


def host_key(name: str) -> str:
    """A host name as rules compare it: DNS names are case-insensitive (RFC 4343) and
    "example.com." is the same name as "example.com" (RFC 1034 section 3.1)."""
    return name.lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class Rule:
    """One upstream ACL entry. It matches when every part it names matches: the address is in
    `network`, the name the client typed matches the shell-style `pattern`, the port is in
    `ports`. Parts left as None match anything."""

    action: str  # "allow" | "deny"
    network: IPNetwork | None = None
    pattern: str | None = None
    ports: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def parse(cls, action: str, cidr: str) -> Rule:
        """A CIDR-only rule from configuration text; raises ValueError naming what is wrong."""
        return cls.build(action, cidr=cidr)

    @classmethod
    def build(
        cls,
        action: str,
        *,
        cidr: str | None = None,
        host: str | None = None,
        ports: str | None = None,
    ) -> Rule:
        if action not in ("allow", "deny"):
            raise ValueError(f"rule action must be 'allow' or 'deny', not {action!r}")
        network = None
        if cidr is not None:
            try:
                network = ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network in CIDR notation") from None
        return cls(action, network, host_key(host) if host else None, _port_ranges(ports))

    def matches(self, addr: IPAddress, name: str | None, port: int) -> bool:
        if self.network is not None and (
            addr.version != self.network.version or addr not in self.network
        ):
            return False
        if self.pattern is not None and (
            name is None or not fnmatch.fnmatchcase(host_key(name), self.pattern)
        ):
            return False
        return self.ports is None or any(low <= port <= high for low, high in self.ports)

    def __str__(self) -> str:
        parts = [str(p) for p in (self.network, self.pattern) if p is not None]
        if self.ports is not None:
            parts.append(
                "ports " + ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in self.ports)
            )
        return " ".join(parts) or "any"


def _port_ranges(text: str | None) -> tuple[tuple[int, int], ...] | None:
    if text is None:
        return None
    ranges = []
    for item in str(text).split(","):
        low_text, _, high_text = item.strip().partition("-")
        low = ascii_number(low_text, max_digits=5)
        high = ascii_number(high_text or low_text, max_digits=5)
        if low is None or high is None or not 1 <= low <= high <= 65535:
            raise ValueError(
                f"{text!r} is not a list of ports or port ranges like '21,990,2000-2100'"
            )
        ranges.append((low, high))
    return tuple(ranges)


def _endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def is_own_address(own: frozenset[HostPort], addr: IPAddress, port: int) -> bool:
    """Whether a connection to `addr`:`port` would reach one of the gateway's listeners.

    `own` holds every listening address, and for a listener bound to 0.0.0.0 or :: also that
    wildcard and every local interface address on its port (filled in at start-up). A wildcard
    listener is also reached through any loopback address (all of 127.0.0.0/8), an IPv6 one
    through IPv4 too (dual-stack sockets), and connecting to 0.0.0.0 or :: reaches the local
    host, as 127.0.0.1 or ::1 (Linux).
    """
    if not own:
        return False
    candidates = [addr]
    if addr.is_unspecified:
        candidates.append(ipaddress.ip_address("127.0.0.1" if addr.version == 4 else "::1"))
    for candidate in candidates:
        if HostPort.of(str(candidate), port) in own:
            return True
        if candidate.is_loopback or candidate.is_unspecified:
            wildcards = ["::"] if candidate.version == 6 else ["0.0.0.0", "::"]
            if any(HostPort(w, port) in own for w in wildcards):
                return True
    return False


def _address(host: str) -> IPAddress:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    """Which upstream addresses forward mode may connect to.

    The gateway's own listening addresses (`own_addresses`, see `is_own_address`) are refused
    first, whatever the rules say. Then rules are checked in order and the first that matches
    decides. When no rule matches, every address that is not globally reachable
    (`special_purpose`) is refused and everything else (the public Internet) is allowed. The
    check runs on the resolved address the gateway then connects to, so a name cannot be
    re-resolved to somewhere else in between.
    """

    rules: tuple[Rule, ...] = ()
    own_addresses: frozenset[HostPort] = field(default_factory=frozenset)

    def check(self, host: str, port: int = 21, name: str | None = None) -> Decision:
        """Judge connecting to `host` (an IP address) on `port`; `name` is what the client
        typed, for host-name rules."""
        try:
            addr = _address(host)
        except ValueError:
            return Decision(False, f"{host} is not an IP address")
        if is_own_address(self.own_addresses, addr, port):
            # Before the rules: no rule may turn the gateway into a loop through itself.
            return Decision(False, f"{_endpoint(addr, port)} is this gateway (a connection loop)")
        for rule in self.rules:
            if rule.matches(addr, name, port):
                verdict = "allowed" if rule.action == "allow" else "denied"
                return Decision(rule.action == "allow", f"{addr} is {verdict} by rule {rule}")
        why = special_purpose(addr)
        if why is not None:
            return Decision(False, f"{addr} is not a public address: {why}")
        return Decision(True, f"{addr} is a public address")

    def choose(
        self, addresses: Iterable[str], port: int = 21, name: str | None = None
    ) -> tuple[str | None, Decision]:
        """The first resolved address the policy allows, or None with the first refusal."""
        refusal: Decision | None = None
        for host in addresses:
            decision = self.check(host, port, name)
            if decision.allowed:
                return host, decision
            refusal = refusal or decision
        return None, refusal or Decision(False, "the name has no addresses")


def check_client(rules: tuple[Rule, ...], host: str) -> Decision:
    """Client ACL: the first rule whose network holds the client decides; no rules, or no
    match when only deny rules exist, allows; no match when allow rules exist denies."""
    addr = _address(host)
    for rule in rules:
        if rule.matches(addr, None, 0 if rule.ports is None else rule.ports[0][0]):
            return Decision(
                rule.action == "allow", f"client {addr} matches {rule.action} rule {rule}"
            )
    if any(rule.action == "allow" for rule in rules):
        return Decision(False, f"client {addr} is not in any allowed network")
    return Decision(True, f"client {addr} is allowed")


#: Commands that change files on the upstream whatever their argument, refused by
#: `commands.read_only`: RFC 959 section 4.1.3 (STOR, STOU, APPE, DELE, RNFR, RNTO, MKD, RMD),
#: RFC 775 (XMKD, XRMD), draft-somers-ftp-mfxx (MFMT, MFF, MFCT set a file's times and facts),
#: draft-peterson-streamlined-ftp-command-extensions (RMDA removes a whole tree), and SITE:
#: its subcommands are each server's own (CHMOD, UTIME, SYMLINK, CPFR/CPTO, ...), no list of
#: the writing ones can be complete, so a read-only gateway refuses SITE altogether.
WRITE_COMMANDS = frozenset(
    {
        "STOR",
        "STOU",
        "APPE",
        "DELE",
        "RNFR",
        "RNTO",
        "MKD",
        "XMKD",
        "RMD",
        "XRMD",
        "RMDA",
        "MFMT",
        "MFF",
        "MFCT",
        "SITE",
    }
)

#: Commands that read with one argument form and write with another, refused by
#: `commands.read_only` only in the writing form: MDTM reads a file's time (RFC 3659 section
#: 3), but vsftpd, Pure-FTPd and others also take "MDTM YYYYMMDDHHMMSS path" and set it.
WRITE_FORMS: dict[str, re.Pattern[str]] = {
    # A first word that is a time (digits of any script: the server may read them as ASCII),
    # optionally with fraction and zone, then a path.
    "MDTM": re.compile(r"\s*\d{14}(?:\.\d*)?(?:[+-]\d*)?\s+\S"),
}

#: RFC 959 section 4.1.3: ALLO <SP> <decimal-integer> [<SP> R <SP> <decimal-integer>], in
#: ASCII digits (a size the upstream reads in another script is not the size the client sent).
_ALLO = re.compile(r" *[0-9]{1,20}(?: +R +[0-9]{1,20})? *")


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """Which client commands the gateway refuses before they reach the upstream."""

    denied: frozenset[str] = frozenset()
    read_only: bool = False

    def check(self, verb: str, arg: str = "") -> tuple[int, str] | None:
        """The refusal (code, sentence) for `verb` with `arg`, or None when it may pass."""
        if self.read_only and (
            verb in WRITE_COMMANDS or (verb in WRITE_FORMS and WRITE_FORMS[verb].match(arg))
        ):
            what = f"{verb} with a time" if verb in WRITE_FORMS else verb
            return 550, f"{what} is not allowed: this gateway is read-only."
        if verb in self.denied:
            return 502, f"{verb} is disabled by the gateway's policy."
        if verb == "ALLO" and not _ALLO.fullmatch(arg):
            return 501, "ALLO needs a size in ASCII digits: ALLO size [R record-size]."
        return None


@dataclass(slots=True)
class LoginThrottle:
    """Failed proxy logins per client IP in a sliding window; time is passed in."""

    limit: int = 5
    window: float = 60.0
    _failures: dict[str, list[float]] = field(default_factory=dict)

    def blocked(self, client: str, now: float) -> bool:
        recent = [t for t in self._failures.get(client, ()) if now - t < self.window]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return len(recent) >= self.limit

    def failed(self, client: str, now: float) -> None:
        self._failures.setdefault(client, []).append(now)


def check_data_target(
    client_host: str,
    target: HostPort,
    *,
    allow_foreign: bool = False,
    own: frozenset[HostPort] = frozenset(),
) -> tuple[int, Decision]:
    """Judge a client's PORT/EPRT target (RFC 2577 section 3, the FTP bounce attack).

    The target must be the client's own control-connection address and a port of 1024 or
    above, and not one of the gateway's own listeners (`own`): a client on the gateway's host
    could otherwise have it send a downloaded file into its own control port as commands.
    Returns the reply code to refuse with (0 when allowed) and the decision.
    """
    if is_own_address(own, _address(target.host), target.port):
        return 504, Decision(
            False, f"data address {target} is this gateway's own listener; refusing a loop"
        )
    if target.port < 1024:
        return 504, Decision(
            False, f"data port {target.port} is below 1024; refusing a possible bounce attack"
        )
    if not allow_foreign and _address(target.host) != _address(client_host):
        return 500, Decision(
            False,
            f"data address {target.host} is not your own address {client_host}; "
            "refusing a possible bounce attack",
        )
    return 0, Decision(True, "data address is the client's own")
