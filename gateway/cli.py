"""`ftp-gateway [options]`: the twistd service in the foreground, without a pid file.

Options for twistd itself (`--logfile=`, `--pidfile=`, `--syslog`, `--uid=`, `--gid=`,
`--umask=`, `--prefix=`, `--reactor=`) may be mixed in; they are handed to twistd, the rest to
the gateway. Unlike `twistd ftp-gateway`, this command speaks as ftp-gateway: its own usage
text, version and a one-line answer to a bad flag or a failed start (exit status 2).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application.service import ServiceMaker
from twisted.logger import Logger
from twisted.python import usage
from twisted.scripts import twistd

from gateway.events import Event
from gateway.startup import StartupError
from gateway.tap import Options

_TWISTD_OPTIONS = (
    "--logfile=",
    "--pidfile=",
    "--uid=",
    "--gid=",
    "--umask=",
    "--syslog",
    "--prefix=",
    "--reactor=",
)

_log = Logger(namespace="gateway.startup")
_MAKER = ServiceMaker(
    "ftp-gateway", "gateway.tap", "An FTP proxy gateway (forward and reverse).", "ftp-gateway"
)


class _ServerOptions(twistd.ServerOptions):  # type: ignore[misc]
    """twistd's options knowing only the gateway, so the command line does not iterate every
    installed twistd plugin to find it."""

    subCommands: Any = ()
    loadedPlugins = {"ftp-gateway": _MAKER}


def _usage_error(error: Exception) -> NoReturn:
    print(f"ftp-gateway: {error}", file=sys.stderr)
    print("Try 'ftp-gateway --help' for the options.", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["passwd"]:
        # `ftp-gateway passwd FILE USER`: manage an htpasswd file (gateway/passwd.py).
        from gateway import passwd

        raise SystemExit(passwd.main(args[1:]))
    own = [arg for arg in args if not arg.startswith(_TWISTD_OPTIONS)]
    passed = [arg for arg in args if arg.startswith(_TWISTD_OPTIONS)]
    options = Options()
    try:
        # --help, --version and --check-config end here, as does a configuration problem.
        options.parseOptions(own)
    except usage.UsageError as e:
        _usage_error(e)
    server = _ServerOptions()
    try:
        # --no_save: twistd saves only applications it did not build from a subcommand.
        server.parseOptions(["--nodaemon", "--pidfile=", "--no_save", *passed])
    except usage.UsageError as e:
        _usage_error(e)
    server.subCommand = "ftp-gateway"
    server.subOptions = options
    # As twistd's own parsing would: the service reads --logfile/--syslog from its parent.
    options.parent = server
    try:
        twistd.runApp(server)
    except StartupError as e:
        # The terminal or the journal gets the line on standard error; a log file or syslog
        # (where twistd's log goes instead of standard output) gets it too.
        print(f"ftp-gateway: {e}", file=sys.__stderr__)
        if server["logfile"] or server["syslog"]:
            _log.critical("Cannot start: {error}", error=str(e), event=Event.STARTUP_FAILED)
        raise SystemExit(2) from None
    raise SystemExit(0)
