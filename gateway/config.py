"""Configuration: a TOML file and command-line options become one frozen, validated `Config`.

Every setting is declared once, in `SETTINGS`, with its default, its parser and its help text.
`etc/ftp-gateway.toml` documents the same table. Invalid values raise `ConfigError` whose message
names the setting and says what is wrong, in one line, so start-up can print it and exit.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal, get_args

from gateway.addresses import HostPort, parse_host_port
from gateway.effects import LogLevel
from gateway.numbers import ascii_number, is_ascii_number
from gateway.policy import Rule

#: `data.upstream_mode`: how the gateway opens data connections to the upstream.
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


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a running gateway needs to know, after validation."""

    listen: tuple[str, ...] = ("tcp:2121:interface=127.0.0.1",)
    upstream: tuple[str, int] | None = None
    transparent: bool = False
    upstream_rules: tuple[Rule, ...] = ()
    upstream_data_mode: UpstreamDataMode = "passive"
    passive_ports: tuple[int, int] | None = None
    masquerade_address: str | None = None
    masquerade_except: tuple[IPv4Network | IPv6Network, ...] = ()
    follow_pasv_address: bool = False
    allow_foreign_data_address: bool = False
    source_address: str | None = None
    data_relay: DataRelay = "auto"
    login_timeout: float = 60.0
    idle_timeout: float = 900.0
    data_connect_timeout: float = 30.0
    stall_timeout: float = 300.0
    control_send_timeout: float = 60.0
    reply_timeout: float = 120.0
    shutdown_timeout: float = 60.0
    max_line: int = 2048
    max_pending_commands: int = 32
    max_reply_lines: int = 1000
    max_reply_bytes: int = 256 * 1024
    greeting: str = "FTP gateway ready."
    proxy_auth: tuple[str, ...] = ()
    denied_commands: frozenset[str] = frozenset()
    read_only: bool = False
    client_rules: tuple[Rule, ...] = ()
    max_sessions: int = 1000
    max_sessions_per_ip: int = 50
    max_open_files: int = 0
    max_failed_logins: int = 5
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    client_tls: ClientTLSMode = "optional"
    tls_min_version: str = "1.2"
    require_data_session_reuse: bool = False
    upstream_tls: UpstreamTLSMode = "auto"
    upstream_ca_file: str | None = None
    upstream_fingerprint: str | None = None
    upstream_tls_name: str | None = None
    metrics_listen: str | None = None
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    transfer_log: str | None = None
    ldap_url: str | None = None
    ldap_starttls: bool = False
    ldap_ca_file: str | None = None
    ldap_user_dn_template: str | None = None
    ldap_bind_dn: str | None = None
    ldap_bind_password: str | None = None
    ldap_bind_password_file: str | None = None
    ldap_base_dn: str | None = None
    ldap_filter: str = "(uid={user})"
    ldap_require_group: str | None = None
    ldap_timeout: float = 10.0
    upstream_proxy_protocol: ProxyProtocol = "off"

    @property
    def client_tls_available(self) -> bool:
        return self.client_tls != "off" and self.tls_certificate is not None

    @property
    def forward(self) -> bool:
        """Forward (egress proxy) mode: no fixed upstream, USER name@host chooses it."""
        return self.upstream is None and not self.transparent


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


def _choice(*choices: str) -> Callable[[str, object], str]:
    def parse(name: str, value: object) -> str:
        if value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}; got {value!r}")
        return str(value)

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


