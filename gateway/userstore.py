"""User stores for proxy logins, the parts that need no network: htpasswd files with bcrypt and
argon2 hashes, and the escaping that keeps a user name from changing an LDAP filter or DN.

Only slow, salted password hashes are accepted. An htpasswd line with a fast or unsalted scheme
(crypt, MD5 `$apr1$`, SHA-1 `{SHA}`, plain text) is refused with the file and line number, so an
old file cannot silently keep weak hashes in service; `ftp-gateway passwd` (gateway/passwd.py)
or `htpasswd -B` rewrites such an entry.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import argon2
import bcrypt

#: bcrypt prefixes: `htpasswd -B` writes $2y$, the bcrypt library $2b$; $2a$ is the older name.
BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
ARGON2_PREFIXES = ("$argon2id$", "$argon2i$")
#: bcrypt reads at most 72 bytes of a password; htpasswd and Apache cut longer ones there.
BCRYPT_MAX_PASSWORD = 72
SCHEMES = ("bcrypt", "argon2")

_WEAK = (
    ("$apr1$", "MD5 ($apr1$) is fast to brute-force"),
    ("{SHA}", "unsalted SHA-1 ({SHA}) is fast to brute-force"),
    ("$1$", "MD5-crypt ($1$) is fast to brute-force"),
    ("$5$", "SHA-crypt ($5$) is not supported; use bcrypt or argon2"),
    ("$6$", "SHA-crypt ($6$) is not supported; use bcrypt or argon2"),
    ("$argon2d$", "argon2d is meant for other uses; use argon2id"),
)

# A bcrypt hash of a random password, checked when the user is unknown so that a missing user
# costs the same time as a wrong password (no user enumeration by timing).
_DUMMY_BCRYPT = b"$2b$12$00URBRhivgNVoPlG2yvY0.FoeWhwpg4ZfZlouxE5I29DdX3WQWJE2"
_ARGON2 = argon2.PasswordHasher()


class HtpasswdError(ValueError):
    """An htpasswd file cannot be used; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """Who a proxy login authenticated as: the avatar ID the user-store checkers return.

    `groups` holds the directory groups the login was found in (the LDAP `require_group` DN),
    for per-group routing; htpasswd users have none."""

    name: str
    groups: frozenset[str] = field(default=frozenset())


