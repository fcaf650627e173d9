"""The gateway's own listening addresses, and the loop check at admission."""

from __future__ import annotations

from twisted.internet import reactor

from gateway.addresses import HostPort
from gateway.config import Config
from gateway.control import GatewayFactory
from gateway.listeners import (
    interface_addresses,
    listener_addresses,
    parse_fib_trie,
    parse_if_inet6,
)

IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
"""

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.9
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.2
        /32 host LOCAL
"""


def test_parse_proc_interface_addresses() -> None:
    assert parse_if_inet6(IF_INET6) == {"fd00::2", "::1", "fe80::fc:ff:fe00:1"}
    assert parse_fib_trie(FIB_TRIE) == {"127.0.0.1", "192.0.2.2", "192.0.2.9"}


def test_this_hosts_interface_addresses_include_loopback_and_more() -> None:
    found = interface_addresses()
    assert {"127.0.0.1", "::1"} <= found
    assert any(a not in ("127.0.0.1", "::1") for a in found)  # this machine has an interface


def test_a_wildcard_listener_is_every_interface_address() -> None:
    interfaces = {"127.0.0.1", "192.0.2.2", "fd00::2", "::1"}
    v4 = listener_addresses(HostPort.of("0.0.0.0", 2121), interfaces)
    assert v4 == {HostPort.of(h, 2121) for h in ("0.0.0.0", "127.0.0.1", "192.0.2.2")}
    v6 = listener_addresses(HostPort.of("::", 2121), interfaces)
    assert HostPort.of("fd00::2", 2121) in v6 and HostPort.of("192.0.2.2", 2121) in v6
    one = listener_addresses(HostPort.of("192.0.2.2", 2121), interfaces)
    assert one == {HostPort.of("192.0.2.2", 2121)}


def test_a_listener_no_client_used_is_refused_as_upstream_and_data_target() -> None:
    factory = GatewayFactory(Config(), reactor)
    factory.add_listener(HostPort.of("127.0.0.1", 2122))
    assert not factory.policy.check("127.0.0.1", 2122).allowed
    assert factory.is_self("0.0.0.0", 2122) and not factory.is_self("127.0.0.1", 2123)


def test_admission_loop_check_compares_both_ends() -> None:
    factory = GatewayFactory(Config(), reactor)
    gateway_end, upstream = HostPort.of("127.0.0.1", 40000), HostPort.of("127.0.0.1", 21)
    factory.outbound[gateway_end] = upstream
    # A client that happens to use the same address and port, but towards the gateway's
    # listener, is an ordinary client.
    assert not factory.is_loop(gateway_end, HostPort.of("127.0.0.1", 2121))
    assert factory.is_loop(gateway_end, upstream)
