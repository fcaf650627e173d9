"""Configuration: a TOML file and command-line options become one frozen, validated `Config`.

Every setting is declared once, as a field of `Config` or of one of its tables (`Tls`,
`Timeouts`, ...) made with `setting(...)`: the field's name is its TOML key, its annotation its
type, and the declaration carries its default, its parser, its help text and its command-line
option. `Config` mirrors the TOML file (`[tls] client` is `config.tls.client`); `SETTINGS`, the
command line (`gateway.tap`) and the checks of etc/ftp-gateway.toml are derived from it.
Invalid values raise `ConfigError` whose message names the setting and says what is wrong, in
one line, so start-up can print it and exit.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

from gateway.addresses import HostPort, parse_host_port
from gateway.backends import BALANCE_POLICIES, USER_POLICIES, Backend
from gateway.codec import DEFAULT_MAX_LINE
from gateway.effects import LogLevel
from gateway.numbers import ascii_number, is_ascii_number
from gateway.policy import Rule
from gateway.rates import DIRECTIONS, UNLIMITED, Rate, parse_rate
from gateway.routes import Route, RouteError, check_private, load_routes_file, parse_routes

#: `data.upstream_mode`: how the gateway opens data connections to the upstream.
Mode = Literal["reverse", "forward", "transparent"]
UpstreamDataMode = Literal["passive", "pasv", "epsv", "active", "client"]
#: `tls.client`: explicit FTPS (AUTH TLS) for clients.
ClientTLSMode = Literal["off", "optional", "required"]
#: `tls.upstream`: FTPS towards the upstream.
UpstreamTLSMode = Literal["off", "auto", "required", "implicit", "match_client"]
UPSTREAM_DATA_MODES: tuple[UpstreamDataMode, ...] = get_args(UpstreamDataMode)
CLIENT_TLS_MODES: tuple[ClientTLSMode, ...] = get_args(ClientTLSMode)
UPSTREAM_TLS_MODES: tuple[UpstreamTLSMode, ...] = get_args(UpstreamTLSMode)
#: `log.level` (`gateway.effects.LogLevel`): the least important events the main log keeps.
#: `log.format`: text lines or JSON lines.
LogFormat = Literal["text", "json"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
#: `upstream_proxy_protocol`: the PROXY header sent first to the upstream, if any.
ProxyProtocol = Literal["off", "v1", "v2"]
PROXY_PROTOCOLS: tuple[ProxyProtocol, ...] = get_args(ProxyProtocol)
#: `data.relay`: how data bytes move (`gateway.splice`).
DataRelay = Literal["auto", "splice", "copy"]
DATA_RELAYS: tuple[DataRelay, ...] = get_args(DataRelay)


class ConfigError(ValueError):
    """A setting has an invalid value; the message is one line naming it."""


def _string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
    return value.strip()


def _optional_string(name: str, value: object) -> str | None:
    return None if value in (None, "") else _string(name, value)


def _strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    return tuple(_string(name, item) for item in value)


def _listen(name: str, value: object) -> tuple[str, ...]:
    endpoints = _strings(name, value)
    if not endpoints:
        raise ConfigError(f"{name}: at least one listening endpoint is needed")
    for endpoint in endpoints:
        kind = endpoint.split(":", 1)[0].lower()
        if kind == "unix":
            # Data connections, the client ACL and the bounce rules all need the client's IP.
            raise ConfigError(f"{name}: {endpoint!r}: FTP needs an IP listener, not a UNIX socket")
        if kind == "haproxy":
            # The PROXY header comes first, in clear text (haproxy's doc/proxy-protocol.txt
            # section 2): under it only a plain TCP listener, TLS starts later (AUTH TLS).
            inner = endpoint.split(":", 2)[1].lower() if endpoint.count(":") >= 2 else ""
            if inner not in ("tcp", "tcp6", "systemd"):
                raise ConfigError(
                    f"{name}: {endpoint!r}: the PROXY protocol needs a TCP listener under it, "
                    "e.g. haproxy:tcp:2121 (clients use explicit FTPS, AUTH TLS, there)"
                )
    return endpoints


def _upstream(name: str, value: object) -> tuple[str, int] | None:
    text = _optional_string(name, value)
    if text is None:
        return None
    try:
        return parse_host_port(text, 21)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def _rules(action: str) -> Callable[[str, object], tuple[Rule, ...]]:
    def parse(name: str, value: object) -> tuple[Rule, ...]:
        try:
            return tuple(Rule.parse(action, cidr) for cidr in _strings(name, value))
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None

    return parse


Choice = TypeVar("Choice", bound=str)


def _choice(*choices: Choice) -> Callable[[str, object], Choice]:
    def parse(name: str, value: object) -> Choice:
        for choice in choices:
            if value == choice:
                return choice
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}; got {value!r}")

    return parse


def _port_range(name: str, value: object) -> tuple[int, int] | None:
    text = _optional_string(name, value)
    if text is None:
        return None
    low_text, sep, high_text = text.partition("-")
    low = ascii_number(low_text.strip(), max_digits=5)
    high = ascii_number(high_text.strip(), max_digits=5)
    if sep and low is not None and high is not None and 1024 <= low <= high <= 65535:
        return low, high
    raise ConfigError(
        f"{name}: expected 'LOW-HIGH' with 1024 <= LOW <= HIGH <= 65535, got {text!r}"
    )


def _ip(name: str, value: object) -> str | None:
    text = _optional_string(name, value)
    if text is None:
        return None
    try:
        return HostPort.of(text, 1).host
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an IP address") from None


def _ip_or_name(name: str, value: object) -> str | None:
    text = _optional_string(name, value)
    if text is None:
        return None
    try:
        parse_host_port(text, 1)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is neither an IP address nor a host name") from None
    return text


def _networks(name: str, value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for text in _strings(name, value):
        try:
            networks.append(ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not an IP network like 10.0.0.0/8") from None
    return tuple(networks)


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "true",
        "yes",
        "on",
        "1",
        "false",
        "no",
        "off",
        "0",
    ):
        return value.lower() in ("true", "yes", "on", "1")
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _number(low: float, high: float) -> Callable[[str, object], float]:
    def parse(name: str, value: object) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = float("nan")
        if not low <= number <= high:
            raise ConfigError(f"{name}: expected a number from {low:g} to {high:g}, got {value!r}")
        return number

    return parse


def _integer(low: int, high: int) -> Callable[[str, object], int]:
    def parse(name: str, value: object) -> int:
        if isinstance(value, str) and is_ascii_number(value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"{name}: expected a whole number from {low} to {high}, got {value!r}"
            )
        return value

    return parse


def _verbs(name: str, value: object) -> frozenset[str]:
    verbs = _strings(name, value)
    for verb in verbs:
        if not verb.isalpha() or len(verb) > 8:
            raise ConfigError(f"{name}: {verb!r} is not an FTP command name")
    return frozenset(verb.upper() for verb in verbs)


def _rule_tables(name: str, value: object) -> tuple[Rule, ...]:
    """[[upstream_rules]] tables: action plus any of cidr, host (pattern), ports."""
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
    rules = []
    for index, table in enumerate(value, 1):
        where = f"{name}[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table with action, cidr, host or ports")
        unknown = set(table) - {"action", "cidr", "host", "ports"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        if not set(table) & {"cidr", "host", "ports"}:
            raise ConfigError(f"{where}: a rule needs at least one of cidr, host or ports")
        try:
            rules.append(
                Rule.build(
                    str(table.get("action", "")),
                    cidr=table.get("cidr"),
                    host=table.get("host"),
                    ports=None if table.get("ports") is None else str(table["ports"]),
                )
            )
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return tuple(rules)


def _checkers(name: str, value: object) -> tuple[str, ...]:
    """twisted.cred checker descriptions ("htpasswd:PATH", "ldap:", "file:PATH", "memory:U:P",
    "unix"); the shell builds them at start and reports one it cannot build under this name."""
    descriptions = _strings(name, value)
    for description in descriptions:
        kind = description.partition(":")[0]
        if not kind.isidentifier():
            raise ConfigError(f"{name}: {description!r} is not a checker like file:PATH")
    return descriptions


def _rate(name: str, value: object) -> Rate:
    """Bytes per second for both directions, or a table { download = ..., upload = ... } with
    either or both; 0 or a missing direction is unlimited (`gateway.rates.parse_rate`)."""
    try:
        if not isinstance(value, dict):
            rate = parse_rate(value)
            return Rate(download=rate, upload=rate)
        unknown = set(value) - set(DIRECTIONS)
        if unknown:
            raise ValueError(
                f"unknown key {sorted(unknown)[0]!r}; a table takes download and upload"
            )
        return Rate(
            download=parse_rate(value.get("download", 0)),
            upload=parse_rate(value.get("upload", 0)),
        )
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def _fingerprint(name: str, value: object) -> str | None:
    text = _optional_string(name, value)
    if text is None:
        return None
    digits = text.replace(":", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ConfigError(f"{name}: expected a SHA-256 fingerprint (64 hex digits), got {text!r}")
    return digits


_BACKEND_KEYS = frozenset(
    {
        "address",
        "name",
        "weight",
        "group",
        "tls_upstream",
        "tls_upstream_ca_file",
        "tls_upstream_fingerprint",
        "tls_upstream_name",
    }
)


def _backends(name: str, value: object) -> tuple[Backend, ...]:
    """[[backends]] tables: address, and optional name, weight, group and TLS settings (named
    as in [tls] with a tls_ prefix; unset ones take the [tls] values)."""
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
    backends = []
    for index, table in enumerate(value, 1):
        where = f"{name}[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f'{where}: expected a table with address = "host:port"')
        unknown = set(table) - _BACKEND_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        if "address" not in table:
            raise ConfigError(f'{where}: a backend needs address = "host:port"')
        upstream = _upstream(f"{where}.address", table["address"])
        assert upstream is not None
        host, port = upstream
        address = Backend("", host, port).address
        tls = table.get("tls_upstream")
        backends.append(
            Backend(
                name=_string(f"{where}.name", table.get("name", address)),
                host=host,
                port=port,
                weight=_integer(1, 1000)(f"{where}.weight", table.get("weight", 1)),
                group=_optional_string(f"{where}.group", table.get("group")),
                tls_upstream=None
                if tls is None
                else _choice(*UPSTREAM_TLS_MODES)(f"{where}.tls_upstream", tls),
                tls_upstream_ca_file=_optional_string(
                    f"{where}.tls_upstream_ca_file", table.get("tls_upstream_ca_file")
                ),
                tls_upstream_fingerprint=_fingerprint(
                    f"{where}.tls_upstream_fingerprint", table.get("tls_upstream_fingerprint")
                ),
                tls_upstream_name=_optional_string(
                    f"{where}.tls_upstream_name", table.get("tls_upstream_name")
                ),
            )
        )
    names = [backend.name for backend in backends]
    for backend_name in names:
        if names.count(backend_name) > 1:
            raise ConfigError(f"{name}: two backends are named {backend_name!r}; names must differ")
    return tuple(backends)


def _routes(name: str, value: object) -> tuple[Route, ...]:
    try:
        return parse_routes(value, name)
    except RouteError as e:
        raise ConfigError(str(e)) from None


T = TypeVar("T")


def setting(
    parse: Callable[[str, object], T], default: T, help: str, *, option: str | None = None
) -> T:
    """Declare one setting as a field of `Config` or of one of its tables: the field's name is
    its TOML key within that table, its annotation its type. `parse` checks and converts a
    value from the file or the command line (and names the setting in its one-line error);
    `help` says what the setting does, and is the `--help` text of its command-line `option`
    (`gateway.tap` builds the options from these declarations)."""
    metadata = {"parse": parse, "help": help, "option": option}
    return field(default=default, metadata=metadata)


def table(kind: type[T]) -> T:
    """Declare a TOML table (`[tls]`, ...) whose settings are the fields of `kind`."""
    return field(default_factory=kind, metadata={"table": kind})


@dataclass(frozen=True, slots=True)
class Health:
    """[health]: how reverse mode checks its backends ([[backends]])."""

    interval: float = setting(
        _number(0.1, 3600),
        10.0,
        "Seconds between health checks of each backend ([[backends]] only).",
    )
    timeout: float = setting(
        _number(0.1, 300),
        10.0,
        "Seconds a backend has to accept a connection and greet with 220, in a health check "
        "and when a session is sent to it.",
    )
    fall: int = setting(_integer(1, 100), 3, "Failed checks in a row that take a backend out.")
    rise: int = setting(_integer(1, 100), 2, "Passed checks in a row that bring a backend back.")


@dataclass(frozen=True, slots=True)
class Commands:
    """[commands]: what clients may send."""

    deny: frozenset[str] = setting(
        _verbs,
        frozenset(),
        "Client commands the gateway refuses with 502.",
    )
    read_only: bool = setting(
        _bool,
        False,
        "Refuse STOR, STOU, APPE, DELE, RNFR, RNTO, MKD, RMD and SITE with 550.",
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """[limits]: how much of the gateway one client, session or reply may use."""

    max_sessions: int = setting(
        _integer(1, 1000000),
        1000,
        "Concurrent sessions in total; more get 421.",
    )
    max_sessions_per_ip: int = setting(
        _integer(1, 1000000),
        50,
        "Concurrent sessions from one client IP; more get 421.",
    )
    max_open_files: int = setting(
        _integer(0, 1 << 30),
        0,
        "Soft limit on open file descriptors to raise to at start. 0: the hard limit.",
    )
    max_failed_logins: int = setting(
        _integer(1, 1000),
        5,
        "Failed proxy logins per client IP per minute before refusing with 421.",
    )
    rate_per_session: Rate = setting(
        _rate,
        UNLIMITED,
        "Bytes per second one session's transfers may move ('512k', '1M', or a table "
        "{ download = ..., upload = ... }). 0: unlimited.",
    )
    rate_per_user: Rate = setting(
        _rate,
        UNLIMITED,
        "Bytes per second shared by all sessions of one proxy user or login name. 0: unlimited.",
    )
    rate_total: Rate = setting(
        _rate,
        UNLIMITED,
        "Bytes per second for all transfers through the gateway together. 0: unlimited.",
    )
    max_line: int = setting(
        _integer(512, 65536),
        DEFAULT_MAX_LINE,
        "Longest client command line, bytes.",
    )
    max_pending_commands: int = setting(
        _integer(1, 1000),
        32,
        "Pipelined client commands held while one is in progress.",
    )
    max_reply_lines: int = setting(_integer(1, 100000), 1000, "Most lines in one upstream reply.")
    max_reply_bytes: int = setting(
        _integer(1024, 16 * 1024 * 1024),
        256 * 1024,
        "Largest upstream reply, bytes.",
    )


@dataclass(frozen=True, slots=True)
class Data:
    """[data]: how data connections are made on each side."""

    upstream_mode: UpstreamDataMode = setting(
        _choice(*UPSTREAM_DATA_MODES),
        "passive",
        "How the gateway opens data connections to the upstream: passive (EPSV, then PASV), "
        "pasv, epsv, active or client (the way the client chose).",
        option="upstream-data-mode",
    )
    passive_ports: tuple[int, int] | None = setting(
        _port_range,
        None,
        "Port range for passive listeners, 'LOW-HIGH'. Empty: any free port.",
        option="passive-ports",
    )
    masquerade_address: str | None = setting(
        _ip_or_name,
        None,
        "IPv4 address advertised in 227 replies instead of the local one (gateway behind NAT).",
        option="masquerade-address",
    )
    masquerade_except: tuple[IPv4Network | IPv6Network, ...] = setting(
        _networks,
        (),
        "CIDR networks whose clients get the local address in 227, not masquerade_address.",
    )
    follow_pasv_address: bool = setting(
        _bool,
        False,
        "Connect to the IP an upstream names in 227 instead of its control address.",
    )
    allow_foreign_address: bool = setting(
        _bool,
        False,
        "Let PORT/EPRT name an address other than the client's own (FXP). Unsafe.",
    )
    source_address: str | None = setting(
        _ip,
        None,
        "Local IP for connections to upstreams. Empty: chosen by the system.",
        option="source-address",
    )
    relay: DataRelay = setting(
        _choice(*DATA_RELAYS),
        "auto",
        "How plain TCP data moves: auto (splice on Linux, else copy), splice or copy.",
        option="data-relay",
    )


@dataclass(frozen=True, slots=True)
class Timeouts:
    """[timeouts]: how long each wait on a peer may last, in seconds."""

    login: float = setting(_number(1, 86400), 60.0, "Seconds to complete login.")
    idle: float = setting(_number(1, 86400), 900.0, "Seconds without a command.")
    data_connect: float = setting(_number(1, 3600), 30.0, "Seconds to establish a data connection.")
    stall: float = setting(
        _number(1, 86400),
        300.0,
        "Seconds a transfer may go without moving a byte.",
    )
    control_send: float = setting(
        _number(1, 86400),
        60.0,
        "Seconds a control connection's peer may leave a full buffer of the gateway's "
        "replies or commands unread before the session ends with 421.",
    )
    reply: float = setting(
        _number(1, 86400),
        120.0,
        "Seconds to wait for any upstream reply before ending the transfer (426) or session (421).",
    )
    shutdown: float = setting(
        _number(0, 86400),
        60.0,
        "Seconds running transfers may finish after SIGTERM; keep below systemd's TimeoutStopSec.",
    )


@dataclass(frozen=True, slots=True)
class Tls:
    """[tls]: FTPS towards clients and towards upstreams."""

    certificate: str | None = setting(
        _optional_string,
        None,
        "PEM file with the gateway's certificate (leaf first, chain may follow, key may too).",
    )
    private_key: str | None = setting(
        _optional_string,
        None,
        "PEM file with the private key, if not in the certificate file.",
    )
    client: ClientTLSMode = setting(
        _choice(*CLIENT_TLS_MODES),
        "optional",
        "Explicit FTPS for clients (AUTH TLS): off, optional or required.",
    )
    min_version: str = setting(
        _choice("1.2", "1.3"),
        "1.2",
        "Lowest TLS version accepted on either side.",
    )
    require_data_session_reuse: bool = setting(
        _bool,
        False,
        "Refuse client data connections that do not resume the control connection's session.",
    )
    upstream: UpstreamTLSMode = setting(
        _choice(*UPSTREAM_TLS_MODES),
        "auto",
        "FTPS towards the upstream: off, auto, required, implicit or match_client.",
    )
    upstream_ca_file: str | None = setting(
        _optional_string,
        None,
        "PEM CA certificates to verify upstreams with, instead of the system store.",
    )
    upstream_fingerprint: str | None = setting(
        _fingerprint,
        None,
        "Pin the upstream certificate by SHA-256 fingerprint (reverse mode).",
    )
    upstream_name: str | None = setting(
        _optional_string,
        None,
        "Name to verify the upstream certificate against. Empty: the upstream host name.",
    )


@dataclass(frozen=True, slots=True)
class Ldap:
    """[ldap]: the directory behind the `ldap:` proxy-login checker."""

    url: str | None = setting(
        _optional_string,
        None,
        "Directory for the ldap: checker: ldaps://HOST[:PORT], or ldap://HOST[:PORT] with "
        "ldap.starttls.",
    )
    starttls: bool = setting(
        _bool,
        False,
        "Upgrade an ldap:// connection with StartTLS before binding (required for ldap://).",
    )
    ca_file: str | None = setting(
        _optional_string,
        None,
        "PEM CA certificates to verify the directory with. Empty: the system store.",
    )
    user_dn_template: str | None = setting(
        _optional_string,
        None,
        "Bind DN of a user, {user} standing for the escaped login name (no search).",
    )
    bind_dn: str | None = setting(
        _optional_string,
        None,
        "Search-then-bind: the service account that searches for users. Empty: anonymous.",
    )
    bind_password: str | None = setting(
        _optional_string,
        None,
        "Password of ldap.bind_dn (or use ldap.bind_password_file).",
    )
    bind_password_file: str | None = setting(
        _optional_string,
        None,
        "File holding the password of ldap.bind_dn (keeps it out of the configuration).",
    )
    base_dn: str | None = setting(
        _optional_string,
        None,
        "Search-then-bind: where users are searched for (subtree).",
    )
    filter: str = setting(
        _string,
        "(uid={user})",
        "Search-then-bind: filter finding one user, {user} standing for the escaped login name.",
    )
    require_group: str | None = setting(
        _optional_string,
        None,
        "DN of a groupOfNames whose member attribute must list the user. Empty: no check.",
    )
    timeout: float = setting(
        _number(0.5, 300),
        10.0,
        "Seconds for one LDAP login, from connect to the last answer.",
    )


@dataclass(frozen=True, slots=True)
class Metrics:
    """[metrics]: the Prometheus endpoint."""

    listen: str | None = setting(
        _optional_string,
        None,
        "Twisted endpoint to serve Prometheus metrics on (/metrics). Empty: not served.",
    )


@dataclass(frozen=True, slots=True)
class Logging:
    """[log]: what the gateway logs, and where."""

    level: LogLevel = setting(
        _choice(*LOG_LEVELS),
        "info",
        "Least severe log level written: debug, info, warn or error.",
        option="log-level",
    )
    format: LogFormat = setting(_choice(*LOG_FORMATS), "text", "Log lines as text or json.")
    transfer_log: str | None = setting(
        _optional_string,
        None,
        "File to append one xferlog(5) line per transfer to; reopened on SIGUSR1. Empty: none.",
    )


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a running gateway needs to know, after validation. It mirrors the TOML
    file: `config.tls.client` is `[tls] client`, `config.listen` is the top-level `listen`.
    Each field is a setting (declared with `setting`) or a table of them (with `table`)."""

    listen: tuple[str, ...] = setting(
        _listen,
        ("tcp:2121:interface=127.0.0.1",),
        "Twisted server endpoint strings to accept clients on.",
        option="listen",
    )
    upstream: tuple[str, int] | None = setting(
        _upstream,
        None,
        "Reverse mode: HOST:PORT every session goes to. Empty: forward mode (USER name@host).",
        option="upstream",
    )
    backends: tuple[Backend, ...] = setting(
        _backends,
        (),
        "Reverse mode: [[backends]] tables (address, name, weight, group, tls_upstream...).",
    )
    balance: str = setting(
        _choice(*BALANCE_POLICIES),
        "round_robin",
        "How sessions are spread over backends: round_robin (weighted), least_connections, "
        "source_hash (client address) or user_hash (login name).",
    )
    routes: tuple[Route, ...] = setting(
        _routes,
        (),
        "Reverse mode: [[routes]] tables (user pattern to backend or backend_group), first "
        "match wins.",
    )
    routes_file: str | None = setting(
        _optional_string,
        None,
        "TOML ([[routes]]) or CSV file of more routes, after [[routes]]; re-read on SIGHUP.",
    )
    upstream_proxy_protocol: ProxyProtocol = setting(
        _choice(*PROXY_PROTOCOLS),
        "off",
        "Send the client's address first on upstream control connections: off, v1 or v2 "
        "(HAProxy's PROXY protocol; the server must expect it).",
    )
    transparent: bool = setting(
        _bool,
        False,
        "Transparent mode: each session goes to where the client connected before a NAT "
        "redirect (nftables/iptables REDIRECT or DNAT) sent it to the gateway. Needs "
        "data.passive_ports (--passive-ports), redirected by the edge like the control port.",
        option="transparent",
    )
    allow_upstream: tuple[Rule, ...] = setting(
        _rules("allow"),
        (),
        "Forward and transparent mode: CIDR networks that may be reached even if private.",
        option="allow-upstream",
    )
    deny_upstream: tuple[Rule, ...] = setting(
        _rules("deny"),
        (),
        "Forward and transparent mode: CIDR networks never reached, checked before allow.",
        option="deny-upstream",
    )
    upstream_rules: tuple[Rule, ...] = setting(
        _rule_tables,
        (),
        "Forward and transparent mode: [[upstream_rules]] tables, first match wins.",
    )
    allow_clients: tuple[Rule, ...] = setting(
        _rules("allow"),
        (),
        "CIDR networks clients may connect from. Empty: any, unless denied.",
    )
    deny_clients: tuple[Rule, ...] = setting(
        _rules("deny"),
        (),
        "CIDR networks clients may not connect from (checked first).",
    )
    proxy_auth: tuple[str, ...] = setting(
        _checkers,
        (),
        "Forward mode, and reverse mode with routes: twisted.cred checkers for proxy logins "
        "(htpasswd:PATH, ldap:, file:PATH, memory:U:P, unix).",
    )
    greeting: str = setting(
        _string,
        "FTP gateway ready.",
        "The gateway's own 220 greeting text (forward mode; reverse mode with routes, "
        "user_hash or a proxy login).",
    )
    health: Health = table(Health)
    commands: Commands = table(Commands)
    limits: Limits = table(Limits)
    data: Data = table(Data)
    timeouts: Timeouts = table(Timeouts)
    tls: Tls = table(Tls)
    ldap: Ldap = table(Ldap)
    metrics: Metrics = table(Metrics)
    log: Logging = table(Logging)

    @property
    def client_tls_available(self) -> bool:
        return self.tls.client != "off" and self.tls.certificate is not None

    @property
    def forward(self) -> bool:
        """Forward (egress proxy) mode: no fixed upstream, USER name@host chooses it."""
        return self.upstream is None and not self.backends and not self.transparent

    @property
    def mode(self) -> Mode:
        """How the upstream is chosen, for the logs."""
        if self.transparent:
            return "transparent"
        return "forward" if self.forward else "reverse"

    @property
    def reverse(self) -> bool:
        """Reverse mode: sessions go to the configured backends (or the one upstream)."""
        return self.upstream is not None or bool(self.backends)

    @property
    def pool_backends(self) -> tuple[Backend, ...]:
        """Reverse mode's backends; `upstream` is the shorthand for a pool of one."""
        if self.backends or self.upstream is None:
            return self.backends
        host, port = self.upstream
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return (Backend(name, host, port),)

    def for_backend(self, backend: Backend) -> Config:
        """This configuration with the upstream TLS settings of `backend`: its own where set,
        else [tls]'s. The trust settings (CA file, fingerprint) go together: a backend that
        names either takes neither from [tls]. Its certificate name defaults to its host."""
        own_trust = (backend.tls_upstream_ca_file, backend.tls_upstream_fingerprint) != (
            None,
            None,
        )
        return replace(
            self,
            tls=replace(
                self.tls,
                upstream=cast(UpstreamTLSMode, backend.tls_upstream or self.tls.upstream),
                upstream_ca_file=backend.tls_upstream_ca_file
                if own_trust
                else self.tls.upstream_ca_file,
                upstream_fingerprint=backend.tls_upstream_fingerprint
                if own_trust
                else self.tls.upstream_fingerprint,
                upstream_name=backend.tls_upstream_name or self.tls.upstream_name or backend.host,
            ),
        )

    @property
    def connect_after_user(self) -> bool:
        """Reverse mode where the backend depends on the login (routes, user_hash, a proxy
        login first): the gateway greets by itself and connects once it knows the user."""
        return self.reverse and (
            self.balance in USER_POLICIES or bool(self.routes) or bool(self.proxy_auth)
        )

    @property
    def upstream_policy_rules(self) -> tuple[Rule, ...]:
        """The upstream policy in the order it is checked: [[upstream_rules]] tables as written
        (the first match wins), then deny_upstream, then allow_upstream, so an explicit deny
        inside an allowed network wins."""
        return self.upstream_rules + self.deny_upstream + self.allow_upstream

    @property
    def client_policy_rules(self) -> tuple[Rule, ...]:
        """The client policy in the order it is checked: deny_clients first."""
        return self.deny_clients + self.allow_clients


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as `Config` declares it."""

    key: str  # the dotted TOML key; also its attribute path, config.<key>
    type: str  # the field's annotation
    default: Any
    parse: Callable[[str, object], Any]
    help: str
    option: str | None  # the command-line option (--option) that sets it, if any


def _settings(kind: type, prefix: str = "") -> tuple[Setting, ...]:
    found: list[Setting] = []
    for item in fields(kind):
        if "table" in item.metadata:
            found.extend(_settings(item.metadata["table"], f"{prefix}{item.name}."))
        else:
            meta = item.metadata
            found.append(
                Setting(
                    f"{prefix}{item.name}",
                    str(item.type),
                    item.default,
                    meta["parse"],
                    meta["help"],
                    meta["option"],
                )
            )
    return tuple(found)


#: Every setting, in the order Config declares them.
SETTINGS: tuple[Setting, ...] = _settings(Config)

_BY_KEY = {setting.key: setting for setting in SETTINGS}
_TABLES: dict[str, type] = {
    item.name: item.metadata["table"] for item in fields(Config) if "table" in item.metadata
}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in _BY_KEY:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def with_setting(config: Config, key: str, value: Any) -> Config:
    """`config` with the setting at dotted `key` set to `value` (already parsed)."""
    name, _, rest = key.partition(".")
    if not rest:
        return replace(config, **{name: value})
    table = getattr(config, name)
    return replace(config, **{name: replace(table, **{rest: value})})


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML configuration file into flat dotted keys."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    routes = table.get("routes")
    passwords = isinstance(routes, list) and any(
        isinstance(route, dict) and route.get("upstream_password") for route in routes
    )
    try:
        check_private(mode, passwords, f"routes: {path}")
    except RouteError as e:
        raise ConfigError(str(e)) from None
    return _flatten(table)


def build(*layers: Mapping[str, Any]) -> Config:
    """Merge layers of dotted settings (later layers win) over the defaults and validate."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in _BY_KEY:
                raise ConfigError(f"{key}: unknown setting")
            merged[key] = value
    tables: dict[str, dict[str, Any]] = {}
    for key, raw in merged.items():
        name, _, attr = key.rpartition(".")
        tables.setdefault(name, {})[attr] = _BY_KEY[key].parse(key, raw)
    config = Config(
        **tables.pop("", {}),
        **{name: kind(**tables.get(name, {})) for name, kind in _TABLES.items()},
    )
    for check in _MODE_CHECKS:
        check(config)
    config = _with_routes_file(config)
    for check in _CHECKS:
        check(config)
    return config