def _scheme_problem(hashed: str) -> str | None:
    """Why `hashed` cannot be used, or None for a bcrypt or argon2 hash."""
    if hashed.startswith(BCRYPT_PREFIXES):
        return None if len(hashed) == 60 else "a bcrypt hash has 60 characters"
    if hashed.startswith(ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(hashed)
        except argon2.exceptions.InvalidHashError:
            return "the argon2 hash is malformed"
        return None
    for prefix, reason in _WEAK:
        if hashed.startswith(prefix):
            return reason
    if len(hashed) == 13:
        return "DES crypt is fast to brute-force and reads only 8 characters"
    return "plain text or an unknown scheme; only bcrypt ($2y$) and argon2id are accepted"


def check_user_name(user: str) -> str | None:
    """Why `user` cannot be an htpasswd user name, or None."""
    if not user:
        return "the user name is empty"
    if ":" in user:
        return "a user name cannot contain ':'"
    if user.startswith("#"):
        return "a user name cannot start with '#' (the line would be a comment)"
    if any(c.isspace() or not c.isprintable() for c in user):
        return "a user name cannot contain spaces or control characters"
    return None


def parse_htpasswd(text: str, path: str) -> dict[str, str]:
    """`user:hash` lines (blank lines and `#` comments skipped) into {user: hash}.

    Raises HtpasswdError naming `path` and the line for a line that is not `user:hash`, a
    repeated user, or a hash that is not bcrypt or argon2."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, sep, hashed = stripped.partition(":")
        where = f"{path}:{number}"
        problem = "expected user:hash" if not sep else check_user_name(user)
        if problem is None and user in users:
            problem = f"user {user!r} appears twice"
        if problem is None:
            problem = _scheme_problem(hashed)
            if problem is not None:
                problem = f"user {user!r}: {problem}"
        if problem is not None:
            raise HtpasswdError(f"{where}: {problem}")
        users[user] = hashed
    return users


def read_htpasswd(path: str) -> dict[str, str]:
    """Read and parse an htpasswd file; HtpasswdError (one line) if it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise HtpasswdError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HtpasswdError(f"{path}: not UTF-8 (byte {e.start})") from None
    return parse_htpasswd(text, path)


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches a bcrypt or argon2 `hashed` (as parse_htpasswd accepted).
    Slow on purpose: call it off the reactor thread."""
    secret = password.encode("utf-8")
    if hashed.startswith(BCRYPT_PREFIXES):
        try:
            return bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD], hashed.encode("ascii"))
        except ValueError:
            return False
    if hashed.startswith(ARGON2_PREFIXES):
        try:
            return _ARGON2.verify(hashed, secret)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    return False


def verify_user(users: Mapping[str, str], user: str, password: str) -> bool:
    """Whether `user` is in `users` with `password`; an unknown user costs a full hash check
    too. An empty password never matches."""
    hashed = users.get(user)
    if hashed is None or not password:
        bcrypt.checkpw(b"not the password", _DUMMY_BCRYPT)
        return False
    return verify_password(hashed, password)


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A new salted hash of `password`: bcrypt (cost 12, `$2y$` as `htpasswd -B` writes, so
    Apache reads it too) or argon2id (argon2-cffi's recommended parameters)."""
    if not password:
        raise ValueError("the password is empty")
    secret = password.encode("utf-8")
    if scheme == "argon2":
        return _ARGON2.hash(secret)
    if scheme != "bcrypt":
        raise ValueError(f"unknown scheme {scheme!r}; expected bcrypt or argon2")
    if len(secret) > BCRYPT_MAX_PASSWORD:
        raise ValueError(
            f"bcrypt reads only {BCRYPT_MAX_PASSWORD} bytes of a password; use argon2 for longer"
        )
    hashed = bcrypt.hashpw(secret, bcrypt.gensalt(12)).decode("ascii")
    return "$2y$" + hashed[4:]


def set_password(path: str, user: str, hashed: str) -> bool:
    """Add `user` to the htpasswd file at `path`, or replace their hash; True if added.

    The file is replaced atomically (a reader sees the old or the new file, never half of one);
    a new file gets mode 0600, an existing one keeps its mode. Lines other than the user's stay
    as they are; the existing file must already parse."""
    problem = check_user_name(user)
    if problem is not None:
        raise HtpasswdError(f"{path}: {problem}")
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        text, mode = "", 0o600
    except (OSError, UnicodeDecodeError) as e:
        raise HtpasswdError(f"{path}: cannot read: {e}") from None
    parse_htpasswd(text, path)
    lines = text.splitlines()
    entry = f"{user}:{hashed}"
    added = True
    for index, line in enumerate(lines):
        if line.strip().partition(":")[0] == user and not line.strip().startswith("#"):
            lines[index] = entry
            added = False
    if added:
        lines.append(entry)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return added


# RFC 4515 section 3: in a filter's assertion value, '*', '(', ')', '\' and NUL are written as
# a backslash and two hex digits.
_FILTER_ESCAPES = {"*": "\\2a", "(": "\\28", ")": "\\29", "\\": "\\5c", "\0": "\\00"}


def escape_filter_value(value: str) -> str:
    """`value` as a literal LDAP filter assertion value (RFC 4515 section 3)."""
    return "".join(_FILTER_ESCAPES.get(c, c) for c in value)


def escape_dn_value(value: str) -> str:
    """`value` as a literal attribute value in a DN string (RFC 4514 section 2.4): '"', '+',
    ',', ';', '<', '>' and '\\' get a backslash, as do a leading space or '#' and a trailing
    space; NUL becomes \\00."""
    out = []
    for index, c in enumerate(value):
        if c == "\0":
            out.append("\\00")
        elif (
            c in '"+,;<>\\' or (index == 0 and c in " #") or (index == len(value) - 1 and c == " ")
        ):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)