def _fingerprint(name: str, value: object) -> str | None:
    text = _optional_string(name, value)
    if text is None:
        return None
    digits = text.replace(":", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ConfigError(f"{name}: expected a SHA-256 fingerprint (64 hex digits), got {text!r}")
    return digits


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration setting: where it lives in TOML, which Config field it fills."""

    key: str  # dotted TOML key, also used in error messages
    attr: str  # Config field
    parse: Callable[[str, object], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "listen", _listen, "Twisted server endpoint strings to accept clients on."),
    Setting(
        "upstream",
        "upstream",
        _upstream,
        "Reverse mode: HOST:PORT every session goes to. Empty: forward mode (USER name@host).",
    ),
    Setting(
        "upstream_proxy_protocol",
        "upstream_proxy_protocol",
        _choice(*PROXY_PROTOCOLS),
        "Send the client's address first on upstream control connections: off, v1 or v2 "
        "(HAProxy's PROXY protocol; the server must expect it).",
    ),
    Setting(
        "transparent",
        "transparent",
        _bool,
        "Transparent mode: each session goes to where the client connected before a NAT "
        "redirect (nftables/iptables REDIRECT or DNAT) sent it to the gateway.",
    ),
    Setting(
        "allow_upstream",
        "upstream_rules",
        _rules("allow"),
        "Forward and transparent mode: CIDR networks that may be reached even if private.",
    ),
    Setting(
        "deny_upstream",
        "upstream_rules",
        _rules("deny"),
        "Forward and transparent mode: CIDR networks never reached, checked before allow.",
    ),
    Setting(
        "upstream_rules",
        "upstream_rules",
        _rule_tables,
        "Forward and transparent mode: [[upstream_rules]] tables, first match wins.",
    ),
    Setting(
        "allow_clients",
        "client_rules",
        _rules("allow"),
        "CIDR networks clients may connect from. Empty: any, unless denied.",
    ),
    Setting(
        "deny_clients",
        "client_rules",
        _rules("deny"),
        "CIDR networks clients may not connect from (checked first).",
    ),
    Setting(
        "proxy_auth",
        "proxy_auth",
        _checkers,
        "Forward mode: twisted.cred checkers for proxy logins (htpasswd:PATH, ldap:, "
        "file:PATH, memory:U:P, unix).",
    ),
    Setting(
        "commands.deny",
        "denied_commands",
        _verbs,
        "Client commands the gateway refuses with 502.",
    ),
    Setting(
        "commands.read_only",
        "read_only",
        _bool,
        "Refuse STOR, STOU, APPE, DELE, RNFR, RNTO, MKD, RMD and SITE with 550.",
    ),
    Setting(
        "limits.max_sessions",
        "max_sessions",
        _integer(1, 1000000),
        "Concurrent sessions in total; more get 421.",
    ),
    Setting(
        "limits.max_sessions_per_ip",
        "max_sessions_per_ip",
        _integer(1, 1000000),
        "Concurrent sessions from one client IP; more get 421.",
    ),
    Setting(
        "limits.max_open_files",
        "max_open_files",
        _integer(0, 1 << 30),
        "Soft limit on open file descriptors to raise to at start. 0: the hard limit.",
    ),
    Setting(
        "limits.max_failed_logins",
        "max_failed_logins",
        _integer(1, 1000),
        "Failed proxy logins per client IP per minute before refusing with 421.",
    ),
    Setting(
        "data.upstream_mode",
        "upstream_data_mode",
        _choice(*UPSTREAM_DATA_MODES),
        "How the gateway opens data connections to the upstream.",
    ),
    Setting(
        "data.passive_ports",
        "passive_ports",
        _port_range,
        "Port range for passive listeners, 'LOW-HIGH'. Empty: any free port.",
    ),
    Setting(
        "data.masquerade_address",
        "masquerade_address",
        _ip_or_name,
        "IPv4 address advertised in 227 replies instead of the local one (gateway behind NAT).",
    ),
    Setting(
        "data.masquerade_except",
        "masquerade_except",
        _networks,
        "CIDR networks whose clients get the local address in 227, not masquerade_address.",
    ),
    Setting(
        "data.follow_pasv_address",
        "follow_pasv_address",
        _bool,
        "Connect to the IP an upstream names in 227 instead of its control address.",
    ),
    Setting(
        "data.allow_foreign_address",
        "allow_foreign_data_address",
        _bool,
        "Let PORT/EPRT name an address other than the client's own (FXP). Unsafe.",
    ),
    Setting(
        "data.source_address",
        "source_address",
        _ip,
        "Local IP for connections to upstreams. Empty: chosen by the system.",
    ),
    Setting(
        "data.relay",
        "data_relay",
        _choice(*DATA_RELAYS),
        "How plain TCP data moves: auto (splice on Linux, else copy), splice or copy.",
    ),
    Setting("timeouts.login", "login_timeout", _number(1, 86400), "Seconds to complete login."),
    Setting("timeouts.idle", "idle_timeout", _number(1, 86400), "Seconds without a command."),
    Setting(
        "timeouts.data_connect",
        "data_connect_timeout",
        _number(1, 3600),
        "Seconds to establish a data connection.",
    ),
    Setting(
        "timeouts.stall",
        "stall_timeout",
        _number(1, 86400),
        "Seconds a transfer may go without moving a byte.",
    ),
    Setting(
        "timeouts.control_send",
        "control_send_timeout",
        _number(1, 86400),
        "Seconds a control connection's peer may leave a full buffer of the gateway's "
        "replies or commands unread before the session ends with 421.",
    ),
    Setting(
        "timeouts.reply",
        "reply_timeout",
        _number(1, 86400),
        "Seconds to wait for any upstream reply before ending the transfer (426) or session (421).",
    ),
    Setting(
        "timeouts.shutdown",
        "shutdown_timeout",
        _number(0, 86400),
        "Seconds running transfers may finish after SIGTERM; keep below systemd's TimeoutStopSec.",
    ),
    Setting(
        "limits.max_line", "max_line", _integer(512, 65536), "Longest client command line, bytes."
    ),
    Setting(
        "limits.max_pending_commands",
        "max_pending_commands",
        _integer(1, 1000),
        "Pipelined client commands held while one is in progress.",
    ),
    Setting(
        "limits.max_reply_lines",
        "max_reply_lines",
        _integer(1, 100000),
        "Most lines in one upstream reply.",
    ),
    Setting(
        "limits.max_reply_bytes",
        "max_reply_bytes",
        _integer(1024, 16 * 1024 * 1024),
        "Largest upstream reply, bytes.",
    ),
    Setting("greeting", "greeting", _string, "Forward mode's 220 greeting text."),
    Setting(
        "tls.certificate",
        "tls_certificate",
        _optional_string,
        "PEM file with the gateway's certificate (leaf first, chain may follow, key may too).",
    ),
    Setting(
        "tls.private_key",
        "tls_private_key",
        _optional_string,
        "PEM file with the private key, if not in the certificate file.",
    ),
    Setting(
        "tls.client",
        "client_tls",
        _choice(*CLIENT_TLS_MODES),
        "Explicit FTPS for clients (AUTH TLS): off, optional or required.",
    ),
    Setting(
        "tls.min_version",
        "tls_min_version",
        _choice("1.2", "1.3"),
        "Lowest TLS version accepted on either side.",
    ),
    Setting(
        "tls.require_data_session_reuse",
        "require_data_session_reuse",
        _bool,
        "Refuse client data connections that do not resume the control connection's session.",
    ),
    Setting(
        "tls.upstream",
        "upstream_tls",
        _choice(*UPSTREAM_TLS_MODES),
        "FTPS towards the upstream: off, auto, required, implicit or match_client.",
    ),
    Setting(
        "tls.upstream_ca_file",
        "upstream_ca_file",
        _optional_string,
        "PEM CA certificates to verify upstreams with, instead of the system store.",
    ),
    Setting(
        "tls.upstream_fingerprint",
        "upstream_fingerprint",
        _fingerprint,
        "Pin the upstream certificate by SHA-256 fingerprint (reverse mode).",
    ),
    Setting(
        "tls.upstream_name",
        "upstream_tls_name",
        _optional_string,
        "Name to verify the upstream certificate against. Empty: the upstream host name.",
    ),
    Setting(
        "ldap.url",
        "ldap_url",
        _optional_string,
        "Directory for the ldap: checker: ldaps://HOST[:PORT], or ldap://HOST[:PORT] with "
        "ldap.starttls.",
    ),
    Setting(
        "ldap.starttls",
        "ldap_starttls",
        _bool,
        "Upgrade an ldap:// connection with StartTLS before binding (required for ldap://).",
    ),
    Setting(
        "ldap.ca_file",
        "ldap_ca_file",
        _optional_string,
        "PEM CA certificates to verify the directory with. Empty: the system store.",
    ),
    Setting(
        "ldap.user_dn_template",
        "ldap_user_dn_template",
        _optional_string,
        "Bind DN of a user, {user} standing for the escaped login name (no search).",
    ),
    Setting(
        "ldap.bind_dn",
        "ldap_bind_dn",
        _optional_string,
        "Search-then-bind: the service account that searches for users. Empty: anonymous.",
    ),
    Setting(
        "ldap.bind_password",
        "ldap_bind_password",
        _optional_string,
        "Password of ldap.bind_dn (or use ldap.bind_password_file).",
    ),
    Setting(
        "ldap.bind_password_file",
        "ldap_bind_password_file",
        _optional_string,
        "File holding the password of ldap.bind_dn (keeps it out of the configuration).",
    ),
    Setting(
        "ldap.base_dn",
        "ldap_base_dn",
        _optional_string,
        "Search-then-bind: where users are searched for (subtree).",
    ),
    Setting(
        "ldap.filter",
        "ldap_filter",
        _string,
        "Search-then-bind: filter finding one user, {user} standing for the escaped login name.",
    ),
    Setting(
        "ldap.require_group",
        "ldap_require_group",
        _optional_string,
        "DN of a groupOfNames whose member attribute must list the user. Empty: no check.",
    ),
    Setting(
        "ldap.timeout",
        "ldap_timeout",
        _number(0.5, 300),
        "Seconds for one LDAP login, from connect to the last answer.",
    ),
    Setting(
        "metrics.listen",
        "metrics_listen",
        _optional_string,
        "Twisted endpoint to serve Prometheus metrics on (/metrics). Empty: not served.",
    ),
    Setting(
        "log.level",
        "log_level",
        _choice(*LOG_LEVELS),
        "Least severe log level written: debug, info, warn or error.",
    ),
    Setting("log.format", "log_format", _choice(*LOG_FORMATS), "Log lines as text or json."),
    Setting(
        "log.transfer_log",
        "transfer_log",
        _optional_string,
        "File to append one xferlog(5) line per transfer to; reopened on SIGUSR1. Empty: none.",
    ),
)

_BY_KEY = {setting.key: setting for setting in SETTINGS}


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in _BY_KEY:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML configuration file into flat dotted keys."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    return _flatten(table)


def build(*layers: Mapping[str, Any]) -> Config:
    """Merge layers of dotted settings (later layers win) over the defaults and validate."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in _BY_KEY:
                raise ConfigError(f"{key}: unknown setting")
            merged[key] = value
    values: dict[str, Any] = {}
    upstream_tables: tuple[Rule, ...] = ()
    lists: dict[str, list[Rule]] = {"upstream_rules": [], "client_rules": []}
    for key, raw in merged.items():
        setting = _BY_KEY[key]
        parsed = setting.parse(key, raw)
        if key == "upstream_rules":
            upstream_tables = parsed
        elif setting.attr in lists:
            lists[setting.attr].extend(parsed)
        else:
            values[setting.attr] = parsed
    for attr, rules in lists.items():
        # Deny rules first, so an explicit deny inside an allowed network wins.
        rules.sort(key=lambda rule: rule.action != "deny")
        values[attr] = tuple(rules)
    # Ordered [[upstream_rules]] tables come first: there, the first match wins as written.
    values["upstream_rules"] = upstream_tables + values["upstream_rules"]
    config = Config(**values)
    if config.transparent and config.upstream is not None:
        raise ConfigError("transparent: the upstream comes from each connection; drop upstream")
    if config.transparent and config.passive_ports is None:
        # Clients connect for passive data to the server's address, on a port the gateway
        # chose: only a port range that the edge also redirects to the gateway reaches it.
        raise ConfigError(
            "transparent: needs data.passive_ports, a range the edge redirects to the gateway "
            "as it does the control port"
        )
    if config.proxy_auth and not config.forward:
        raise ConfigError("proxy_auth: proxy authentication applies to forward mode only")
    if config.upstream_proxy_protocol != "off" and config.upstream_tls == "implicit":
        # The header precedes everything, TLS too; implicit TLS starts with the first byte.
        raise ConfigError(
            "upstream_proxy_protocol: cannot be combined with tls.upstream = 'implicit'"
        )
    if config.client_tls == "required" and config.tls_certificate is None:
        raise ConfigError("tls.client: 'required' needs tls.certificate")
    if any(d.partition(":")[0] == "ldap" for d in config.proxy_auth):
        _check_ldap(config)
    return config


def _check_ldap(config: Config) -> None:
    """The [ldap] table must describe one way to find users, over TLS."""
    url = config.ldap_url
    if url is None:
        raise ConfigError("ldap.url: the ldap: checker needs the directory's URL")
    scheme = url.partition("://")[0].lower()
    if scheme == "ldap" and not config.ldap_starttls:
        # Passwords would cross the network in clear text.
        raise ConfigError("ldap.url: ldap:// needs starttls = true (or use ldaps://)")
    if scheme == "ldaps" and config.ldap_starttls:
        raise ConfigError("ldap.starttls: ldaps:// is already TLS; drop starttls")
    if scheme not in ("ldap", "ldaps"):
        raise ConfigError(f"ldap.url: expected ldaps:// or ldap://, got {url!r}")
    template, base = config.ldap_user_dn_template, config.ldap_base_dn
    if (template is None) == (base is None):
        raise ConfigError(
            "ldap: set either user_dn_template (bind with a DN) or base_dn (search, then bind)"
        )
    if template is not None and "{user}" not in template:
        raise ConfigError("ldap.user_dn_template: must contain {user}")
    if base is not None and "{user}" not in config.ldap_filter:
        raise ConfigError("ldap.filter: must contain {user}")
    if config.ldap_bind_password is not None and config.ldap_bind_password_file is not None:
        raise ConfigError("ldap.bind_password: set it or ldap.bind_password_file, not both")
    has_password = (config.ldap_bind_password or config.ldap_bind_password_file) is not None
    if has_password != (config.ldap_bind_dn is not None):
        raise ConfigError("ldap.bind_dn: the service account needs both a DN and a password")