def _with_routes_file(config: Config) -> Config:
    """The config with routes_file's routes after the [[routes]] tables."""
    if config.routes_file is None:
        return config
    try:
        return replace(config, routes=config.routes + load_routes_file(config.routes_file))
    except RouteError as e:
        raise ConfigError(str(e)) from None


def _check_transparent(config: Config) -> None:
    """Transparent mode takes the upstream from each connection, and needs a passive range."""
    if not config.transparent:
        return
    if config.upstream is not None:
        raise ConfigError("transparent: the upstream comes from each connection; drop upstream")
    if config.data.passive_ports is None:
        # Clients connect for passive data to the server's address, on a port the gateway
        # chose: only a port range that the edge also redirects to the gateway reaches it.
        raise ConfigError(
            "transparent: needs data.passive_ports, a range the edge redirects to the gateway "
            "as it does the control port"
        )


def _check_one_upstream_form(config: Config) -> None:
    """The upstream comes from one place: upstream, backends, or each connection."""
    if config.backends and config.upstream is not None:
        raise ConfigError("backends: upstream is the one-backend shorthand; drop one of them")
    if config.transparent and config.backends:
        raise ConfigError("transparent: the upstream comes from each connection; drop backends")


def _check_proxy_auth(config: Config) -> None:
    if config.proxy_auth and not (config.forward or config.routes):
        raise ConfigError(
            "proxy_auth: proxy authentication applies to forward mode, or reverse mode with routes"
        )


