"""Start-up checks and start-up lines: what `--check-config` and every start verify.

An administrator's mistake at start (a mistyped endpoint, a port in use, an unreadable
certificate, a missing users file) must end in one line naming the setting and the cause, and
exit status 2, never a traceback. `check` tries everything that can be tried without binding a
port; `Listener` turns a failed bind into `StartupError`, which the command line prints as one
line. `describe` is the line each listener logs once it listens, so the log says what runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from gateway import __version__, proxyproto
from gateway.checkers import make_checker
from gateway.config import SETTINGS, Config, ConfigError, build, load_file
from gateway.events import Event
from gateway.tls import TLSConfigError, server_options

_log = Logger(namespace="gateway.startup")
_SETTINGS = {setting.key: setting for setting in SETTINGS}
# tcp:PORT:interface=::1 : an IPv6 address with its colons unescaped.
_UNESCAPED_IPV6 = re.compile(r"interface=[0-9A-Fa-f]*:(?!\\)")


class StartupError(Exception):
    """The gateway cannot start; the message is one line naming the setting and the cause."""


def check(
    config_file: str | None, overrides: Mapping[str, Any], reactor: Any, *, dry_run: bool = False
) -> tuple[Config | None, list[str]]:
    """Validate the configuration as start-up does, short of binding ports. Returns the config
    (None if it cannot be built) and one line per problem found. `dry_run` (--check-config)
    accepts `systemd:` listeners without the sockets that only systemd's start passes."""
    try:
        layers = [load_file(config_file)] if config_file else []
    except ConfigError as e:
        return None, [str(e)]
    layers.append(dict(overrides))
    # Each setting alone first, so every bad value is reported, not only the first.
    problems = [problem for layer in layers for problem in _setting_problems(layer)]
    if problems:
        return None, problems
    try:
        config = build(*layers)
    except ConfigError as e:
        return None, [str(e)]
    problems += _checker_problems(config, reactor)
    if config.tls.certificate is not None:
        try:
            server_options(config.tls.certificate, config.tls.private_key, config.tls.min_version)
        except TLSConfigError as e:
            problems.append(f"tls.certificate: {e}")
    return config, problems + _endpoint_problems(config, reactor, dry_run=dry_run)


def _setting_problems(layer: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for key, value in layer.items():
        setting = _SETTINGS.get(key)
        try:
            if setting is None:
                raise ConfigError(f"{key}: unknown setting")
            setting.parse(key, value)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def _checker_problems(config: Config, reactor: Any) -> list[str]:
    problems: list[str] = []
    for description in config.proxy_auth:
        kind, _, argument = description.partition(":")
        if kind == "file":
            # Twisted's file checker only prints a warning for a missing file, then refuses
            # every login: a users file that cannot be read must stop the start instead.
            try:
                with open(argument, "rb"):
                    pass
            except OSError as e:
                problems.append(f"proxy_auth: cannot read the users file {argument}: {e.strerror}")
                continue
        try:
            make_checker(description, config, reactor)
        except ConfigError as e:
            problems.append(str(e))
        except Exception as e:
            problems.append(f"proxy_auth: cannot use the {kind!r} twisted.cred checker: {e}")
    return problems


def _endpoint_problems(config: Config, reactor: Any, *, dry_run: bool) -> list[str]:
    endpoints = [("listen", endpoint) for endpoint in config.listen]
    if config.metrics.listen:
        endpoints.append(("metrics.listen", config.metrics.listen))
    problems: list[str] = []
    for setting_key, description in endpoints:
        if dry_run and description.lower().startswith("systemd:"):
            continue
        problem = endpoint_problem(setting_key, description, reactor)
        if problem is not None:
            problems.append(problem)
    return problems


def endpoint_problem(setting: str, description: str, reactor: Any) -> str | None:
    """Parse a Twisted server endpoint string as start-up will; None if it parses."""
    if _UNESCAPED_IPV6.search(description):
        return (
            f"{setting}: {description!r}: escape each ':' of an IPv6 address with a backslash, "
            'e.g. tcp6:2121:interface=\\:\\:1 (in TOML: "tcp6:2121:interface=\\\\:\\\\:1")'
        )
    try:
        serverFromString(reactor, description)
    except Exception as e:
        if description.lower().startswith("systemd:") and isinstance(e, IndexError | KeyError):
            # Twisted reads the inherited sockets (LISTEN_FDS, LISTEN_FDNAMES) once, at import.
            return (
                f"{setting}: {description!r}: systemd passed no such socket; start the "
                "gateway through its .socket unit"
            )
        return f"{setting}: {description!r}: {_cause(e)}"
    return None


def _cause(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    socket_error = getattr(error, "socketError", None)
    if socket_error is not None:
        text = getattr(socket_error, "strerror", None) or str(socket_error)
    return text.splitlines()[0].rstrip(".")


class Listener(StreamServerEndpointService):
    """A listening endpoint whose failure to bind is one line naming its setting, and which
    logs what it serves once it listens. A `haproxy:` endpoint waits up to `header_timeout`
    seconds for each connection's PROXY header before the factory sees it."""

    def __init__(
        self,
        setting: str,
        description: str,
        factory: IProtocolFactory,
        reactor: Any,
        line: str,
        header_timeout: float = 60.0,
    ) -> None:
        proxied, inner = proxyproto.split_endpoint(description)
        try:
            endpoint = serverFromString(reactor, inner)
        except Exception as e:
            raise StartupError(f"{setting}: {description!r}: {_cause(e)}") from None
        if proxied:
            # Our own wrapper, not Twisted's haproxy: endpoint: the session starts only once
            # the PROXY header has named the client (see gateway/proxyproto.py).
            factory = proxyproto.ProxyHeaderFactory(factory, reactor, header_timeout)
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.setting = setting
        self.description = description
        self.line = line

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(
                f"{self.setting}: cannot listen on {self.description}: {_cause(e)}"
            ) from None
        _log.info(
            "Listening on {endpoint}: {summary}",
            endpoint=self.description,
            summary=self.line,
            event=Event.LISTENING,
        )


def describe(config: Config, config_file: str | None) -> str:
    """One line saying what a listener serves: mode, where sessions go, TLS, version, file."""
    if config.transparent:
        mode = "transparent mode, to each connection's original destination"
    elif config.backends:
        names = ", ".join(backend.name for backend in config.backends)
        mode = f"reverse mode, backends {names} ({config.balance})"
        if config.routes:
            mode += f", {len(config.routes)} routes"
    elif config.upstream is not None:
        host, port = config.upstream
        shown = f"[{host}]" if ":" in host else host
        mode = f"reverse mode, upstream {shown}:{port}"
    else:
        mode = "forward mode, USER name@host chooses the upstream"
    if not config.forward and config.reverse:
        policy = ""
    else:
        allowed = sum(rule.action == "allow" for rule in config.upstream_policy_rules)
        denied = len(config.upstream_policy_rules) - allowed
        policy = (
            f", upstream policy: {allowed} allow / {denied} deny rules "
            "over the default (public addresses only)"
        )
    client_tls = config.tls.client if config.client_tls_available else "off"
    tls = f"TLS to clients {client_tls}, to upstreams {config.tls.upstream}"
    where = f"configuration file {config_file}" if config_file else "no configuration file"
    return f"{mode}{policy}; {tls}; ftp-gateway {__version__}; {where}"
