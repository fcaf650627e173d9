"""Data-channel addresses and forward-proxy targets: tables of valid and malformed input, then
properties: nothing but the documented errors for any text, and format/parse round trips."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.addresses import (
    HostPort,
    UserTarget,
    format_eprt_argument,
    format_epsv_reply,
    format_pasv_reply,
    format_port_argument,
    parse_eprt_argument,
    parse_epsv_argument,
    parse_epsv_reply,
    parse_host_port,
    parse_pasv_reply,
    parse_port_argument,
    parse_user_target,
)
from gateway.errors import ClientProtocolError, ProtocolError, RemoteProtocolError

ARABIC_ONE, ARABIC_TWO, ARABIC_SIX = "\u0661", "\u0662", "\u0666"  # int() reads these too

# ------------------------------------------------------------------------------ HostPort


@pytest.mark.parametrize(
    ("host", "port", "expected", "family", "text"),
    [
        ("127.0.0.1", 21, "127.0.0.1", 4, "127.0.0.1:21"),
        ("::1", 21, "::1", 6, "[::1]:21"),
        ("[::1]", 2121, "::1", 6, "[::1]:2121"),
        ("2001:DB8:0::1", 990, "2001:db8::1", 6, "[2001:db8::1]:990"),
        ("::ffff:192.0.2.1", 65535, "192.0.2.1", 4, "192.0.2.1:65535"),
        ("::FFFF:c000:0201", 1, "192.0.2.1", 4, "192.0.2.1:1"),
    ],
)
def test_host_port_normalises(host: str, port: int, expected: str, family: int, text: str) -> None:
    hp = HostPort.of(host, port)
    assert (hp.host, hp.port, hp.family, str(hp)) == (expected, port, family, text)
    assert hp == HostPort(expected, port)


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("localhost", 21),
        ("", 21),
        ("1.2.3.4", 0),
        ("1.2.3.4", 65536),
        ("1.2.3.4", -1),
        ("01.2.3.4", 21),
        ("1.2.3", 21),
        (" 1.2.3.4", 21),
        ("[1.2.3.4]", 21),
        ("[::1", 21),
        ("fe80::1%eth0", 21),
    ],
)
def test_host_port_refuses(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        HostPort.of(host, port)


@pytest.mark.parametrize("host", ["::FFFF:1.2.3.4", "2001:DB8::1", "[::1]", "1.2.3.04"])
def test_host_port_values_are_canonical(host: str) -> None:
    with pytest.raises(ValueError):
        HostPort(host, 21)


# ---------------------------------------------------------------------------- PORT / 227


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("127,0,0,1,4,1", HostPort("127.0.0.1", 1025)),
        (" 1,2,3,4,5,6 ", HostPort("1.2.3.4", 1286)),
        ("192,168,001,010,0,21", HostPort("192.168.1.10", 21)),
        ("255,255,255,255,255,255", HostPort("255.255.255.255", 65535)),
        ("0,0,0,0,0,1", HostPort("0.0.0.0", 1)),
    ],
)
def test_parse_port_argument(arg: str, expected: HostPort) -> None:
    assert parse_port_argument(arg) == expected


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "1,2,3,4,5",
        "1,2,3,4,5,6,7",
        "256,1,1,1,1,1",
        "1,2,3,4,256,1",
        "1,2,3,4,5,1000",
        "1,2,3,4,0,0",
        "+1,2,3,4,5,6",
        "-1,2,3,4,5,6",
        "1,2,3,4,5,+6",
        "a,b,c,d,e,f",
        "1,2,3,4,5,6x",
        "1, 2,3,4,5,6",
        "1,2,3,4,5,,6",
        "1.2.3.4.5.6",
        "\t1,2,3,4,5,6",
        "1,2,3,4,5,6\n",
        f"{ARABIC_ONE},2,3,4,5,6",
        "0x1,2,3,4,5,6",
    ],
)
def test_parse_port_argument_refuses(arg: str) -> None:
    with pytest.raises(ClientProtocolError) as caught:
        parse_port_argument(arg)
    assert caught.value.reply_code == 501


def test_format_port_argument() -> None:
    assert format_port_argument(HostPort("127.0.0.1", 50000)) == "127,0,0,1,195,80"
    with pytest.raises(ValueError):
        format_port_argument(HostPort("::1", 21))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Entering Passive Mode (127,0,0,1,195,80).", HostPort("127.0.0.1", 50000)),
        ("Entering Passive Mode 127,0,0,1,195,80", HostPort("127.0.0.1", 50000)),
        ("Entering Passive Mode 127,0,0,1,195,80.", HostPort("127.0.0.1", 50000)),
        ("=127,0,0,1,195,80", HostPort("127.0.0.1", 50000)),
        ("Passive (10,0,0,1,4,1)\nsecond line 1,2,3", HostPort("10.0.0.1", 1025)),
        ("Entering Passive Mode (192,168,001,002,4,1)", HostPort("192.168.1.2", 1025)),
        ("Mode 2 (1,2,3,4,5,6) (7,8,9,10,11,12)", HostPort("1.2.3.4", 1286)),
    ],
)
def test_parse_pasv_reply(text: str, expected: HostPort) -> None:
    assert parse_pasv_reply(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Entering Passive Mode",
        "Entering Passive Mode (1,2,3,4,5)",
        "Entering Passive Mode (1,2,3,4,5,6,7)",
        "Entering Passive Mode (1234,2,3,4,5,6)",
        "Entering Passive Mode (256,0,0,1,4,1)",
        "Entering Passive Mode (1,2,3,4,0,0)",
        "Entering Passive Mode (1,2,3,4,5,1000)",
        "Entering Passive Mode (-1,2,3,4,5,6)",
        "Entering Passive Mode (+1,2,3,4,5,6)",
        "Entering Passive Mode (1,2,3,4,5,-6)",
        "Entering Passive Mode (1,2,3,4,,5,6)",
        "Entering Passive Mode (a,b,c,d,e,f)",
        f"Entering Passive Mode (1,2,3,4,5,{ARABIC_SIX})",
    ],
)
def test_parse_pasv_reply_refuses(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_pasv_reply(text)
    assert caught.value.reply_code == 425


def test_format_pasv_reply() -> None:
    text = format_pasv_reply(HostPort("127.0.0.1", 50000))
    assert text == "Entering Passive Mode (127,0,0,1,195,80)."
    with pytest.raises(ValueError):
        format_pasv_reply(HostPort("::1", 21))


# ---------------------------------------------------------------------------- EPRT / 229


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("|1|132.235.1.2|6275|", HostPort("132.235.1.2", 6275)),  # RFC 2428 section 2
        ("|2|1080::8:800:200C:417A|5282|", HostPort("1080::8:800:200c:417a", 5282)),
        ("!1!1.2.3.4!21!", HostPort("1.2.3.4", 21)),
        ("~2~::1~65535~", HostPort("::1", 65535)),
        (" |1|1.2.3.4|021| ", HostPort("1.2.3.4", 21)),
        ("|2|::ffff:1.2.3.4|21|", HostPort("1.2.3.4", 21)),
    ],
)
def test_parse_eprt_argument(arg: str, expected: HostPort) -> None:
    assert parse_eprt_argument(arg) == expected


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "|",
        "||",
        "|1|1.2.3.4|21",
        "1|1.2.3.4|21|",
        "|1|1.2.3.4|21|x|",
        "|1|1.2.3.4|0|",
        "|1|1.2.3.4|65536|",
        "|1|1.2.3.4|+21|",
        "|1|1.2.3.4|-21|",
        "|1|1.2.3.4||",
        "|1|1.2.3.4|123456|",
        f"|1|1.2.3.4|{ARABIC_TWO}{ARABIC_ONE}|",
        "|1|::1|21|",  # the family does not match the address
        "|2|1.2.3.4|21|",
        "|1|1.2.3|21|",
        "|1|01.2.3.4|21|",
        "|1|1.2.3.4 |21|",
        "|1|host.example|21|",
        "|1||21|",
        "|2|[::1]|21|",
        "|2|fe80::1%eth0|21|",
        "||1.2.3.4|21|",
        "|x|1.2.3.4|21|",
        "|+1|1.2.3.4|21|",
        f"|{ARABIC_ONE}|1.2.3.4|21|",
        " 1 1.2.3.4 21 ",  # space is not a delimiter
        "\x7f1\x7f1.2.3.4\x7f21\x7f",
    ],
)
def test_parse_eprt_argument_refuses(arg: str) -> None:
    with pytest.raises(ClientProtocolError) as caught:
        parse_eprt_argument(arg)
    assert caught.value.reply_code == 501


@pytest.mark.parametrize("arg", ["|3|1.2.3.4|21|", "|0|x|1|", "|12|::1|21|"])
def test_parse_eprt_argument_unsupported_family(arg: str) -> None:
    # RFC 2428 section 2: 522 and the families the server supports.
    with pytest.raises(ClientProtocolError) as caught:
        parse_eprt_argument(arg)
    assert caught.value.reply_code == 522
    assert caught.value.message == "Network protocol not supported, use (1,2)."


def test_format_eprt_argument() -> None:
    assert format_eprt_argument(HostPort("127.0.0.1", 5282)) == "|1|127.0.0.1|5282|"
    assert format_eprt_argument(HostPort("::1", 5282)) == "|2|::1|5282|"


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("Entering Extended Passive Mode (|||6446|)", 6446),  # RFC 2428 section 3
        ("Entering Extended Passive Mode (!!!6446!)", 6446),
        ("Extended Passive (###00021#).", 21),
        ("(|||1|)", 1),
        ("(|||65535|)", 65535),
        ("Entering (|||6446|)\nand more", 6446),
    ],
)
def test_parse_epsv_reply(text: str, port: int) -> None:
    assert parse_epsv_reply(text) == port


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Entering Extended Passive Mode",
        "|||6446|",
        "(|||0|)",
        "(|||65536|)",
        "(|||123456|)",
        "(||6446|)",
        "(|||6446)",
        "(|!|6446|)",
        "(|||6446!)",
        "(|||abc|)",
        "(|||+6446|)",
        "(||| 6446|)",
        "(1116446 1)",
        "(1116441)",  # a digit cannot be the delimiter
        f"(|||{ARABIC_SIX}|)",
        "( 6446 )",
    ],
)
def test_parse_epsv_reply_refuses(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_epsv_reply(text)
    assert caught.value.reply_code == 425


def test_format_epsv_reply() -> None:
    assert format_epsv_reply(6446) == "Entering Extended Passive Mode (|||6446|)"
    for port in (0, 65536):
        with pytest.raises(ValueError):
            format_epsv_reply(port)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("", None),
        ("  ", None),
        ("1", 1),
        ("2", 2),
        ("ALL", "ALL"),
        ("all", "ALL"),
        (" All ", "ALL"),
    ],
)
def test_parse_epsv_argument(arg: str, expected: int | str | None) -> None:
    assert parse_epsv_argument(arg) == expected


@pytest.mark.parametrize(
    ("arg", "code"),
    [
        ("3", 522),
        ("99", 522),
        ("01", 522),
        ("x", 501),
        ("1 2", 501),
        ("+1", 501),
        ("ALL x", 501),
        ("ALLE", 501),
        (ARABIC_ONE, 501),
    ],
)
def test_parse_epsv_argument_refuses(arg: str, code: int) -> None:
    with pytest.raises(ClientProtocolError) as caught:
        parse_epsv_argument(arg)
    assert caught.value.reply_code == code


# ------------------------------------------------------------------- USER name@host[:port]


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("a@b@host:2121", UserTarget("a@b", "host", 2121)),
        ("u@[::1]:21", UserTarget("u", "::1", 21)),
        ("u@[::1]", UserTarget("u", "::1", 21)),
        ("u@::1", UserTarget("u", "::1", 21)),
        ("u@[2001:DB8::1]:990", UserTarget("u", "2001:db8::1", 990)),
        ("u@[::ffff:192.0.2.1]:21", UserTarget("u", "192.0.2.1", 21)),
        ("u@host", UserTarget("u", "host", 21)),
        ("anonymous@ftp.example.com.", UserTarget("anonymous", "ftp.example.com.", 21)),
        ("u@192.0.2.1:2121", UserTarget("u", "192.0.2.1", 2121)),
        ("u@my_host-1.example:00021", UserTarget("u", "my_host-1.example", 21)),
        ("first last@host", UserTarget("first last", "host", 21)),
        ("u@" + "a." * 126 + "a", UserTarget("u", "a." * 126 + "a", 21)),  # 253 characters
        ("u@" + "a" * 63 + ".example", UserTarget("u", "a" * 63 + ".example", 21)),
        ("user", None),
        ("", None),
    ],
)
def test_parse_user_target(arg: str, expected: UserTarget | None) -> None:
    assert parse_user_target(arg) == expected


def test_parse_user_target_default_port() -> None:
    assert parse_user_target("u@host", default_port=2121) == UserTarget("u", "host", 2121)
    assert parse_user_target("u@host:21", default_port=2121) == UserTarget("u", "host", 21)


@pytest.mark.parametrize(
    "arg",
    [
        "u@",
        "@host",
        "@",
        "u@host:0",
        "u@host:x",
        "u@host:",
        "u@host:65536",
        "u@host:+21",
        "u@host:-1",
        f"u@host:{ARABIC_TWO}{ARABIC_ONE}",
        "u@host:21:22",
        "u@:21",
        "u@[::1",
        "u@[::1]x",
        "u@[::1]:",
        "u@[1.2.3.4]:21",
        "u@[host]:21",
        "u@[fe80::1%eth0]:21",
        "u@fe80::1%eth0",
        "u@host name",
        "u@ho/st",
        "u@host ",
        "u@a..b",
        "u@.host",
        "u@host..",
        "u@" + "a" * 64 + ".example",
        "u@" + "a." * 127 + "a",  # 255 characters
        # Malformed IPv4 that a resolver might read as an address (inet_aton forms).
        "u@127.1",
        "u@2130706433",
        "u@0x7f.1",
        "u@01.2.3.4",
        "u@1.2.3.256",
        "u@host.123",
    ],
)
def test_parse_user_target_refuses(arg: str) -> None:
    with pytest.raises(ClientProtocolError) as caught:
        parse_user_target(arg)
    assert caught.value.reply_code == 501


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ftp.example.com", ("ftp.example.com", 21)),
        ("ftp.example.com:2121", ("ftp.example.com", 2121)),
        (" ftp.example.com:2121 ", ("ftp.example.com", 2121)),
        ("192.0.2.1", ("192.0.2.1", 21)),
        ("192.0.2.1:990", ("192.0.2.1", 990)),
        ("[2001:db8::1]:990", ("2001:db8::1", 990)),
        ("[2001:DB8::1]", ("2001:db8::1", 21)),
        ("2001:db8::1", ("2001:db8::1", 21)),
        ("localhost", ("localhost", 21)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, 21) == expected


@pytest.mark.parametrize(
    "text",
    ["", "  ", "host:", "host:0", "host:x", ":21", "[::1", "[::1]x", "1.2.3.999", "host:21:21"],
)
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_host_port(text, 21)


# ----------------------------------------------------------------------------- properties

ADDRESS_TEXT = st.one_of(
    st.text(),
    st.text(alphabet="0123456789,|!#()[]:.@ %+-xfALl\u0661\t"),
)
CLIENT_PARSERS: list[Callable[[str], object]] = [
    parse_port_argument,
    parse_eprt_argument,
    parse_epsv_argument,
    parse_user_target,
]
REMOTE_PARSERS: list[Callable[[str], object]] = [parse_pasv_reply, parse_epsv_reply]


@given(ADDRESS_TEXT)
def test_client_parsers_raise_only_client_protocol_errors(text: str) -> None:
    for parse in CLIENT_PARSERS:
        try:
            parse(text)
        except ClientProtocolError as e:
            assert e.reply_code in (501, 522)
            assert e.message


@given(ADDRESS_TEXT)
def test_reply_parsers_raise_only_remote_protocol_errors(text: str) -> None:
    for parse in REMOTE_PARSERS:
        try:
            parse(text)
        except RemoteProtocolError as e:
            assert e.reply_code == 425


@given(ADDRESS_TEXT, st.integers(1, 65535))
def test_parse_host_port_raises_only_value_error(text: str, default: int) -> None:
    try:
        host, port = parse_host_port(text, default)
    except ValueError as e:
        assert not isinstance(e, ProtocolError)
        return
    assert 1 <= port <= 65535
    assert host


def _host_port(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> HostPort:
    return HostPort.of(str(address), port)


HOST_PORTS = st.builds(_host_port, st.ip_addresses(), st.integers(1, 65535))
IPV4_HOST_PORTS = st.builds(_host_port, st.ip_addresses(v=4), st.integers(1, 65535))


@given(IPV4_HOST_PORTS)
def test_ipv4_round_trips(hp: HostPort) -> None:
    assert parse_port_argument(format_port_argument(hp)) == hp
    assert parse_pasv_reply(format_pasv_reply(hp)) == hp


@given(HOST_PORTS)
def test_round_trips(hp: HostPort) -> None:
    assert HostPort.of(hp.host, hp.port) == hp
    assert parse_eprt_argument(format_eprt_argument(hp)) == hp
    assert parse_epsv_reply(format_epsv_reply(hp.port)) == hp.port
    assert parse_host_port(str(hp), 1) == (hp.host, hp.port)
    assert parse_user_target(f"u@{hp}") == UserTarget("u", hp.host, hp.port)
