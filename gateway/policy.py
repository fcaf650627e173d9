"""Security decisions as values: which upstreams a session may reach, which data addresses a
client may name, which commands it may send.

Nothing here performs I/O: the caller resolves names, this module judges addresses. Every
decision carries a sentence that can go into an FTP reply and a log line unchanged.
"""

from __future__ import annotations

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
    """One upstream ACL entry: `action` applies to addresses inside `network`."""

    action: str  # "allow" | "deny"
    network: IPNetwork

    @classmethod
    def parse(cls, action: str, cidr: str) -> Rule:
        """Build a rule from configuration text; raises ValueError naming what is wrong."""
        if action not in ("allow", "deny"):
            raise ValueError(f"rule action must be 'allow' or 'deny', not {action!r}")
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP network in CIDR notation") from None
        return cls(action, network)


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

    def check(self, host: str) -> Decision:
        try:
            addr = _address(host)
        except ValueError:
            return Decision(False, f"{host} is not an IP address")
        for rule in self.rules:
            if addr.version == rule.network.version and addr in rule.network:
                verdict = "allowed" if rule.action == "allow" else "denied"
                return Decision(
                    rule.action == "allow", f"{addr} is {verdict} by rule {rule.network}"
                )
        if str(addr) in self.own_addresses:
            return Decision(False, f"{addr} is the gateway itself")
        for label, network in DEFAULT_DENIED:
            if addr.version == network.version and addr in network:
                return Decision(False, f"{addr} is a {label} address")
        return Decision(True, f"{addr} is a public address")

    def choose(self, addresses: Iterable[str]) -> tuple[str | None, Decision]:
        """The first resolved address the policy allows, or None with the first refusal."""
        refusal: Decision | None = None
        for host in addresses:
            decision = self.check(host)
            if decision.allowed:
                return host, decision
            refusal = refusal or decision
        return None, refusal or Decision(False, "the name has no addresses")


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
