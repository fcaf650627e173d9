"""Command-line options and service construction for `twistd ftp-gateway` and `ftp-gateway`."""

from __future__ import annotations

import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from operator import attrgetter
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage

from gateway import __version__, capacity, splice, startup
from gateway.config import SETTINGS, Config, ConfigError, Setting, with_setting
from gateway.control import GatewayFactory
from gateway.events import Event
from gateway.health import HealthChecks
from gateway.listeners import report_bound
from gateway.logs import LogService, MainLog, check_transfer_log, install_main_observer
from gateway.logtext import escape_event
from gateway.metrics import MetricsService
from gateway.shutdown import GracefulShutdown
from gateway.tls import TLSConfigError

_log = Logger(namespace="gateway.config")


#: The settings the command line can set, as `Config` declares them (`option=`): a flag for a
#: true-or-false setting, a repeatable option for a list, an option with a value otherwise.
_OPTIONS = tuple(setting for setting in SETTINGS if setting.option)
_FLAGS = tuple(setting for setting in _OPTIONS if setting.type == "bool")
_REPEATABLE = tuple(setting for setting in _OPTIONS if setting.type.endswith(", ...]"))
_VALUES = tuple(s for s in _OPTIONS if s not in _FLAGS and s not in _REPEATABLE)
_SHORT = {"upstream": "u"}


