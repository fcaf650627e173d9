"""`ftp-gateway passwd [--stdin] [--scheme bcrypt|argon2] FILE USER`: add a user to an htpasswd
file for the `htpasswd:FILE` proxy_auth checker, or change their password.

The password is asked for twice on the terminal (never echoed), or read as one line from
standard input with --stdin, for scripts. The file is created with mode 0600 and replaced
atomically, so a running gateway reads either the old or the new file at the next login.
bcrypt (the default) writes `$2y$` hashes as `htpasswd -B` does, so Apache reads the same
file; argon2 writes argon2id hashes and takes passwords longer than bcrypt's 72 bytes.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from gateway.userstore import SCHEMES, HtpasswdError, hash_password, set_password


class NoTerminal(Exception):
    """No terminal to ask for the password on, and no --stdin."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftp-gateway passwd",
        description="Add a proxy user to an htpasswd file, or change their password.",
    )
    parser.add_argument("file", help="htpasswd file (created with mode 0600 if missing)")
    parser.add_argument("user", help="proxy user name")
    parser.add_argument(
        "--stdin", action="store_true", help="read the password from standard input (one line)"
    )
    parser.add_argument(
        "--scheme", choices=SCHEMES, default="bcrypt", help="hash to write (default: bcrypt)"
    )
    return parser


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    try:
        # getpass asks on the controlling terminal; without one it would read standard input
        # with a warning that the password may be echoed.
        with open("/dev/tty", "rb"):
            pass
    except OSError:
        raise NoTerminal() from None
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Repeat the password: ")
    if first != second:
        raise ValueError("the passwords do not match")
    return first


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    try:
        password = _read_password(options.stdin)
        hashed = hash_password(password, options.scheme)
        added = set_password(options.file, options.user, hashed)
    except (ValueError, OSError) as e:
        # HtpasswdError is a ValueError; its message already names the file (and line).
        prefix = "" if isinstance(e, HtpasswdError) else f"{options.file}: "
        print(f"ftp-gateway passwd: {prefix}{e}", file=sys.stderr)
        return 1
    except NoTerminal:
        print(
            "ftp-gateway passwd: no terminal to ask for the password on; "
            "use --stdin to read it from standard input",
            file=sys.stderr,
        )
        return 1
    except (EOFError, KeyboardInterrupt):
        print("ftp-gateway passwd: no password given", file=sys.stderr)
        return 1
    verb = "Added" if added else "Updated"
    print(f"{verb} {options.user} in {options.file} ({options.scheme})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
