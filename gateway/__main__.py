"""`ftp-gateway [options]`: the twistd service in the foreground, without a pid file.

Options for twistd itself (`--logfile=`, `--uid=`, `--gid=`, `--umask=`, `--syslog`,
`--prefix=`, `--reactor=`) may be mixed in; they are handed to twistd, the rest to the gateway.
"""

from __future__ import annotations

import sys

from twisted.scripts.twistd import run

_TWISTD_OPTIONS = (
    "--logfile=",
    "--uid=",
    "--gid=",
    "--umask=",
    "--syslog",
    "--prefix=",
    "--reactor=",
)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["passwd"]:
        # `ftp-gateway passwd FILE USER`: manage an htpasswd file (gateway/passwd.py).
        from gateway import passwd

        raise SystemExit(passwd.main(args[1:]))
    twistd = [arg for arg in args if arg.startswith(_TWISTD_OPTIONS)]
    own = [arg for arg in args if not arg.startswith(_TWISTD_OPTIONS)]
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", *twistd, "ftp-gateway", *own]
    run()


if __name__ == "__main__":
    main()