def _check_upstream_proxy_protocol(config: Config) -> None:
    implicit = [b for b in config.backends if b.tls_upstream == "implicit"]
    if config.upstream_proxy_protocol != "off" and (config.tls.upstream == "implicit" or implicit):
        # The header precedes everything, TLS too; implicit TLS starts with the first byte.
        raise ConfigError(
            "upstream_proxy_protocol: cannot be combined with tls.upstream = 'implicit'"
        )


def _check_client_tls(config: Config) -> None:
    if config.tls.client == "required" and config.tls.certificate is None:
        raise ConfigError("tls.client: 'required' needs tls.certificate")


def _check_routes(config: Config) -> None:
    """Routes need reverse mode, and must name backends that exist; a route with an upstream
    password needs a proxy login, or anybody could use its account."""
    if not config.routes:
        return
    if not config.reverse:
        raise ConfigError("routes: routes apply in reverse mode (set backends or upstream)")
    names = {backend.name for backend in config.pool_backends}
    groups = {backend.group for backend in config.pool_backends if backend.group}
    for route in config.routes:
        _check_route(route, names, groups, bool(config.proxy_auth))


def _check_route(route: Route, names: set[str], groups: set[str], proxy_auth: bool) -> None:
    if route.backend is not None and route.backend not in names:
        raise ConfigError(
            f"routes: route for {route.user!r} names backend {route.backend!r}, "
            f"which is not among the backends ({', '.join(sorted(names))})"
        )
    if route.backend_group is not None and route.backend_group not in groups:
        raise ConfigError(
            f"routes: route for {route.user!r} names backend_group "
            f"{route.backend_group!r}, which no backend has"
        )
    if route.upstream_password is not None and not proxy_auth:
        raise ConfigError(
            f"routes: route for {route.user!r} carries an upstream password, which needs "
            "proxy_auth (clients log in to the gateway, the gateway to the backend)"
        )


