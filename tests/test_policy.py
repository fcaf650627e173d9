"""Policy decisions as values: upstream ACL, bounce rules, client ACL, throttle, commands."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.addresses import HostPort
from gateway.policy import (
    CommandPolicy,
    LoginThrottle,
    Rule,
    UpstreamPolicy,
    check_client,
    check_data_target,
    is_own_address,
    special_purpose,
)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback is still loopback
        ("10.1.2.3", False),
        ("172.20.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("fe80::1", False),
        ("fd00::1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("198.18.0.1", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_default_upstream_policy(host: str, allowed: bool) -> None:
    assert UpstreamPolicy().check(host).allowed is allowed


def test_first_matching_rule_wins_with_names_and_ports() -> None:
    policy = UpstreamPolicy(
        rules=(
            Rule.build("deny", host="*.evil.example"),
            Rule.build("allow", cidr="10.0.0.0/8", ports="21,2000-2100"),
            Rule.build("deny", cidr="0.0.0.0/0"),
        )
    )
    assert not policy.check("203.0.113.1", 21, "ftp.evil.example").allowed
    assert policy.check("10.9.9.9", 2050, "files.corp").allowed
    assert not policy.check("10.9.9.9", 22, "files.corp").allowed  # port outside the rule
    assert not policy.check("203.0.113.1", 21, "ftp.example.net").allowed  # catch-all deny


@pytest.mark.parametrize(
    ("host", "why"),
    [
        # NAT64, 6to4, IPv4-compatible and Teredo forms of non-public IPv4 addresses.
        ("64:ff9b::a9fe:a9fe", "NAT64 address of a link-local address (169.254.169.254)"),
        ("64:ff9b::7f00:1", "NAT64 address of a loopback address (127.0.0.1)"),
        ("64:ff9b:1:a00:0:100::", "NAT64 address of a private address (10.0.0.1)"),
        ("64:ff9b:1:808:8:800::", "local-use NAT64"),  # even with 8.8.8.8 inside
        ("2002:0a00:0001::", "6to4 address of a private address (10.0.0.1)"),
        ("2002:a9fe:a9fe::1", "6to4 address of a link-local address (169.254.169.254)"),
        ("::10.0.0.1", "IPv4-compatible address of a private address (10.0.0.1)"),
        ("::8.8.8.8", "reserved"),  # IPv4-compatible addresses are deprecated (RFC 4291)
        # Teredo, client 10.0.0.1 obfuscated (RFC 4380 section 4): 0xffffffff ^ 0x0a000001.
        ("2001:0:808:808:0:0:f5ff:fffe", "Teredo client address of a private address"),
        ("2001:0:a00:1::1", "Teredo server address of a private address (10.0.0.1)"),
        ("fec0::1", "site-local"),
        ("100::1", "discard-only"),
        ("192.0.0.8", "IETF protocol assignment"),
        ("192.0.2.1", "private"),  # TEST-NET-1
        ("198.51.100.1", "private"),  # TEST-NET-2
        ("203.0.113.1", "private"),  # TEST-NET-3
        ("192.88.99.1", "6to4 relay anycast"),
        ("100.64.0.1", "special-purpose"),  # shared address space (CGNAT)
        ("198.18.0.1", "private"),  # benchmarking
        ("240.0.0.1", "reserved"),
        ("0.1.2.3", "private"),  # "this network"
        ("255.255.255.255", "reserved"),
        ("2001:db8::1", "private"),  # documentation
        ("3fff::1", "documentation"),
        ("5f00::1", "segment routing"),
        ("::ffff:169.254.169.254", "link-local"),
    ],
)
def test_special_purpose_addresses_are_refused(host: str, why: str) -> None:
    decision = UpstreamPolicy().check(host)
    assert not decision.allowed and why in decision.reason, decision.reason


@pytest.mark.parametrize(
    "host",
    ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_addresses_pass_also_through_nat64_and_6to4(host: str) -> None:
    assert UpstreamPolicy().check(host).allowed


def test_explicit_allow_rules_still_open_special_purpose_ranges() -> None:
    policy = UpstreamPolicy(rules=(Rule.parse("allow", "64:ff9b::/96"),))
    assert policy.check("64:ff9b::a00:1").allowed
    assert UpstreamPolicy(rules=(Rule.parse("allow", "192.0.2.0/24"),)).check("192.0.2.1").allowed


def test_special_purpose_from_ipaddress_properties_covers_every_private_block() -> None:
    # Whatever the ipaddress module counts as private or reserved is refused by default.
    for network in ("10.0.0.0/8", "172.16.0.0/12", "fc00::/7", "2001:10::/28"):
        first = ipaddress.ip_network(network)[1]
        assert special_purpose(first) is not None, network


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_form_of_a_refused_address_is_refused(value: int) -> None:
    inner = ipaddress.IPv4Address(value)
    forms = [
        ipaddress.IPv6Address((0xFFFF << 32) | value),  # IPv4-mapped
        ipaddress.IPv6Address((0x0064FF9B << 96) | value),  # NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80)),  # 6to4
        ipaddress.IPv6Address((0x20010000 << 96) | (value << 64) | 1),  # Teredo server
    ]
    if special_purpose(inner) is not None:
        assert all(special_purpose(form) is not None for form in forms)
    elif inner.is_global:
        assert special_purpose(forms[1]) is None  # NAT64 of a public address is public


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("ftp.evil.example.", "*.evil.example"),
        ("FTP.Evil.Example", "*.evil.example"),
        ("ftp.evil.example", "*.EVIL.example."),
        ("Ftp.Evil.Example.", "ftp.evil.example"),
    ],
)
def test_host_name_rules_ignore_case_and_a_trailing_dot(name: str, pattern: str) -> None:
    policy = UpstreamPolicy(rules=(Rule.build("deny", host=pattern),))
    assert not policy.check("8.8.8.8", 21, name).allowed


@pytest.mark.parametrize(
    ("own", "host", "port", "refused"),
    [
        ({HostPort.of("192.0.2.7", 2121)}, "192.0.2.7", 2121, True),
        ({HostPort.of("192.0.2.7", 2121)}, "192.0.2.7", 21, False),  # another service there
        ({HostPort.of("127.0.0.1", 2121)}, "127.0.0.2", 2121, False),  # not where it listens
        ({HostPort.of("127.0.0.1", 2121)}, "0.0.0.0", 2121, True),  # 0.0.0.0 is 127.0.0.1
        ({HostPort.of("0.0.0.0", 2121)}, "127.0.0.2", 2121, True),  # a wildcard gets 127/8
        ({HostPort.of("::", 2121)}, "127.0.0.9", 2121, True),  # dual stack
        ({HostPort.of("::", 2121)}, "::1", 2121, True),
        ({HostPort.of("::1", 2121)}, "::ffff:127.0.0.1", 2121, False),
    ],
)
def test_own_addresses(own: set[HostPort], host: str, port: int, refused: bool) -> None:
    assert is_own_address(frozenset(own), ipaddress.ip_address(host), port) is refused


def test_own_addresses_are_refused_before_any_allow_rule() -> None:
    policy = UpstreamPolicy(
        rules=(Rule.parse("allow", "0.0.0.0/0"),),
        own_addresses=frozenset({HostPort.of("127.0.0.1", 2121)}),
    )
    decision = policy.check("127.0.0.1", 2121)
    assert not decision.allowed and "connection loop" in decision.reason
    assert policy.check("127.0.0.1", 2122).allowed


def test_choose_connects_only_to_an_address_it_checked() -> None:
    host, decision = UpstreamPolicy().choose(["10.0.0.1", "8.8.8.8", "8.8.4.4"])
    assert host == "8.8.8.8" and decision.allowed
    host, decision = UpstreamPolicy().choose(["127.0.0.1", "10.0.0.1"])
    assert host is None and "loopback" in decision.reason


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (HostPort.of("192.0.2.10", 5000), 0),
        (HostPort.of("192.0.2.11", 5000), 500),
        (HostPort.of("192.0.2.10", 1023), 504),
        (HostPort.of("192.0.2.10", 20), 504),
    ],
)
def test_bounce_rules(target: HostPort, code: int) -> None:
    assert check_data_target("192.0.2.10", target)[0] == code


def test_foreign_data_address_only_when_allowed() -> None:
    target = HostPort.of("198.51.100.1", 5000)
    assert check_data_target("192.0.2.10", target, allow_foreign=True)[0] == 0


def test_client_acl() -> None:
    rules = (Rule.parse("deny", "10.0.0.0/24"), Rule.parse("allow", "10.0.0.0/8"))
    assert not check_client(rules, "10.0.0.5").allowed
    assert check_client(rules, "10.1.0.5").allowed
    assert not check_client(rules, "192.0.2.1").allowed  # allow rules exist: others refused
    assert check_client((), "192.0.2.1").allowed


def test_login_throttle_window() -> None:
    throttle = LoginThrottle(limit=2, window=60)
    throttle.failed("a", 0)
    assert not throttle.blocked("a", 1)
    throttle.failed("a", 1)
    assert throttle.blocked("a", 2) and not throttle.blocked("b", 2)
    assert not throttle.blocked("a", 62)  # the failures aged out


def test_command_policy() -> None:
    policy = CommandPolicy(frozenset({"SITE"}), read_only=True)
    assert policy.check("STOR") == (550, "STOR is not allowed: this gateway is read-only.")
    assert policy.check("RETR") is None
    assert CommandPolicy(frozenset({"SITE"})).check("SITE") is not None


@pytest.mark.parametrize(
    ("verb", "arg", "refused"),
    [
        *((verb, "x", True) for verb in ("STOR", "STOU", "APPE", "DELE", "RNFR", "RNTO")),
        *((verb, "d", True) for verb in ("MKD", "XMKD", "RMD", "XRMD", "RMDA")),
        ("MFMT", "20200101000000 f.txt", True),
        ("MFF", "modify=20200101000000; f.txt", True),
        ("MFCT", "20200101000000 f.txt", True),
        ("SITE", "UTIME f.txt 20200101000000 20200101000000 20200101000000 UTC", True),
        ("SITE", "CHMOD 777 f.txt", True),
        ("SITE", "SYMLINK a b", True),
        ("SITE", "CPFR a", True),
        ("MDTM", "20200101000000 f.txt", True),
        ("MDTM", "20200101000000.123 f.txt", True),
        ("MDTM", "20200101000000+60 f.txt", True),
        ("MDTM", "\u0662\u0660\u0662\u0660" + "\u0660" * 10 + " f.txt", True),  # Arabic-Indic
        ("MDTM", "f.txt", False),
        ("MDTM", "20200101000000", False),  # a file with a number for a name
        ("MDTM", "2020 report.txt", False),
        *((verb, "f.txt", False) for verb in ("RETR", "LIST", "NLST", "SIZE", "MLST", "MLSD")),
        *((verb, "", False) for verb in ("CWD", "CDUP", "PWD", "NOOP", "STAT", "SYST")),
    ],
)
def test_read_only_command_table(verb: str, arg: str, refused: bool) -> None:
    refusal = CommandPolicy(read_only=True).check(verb, arg)
    assert (refusal is not None and refusal[0] == 550) is refused
    assert CommandPolicy().check(verb, arg) is None  # without read_only everything passes


@pytest.mark.parametrize(
    ("arg", "ok"),
    [
        ("1024", True),
        ("1024 R 512", True),
        ("\u0661\u0660\u0662\u0664", False),  # Arabic-Indic
        ("\uff11\uff10\uff12\uff14", False),  # full-width
        ("\u00b2", False),  # a superscript, which str.isdigit() accepts
        ("-1", False),
        ("", False),
        ("10 R", False),
    ],
)
def test_allo_sizes_are_ascii_numbers(arg: str, ok: bool) -> None:
    refusal = CommandPolicy().check("ALLO", arg)
    assert (refusal is None) is ok
    if not ok:
        assert refusal is not None and refusal[0] == 501


@given(st.text(max_size=60), st.integers(min_value=0, max_value=70000), st.text(max_size=30))
def test_policy_never_raises_on_any_input(host: str, port: int, name: str) -> None:
    decision = UpstreamPolicy(rules=(Rule.build("allow", host="*.x"),)).check(host, port, name)
    assert isinstance(decision.reason, str) and decision.reason