def _help(setting: Setting) -> str:
    """An option's --help text: its setting's help, its default and the setting's key."""
    text = setting.help + (" Repeatable." if setting in _REPEATABLE else "")
    default = setting.default
    if isinstance(default, tuple) and default and all(isinstance(d, str) for d in default):
        text += f" Default: {', '.join(default)}."
    elif isinstance(default, str):
        text += f" Default: {default}."
    return f"{text} (setting {setting.key})"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An FTP proxy gateway. With --upstream it is a reverse proxy for one server; without, "
        "clients choose the server with USER name@host[:port] (forward mode). Options override "
        "the configuration file; see etc/ftp-gateway.toml for every setting. twistd's own "
        "--logfile=, --pidfile=, --syslog, --uid=, --gid=, --umask=, --prefix= and --reactor= "
        "may be mixed in (write them with '='). To add a proxy user to an htpasswd file or change "
        "a password: ftp-gateway passwd FILE USER (see ftp-gateway passwd --help)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        *([s.option, _SHORT.get(s.option), None, _help(s)] for s in _VALUES),
    ]
    optFlags = [
        ["demo", None, "Also start a sample upstream FTP server on loopback and proxy to it."],
        *([s.option, None, _help(s)] for s in _FLAGS),
        [
            "check-config",
            None,
            "Check the configuration as start-up does (settings, certificates, cred checkers, "
            "endpoints), print one line per problem and exit: 0 if none, 2 otherwise.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for setting in _REPEATABLE:
            self[setting.option] = []

    def getSynopsis(self) -> str:
        if self.parent is None:
            return "Usage: ftp-gateway [options]"
        return super().getSynopsis()

    def opt_version(self) -> None:
        """Print ftp-gateway's version and exit."""
        print(f"ftp-gateway {__version__}")
        raise SystemExit(0)

    def overrides(self) -> dict[str, Any]:
        """The settings given on the command line, as dotted configuration keys."""
        values: dict[str, Any] = {}
        for setting in _OPTIONS:
            value = self[setting.option]
            if setting in _FLAGS:
                value = True if value else None
            if value not in (None, []):
                values[setting.key] = value
        return values

    def postOptions(self) -> None:
        config, problems = self.check()
        for problem in problems:
            # One line per problem naming the setting, not a usage dump or a traceback.
            print(f"ftp-gateway: configuration error: {problem}", file=sys.stderr)
        if problems:
            raise SystemExit(2)
        assert config is not None
        if self["demo"] and config.reverse:
            print(
                "ftp-gateway: --demo starts its own upstream; drop --upstream and backends",
                file=sys.stderr,
            )
            raise SystemExit(2)
        if self["check-config"]:
            print(f"ftp-gateway: configuration OK ({self['config'] or 'no configuration file'})")
            raise SystemExit(0)
        self.config: Config = config

    def check(self) -> tuple[Config | None, list[str]]:
        """Read the configuration file (again), apply the command line over it and check
        what can only be checked by trying: cred checkers, the certificate, the endpoints,
        the masquerade name. Returns the config and one line per problem."""
        from twisted.internet import reactor

        config, problems = startup.check(
            self["config"], self.overrides(), reactor, dry_run=bool(self["check-config"])
        )
        if config is None:
            return config, problems
        # These too, beside the problems found so far: one line per problem, all at once.
        if config.data.relay == "splice" and not splice.available():
            problems.append("data.relay: splice needs Linux (splice(2)); use auto or copy")
        try:
            check_transfer_log(config.log.transfer_log)
        except ConfigError as e:
            problems.append(str(e))
        try:
            config = resolve_masquerade(config)
        except ConfigError as e:
            problems.append(str(e))
        return config, problems

    def load(self) -> Config:
        """The checked configuration; raises ConfigError naming the first problem."""
        config, problems = self.check()
        if problems or config is None:
            raise ConfigError(problems[0])
        return config


def resolve_masquerade(config: Config) -> Config:
    """A masquerade host name becomes its IPv4 address at start and on each reload: 227 replies
    need an address, and resolving per session would let DNS changes half-apply."""
    name = config.data.masquerade_address
    if name is None or _is_ipv4(name):
        return config
    try:
        address = socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except OSError as e:
        raise ConfigError(f"data.masquerade_address: cannot resolve {name}: {e}") from None
    return replace(config, data=replace(config.data, masquerade_address=str(address)))


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return text.count(".") == 3


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options.config
    # Ahead of every log file: peer text is escaped in each event before any observer that
    # writes it runs (twistd adds its log observers after this, when logging begins).
    globalLogPublisher.addObserver(escape_event)
    # twistd's own options (--logfile, --syslog, ...) name where the main log goes.
    main_log = MainLog(config, getattr(options, "parent", None))
    top = _Application(main_log)
    LogService(main_log, config.log.transfer_log, reactor).setServiceParent(top)
    demo_upstream = None
    if options["demo"]:
        from gateway.demo import DemoUpstream

        demo = DemoUpstream()
        demo.setServiceParent(top)
        demo_upstream = ("127.0.0.1", demo.port)
        config = replace(config, upstream=demo_upstream)
    # First, so its observer counts the events of everything started after it.
    MetricsService(config.metrics.listen, reactor).setServiceParent(top)
    raise_open_files(config)
    factory = GatewayFactory(config, reactor)
    # Before the listeners: services stop in reverse order, so they stop accepting first.
    GracefulShutdown(factory, config.timeouts.shutdown, reactor).setServiceParent(top.sessions)
    backlog = capacity.backlog_for(_somaxconn())
    line = startup.describe(config, options["config"])
    for endpoint in config.listen:
        listener = startup.Listener(
            "listen",
            capacity.with_backlog(endpoint, backlog),
            factory,
            reactor,
            line,
            header_timeout=config.timeouts.login,
        )
        listener.description = endpoint  # start-up lines name the endpoint as configured
        report_bound(listener, factory.add_listener)
        listener.setServiceParent(top.sessions)
    top.sessions.setServiceParent(top)

    def load() -> Config:
        fresh = options.load()
        return fresh if demo_upstream is None else replace(fresh, upstream=demo_upstream)

    ReloadOnHangup(factory, load, reactor).setServiceParent(top)
    HealthChecks(factory.balancer, reactor).setServiceParent(top)
    return top


def _somaxconn() -> int | None:
    """The kernel's cap on listen backlogs (Linux), or None where it cannot be read."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def raise_open_files(config: Config) -> int:
    """Raise the soft RLIMIT_NOFILE to `limits.max_open_files` (0: the hard limit), log the
    figure, and warn in one line when it cannot hold `limits.max_sessions` sessions. Many
    systems start services with a soft limit of 1024, about 240 sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = capacity.open_files_target(soft, hard, config.limits.max_open_files)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            _log.warn(
                "Cannot set the open files limit to {target}: {e}",
                target=target,
                e=str(e),
                event=Event.OPEN_FILES_LIMIT,
            )
    _log.info(
        "Open files limit: {limit} (hard limit {hard})",
        limit=soft,
        hard=hard,
        event=Event.OPEN_FILES_LIMIT,
    )
    supported = capacity.sessions_supported(soft)
    if supported < config.limits.max_sessions:
        _log.warn(
            "limits.max_sessions is {sessions} but {limit} open files hold about {supported} "
            "sessions; raise the hard limit (LimitNOFILE=) or lower max_sessions",
            sessions=config.limits.max_sessions,
            limit=soft,
            supported=supported,
            event=Event.OPEN_FILES_LIMIT,
        )
    return soft


class _Application(MultiService):
    """The gateway's top service; attached to twistd's application, it brings the main log
    observer with it (twistd asks the application for one before building its own).

    It stops in two steps: first `sessions` (the listeners, and the graceful shutdown that
    waits for running transfers), then everything else, so the logs, the transfer log, the
    metrics and the --demo upstream keep serving those transfers to their end.
    """

    def __init__(self, main_log: MainLog) -> None:
        super().__init__()
        self.main_log = main_log
        self.sessions = MultiService()

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        first: Deferred[Any] = maybeDeferred(self.sessions.stopService)

        def the_rest(_: object) -> Deferred[Any]:
            others = [service for service in reversed(list(self)) if service is not self.sessions]
            return DeferredList([maybeDeferred(service.stopService) for service in others])

        return first.addBoth(the_rest)

    def setServiceParent(self, parent: Any) -> Any:
        install_main_observer(parent, self.main_log)
        return super().setServiceParent(parent)


def _collect(setting: Setting) -> Callable[[Options, str], None]:
    """The handler of a repeatable option: each use adds one value."""

    def collect(self: Options, value: str) -> None:
        self[setting.option].append(value)

    collect.__doc__ = _help(setting)
    return collect


for _setting in _REPEATABLE:
    assert _setting.option is not None
    setattr(Options, "opt_" + _setting.option.replace("-", "_"), _collect(_setting))


#: Settings bound at start (listeners, log files): a reload keeps their running values.
_RESTART_ONLY = (
    "listen",
    "metrics.listen",
    "log.level",
    "log.format",
    "log.transfer_log",
)


class ReloadOnHangup(Service):
    """SIGHUP re-reads the configuration; new sessions use it, running sessions keep theirs.

    A configuration that does not load is logged and the running one stays. Listeners are
    bound once, at start: a change to `listen` is logged and needs a restart.
    """

    def __init__(self, factory: GatewayFactory, load: Callable[[], Config], reactor: Any):
        self.factory = factory
        self.load = load
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes; do the work in the reactor's own turn.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        try:
            config = self.load()
        except (ConfigError, TLSConfigError) as e:
            _log.error(
                "Reload failed, keeping the running configuration: {error}",
                error=str(e),
                event=Event.CONFIG_RELOADED,
                result="failed",
            )
            return
        running = self.factory.config
        for key in _RESTART_ONLY:
            if attrgetter(key)(config) != attrgetter(key)(running):
                _log.warn(
                    "Reload: {setting} changes only on restart",
                    setting=key,
                    event=Event.RELOAD_NEEDS_RESTART,
                )
                config = with_setting(config, key, attrgetter(key)(running))
        self.factory.reconfigure(config)
        _log.info("Configuration reloaded", event=Event.CONFIG_RELOADED, result="ok")