def _check_ldap(config: Config) -> None:
    """The [ldap] table must describe one way to find users, over TLS."""
    if not any(d.partition(":")[0] == "ldap" for d in config.proxy_auth):
        return
    _check_ldap_url(config.ldap.url, config.ldap.starttls)
    _check_ldap_lookup(config)
    _check_ldap_service_account(config)


def _check_ldap_url(url: str | None, starttls: bool) -> None:
    if url is None:
        raise ConfigError("ldap.url: the ldap: checker needs the directory's URL")
    scheme = url.partition("://")[0].lower()
    if scheme == "ldap" and not starttls:
        # Passwords would cross the network in clear text.
        raise ConfigError("ldap.url: ldap:// needs starttls = true (or use ldaps://)")
    if scheme == "ldaps" and starttls:
        raise ConfigError("ldap.starttls: ldaps:// is already TLS; drop starttls")
    if scheme not in ("ldap", "ldaps"):
        raise ConfigError(f"ldap.url: expected ldaps:// or ldap://, got {url!r}")


def _check_ldap_lookup(config: Config) -> None:
    """Users are found by a DN template or by a search, exactly one of them."""
    template, base = config.ldap.user_dn_template, config.ldap.base_dn
    if (template is None) == (base is None):
        raise ConfigError(
            "ldap: set either user_dn_template (bind with a DN) or base_dn (search, then bind)"
        )
    if template is not None and "{user}" not in template:
        raise ConfigError("ldap.user_dn_template: must contain {user}")
    if base is not None and "{user}" not in config.ldap.filter:
        raise ConfigError("ldap.filter: must contain {user}")


def _check_ldap_service_account(config: Config) -> None:
    if config.ldap.bind_password is not None and config.ldap.bind_password_file is not None:
        raise ConfigError("ldap.bind_password: set it or ldap.bind_password_file, not both")
    has_password = (config.ldap.bind_password or config.ldap.bind_password_file) is not None
    if has_password != (config.ldap.bind_dn is not None):
        raise ConfigError("ldap.bind_dn: the service account needs both a DN and a password")


# The checks across settings that build runs, in order, each raising ConfigError naming the
# setting to change: first those of the mode, before routes_file is read, then the rest.
_MODE_CHECKS: tuple[Callable[[Config], None], ...] = (
    _check_transparent,
    _check_one_upstream_form,
)
_CHECKS: tuple[Callable[[Config], None], ...] = (
    _check_routes,
    _check_proxy_auth,
    _check_upstream_proxy_protocol,
    _check_client_tls,
    _check_ldap,
)
