"""Security decisions as values: which upstreams a session may reach, which data addresses a
client may name, which commands it may send.

Nothing here performs I/O: the caller resolves names, this module judges addresses. Every
decision carries a sentence that can go into an FTP reply and a log line unchanged.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.addresses import HostPort

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Ranges an egress proxy must not reach unless an explicit rule allows them: the gateway's
#: own machine, private networks, link-local (cloud metadata lives at 169.254.169.254),
#: multicast, and addresses that are not routable at all.
DEFAULT_DENIED: tuple[tuple[str, IPNetwork], ...] = tuple(
    (label, ipaddress.ip_network(net))
    for label, net in (
        ("loopback", "127.0.0.0/8"),
        ("loopback", "::1/128"),
        ("unspecified", "0.0.0.0/8"),
        ("unspecified", "::/128"),
        ("private", "10.0.0.0/8"),
        ("private", "172.16.0.0/12"),
        ("private", "192.168.0.0/16"),
        ("private", "100.64.0.0/10"),
        ("private", "fc00::/7"),
        ("link-local", "169.254.0.0/16"),
        ("link-local", "fe80::/10"),
        ("multicast", "224.0.0.0/4"),
        ("multicast", "ff00::/8"),
        ("reserved", "240.0.0.0/4"),
        ("benchmarking", "198.18.0.0/15"),
    )
)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy check; `reason` is a sentence for the reply and the log."""

    allowed: bool
    reason: str


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
        return cls(action, network, host.lower() if host else None, _port_ranges(ports))

    def matches(self, addr: IPAddress, name: str | None, port: int) -> bool:
        if self.network is not None and (
            addr.version != self.network.version or addr not in self.network
        ):
            return False
        if self.pattern is not None and (
            name is None or not fnmatch.fnmatchcase(name.lower(), self.pattern)
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
        low, _, high = item.strip().partition("-")
        high = high or low
        if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
            raise ValueError(
                f"{text!r} is not a list of ports or port ranges like '21,990,2000-2100'"
            )
        ranges.append((int(low), int(high)))
    return tuple(ranges)


def _address(host: str) -> IPAddress:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    """Which upstream addresses forward mode may connect to.

    Rules are checked in order and the first whose network holds the address decides. When no
    rule matches, the ranges in `DEFAULT_DENIED` and the gateway's own addresses are refused and
    everything else (the public Internet) is allowed. The check runs on the resolved address the
    gateway then connects to, so a name cannot be re-resolved to somewhere else in between.
    """

    rules: tuple[Rule, ...] = ()
    own_addresses: frozenset[str] = field(default_factory=frozenset)

    def check(self, host: str, port: int = 21, name: str | None = None) -> Decision:
        """Judge connecting to `host` (an IP address) on `port`; `name` is what the client
        typed, for host-name rules."""
        try:
            addr = _address(host)
        except ValueError:
            return Decision(False, f"{host} is not an IP address")
        for rule in self.rules:
            if rule.matches(addr, name, port):
                verdict = "allowed" if rule.action == "allow" else "denied"
                return Decision(rule.action == "allow", f"{addr} is {verdict} by rule {rule}")
        if str(addr) in self.own_addresses:
            return Decision(False, f"{addr} is the gateway itself")
        for label, network in DEFAULT_DENIED:
            if addr.version == network.version and addr in network:
                return Decision(False, f"{addr} is a {label} address")
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


#: Commands that change files on the upstream, refused by the read-only preset.
WRITE_COMMANDS = frozenset(
    {"STOR", "STOU", "APPE", "DELE", "RNFR", "RNTO", "MKD", "XMKD", "RMD", "XRMD", "SITE"}
)


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """Which client commands the gateway refuses before they reach the upstream."""

    denied: frozenset[str] = frozenset()
    read_only: bool = False

    def check(self, verb: str) -> tuple[int, str] | None:
        """The refusal (code, sentence) for `verb`, or None when it may pass."""
        if self.read_only and verb in WRITE_COMMANDS:
            return 550, f"{verb} is not allowed: this gateway is read-only."
        if verb in self.denied:
            return 502, f"{verb} is disabled by the gateway's policy."
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
    client_host: str, target: HostPort, *, allow_foreign: bool = False
) -> tuple[int, Decision]:
    """Judge a client's PORT/EPRT target (RFC 2577 section 3, the FTP bounce attack).

    The target must be the client's own control-connection address and a port of 1024 or
    above. Returns the reply code to refuse with (0 when allowed) and the decision.
    """
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
