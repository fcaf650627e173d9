"""Policy decisions as values: upstream ACL, bounce rules, client ACL, throttle, commands."""

from __future__ import annotations

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
        ("203.0.113.9", True),
        ("2001:db8::1", True),
        ("8.8.8.8", True),
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


def test_own_addresses_are_refused() -> None:
    policy = UpstreamPolicy(own_addresses=frozenset({"203.0.113.7"}))
    assert "gateway itself" in policy.check("203.0.113.7").reason


def test_choose_connects_only_to_an_address_it_checked() -> None:
    host, decision = UpstreamPolicy().choose(["10.0.0.1", "203.0.113.5", "203.0.113.6"])
    assert host == "203.0.113.5" and decision.allowed
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


@given(st.text(max_size=60), st.integers(min_value=0, max_value=70000), st.text(max_size=30))
def test_policy_never_raises_on_any_input(host: str, port: int, name: str) -> None:
    decision = UpstreamPolicy(rules=(Rule.build("allow", host="*.x"),)).check(host, port, name)
    assert isinstance(decision.reason, str) and decision.reason
