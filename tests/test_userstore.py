"""User stores without a network: htpasswd files as Apache's `htpasswd` writes them (bcrypt) and
as `ftp-gateway passwd` writes them (bcrypt, argon2), refusal of weak schemes with the line, the
`ftp-gateway passwd` command, and RFC 4514/4515 escaping of user names for LDAP."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import pytest
from gateway_process import PROJECT

from gateway.config import ConfigError, build
from gateway.userstore import (
    HtpasswdError,
    escape_dn_value,
    escape_filter_value,
    hash_password,
    parse_htpasswd,
    read_htpasswd,
    set_password,
    verify_user,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from ldaptor import ldapfilter


def htpasswd(*args: str) -> str:
    """Apache's htpasswd (apache2-utils); a missing binary fails the test."""
    result = subprocess.run(["htpasswd", *args], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def passwd(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "passwd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_reads_bcrypt_entries_written_by_htpasswd(tmp_path: Path) -> None:
    path = tmp_path / "users"
    htpasswd("-B", "-c", "-b", str(path), "alice", "alice-pw")
    htpasswd("-B", "-b", str(path), "bob", "bob-pw")
    users = read_htpasswd(str(path))
    assert users["alice"].startswith("$2y$")
    assert verify_user(users, "alice", "alice-pw")
    assert verify_user(users, "bob", "bob-pw")
    assert not verify_user(users, "alice", "bob-pw")
    assert not verify_user(users, "carol", "alice-pw")
    assert not verify_user(users, "alice", "")


def test_argon2_and_bcrypt_hashes_of_our_own() -> None:
    users = {"a": hash_password("pw-a", "argon2"), "b": hash_password("pw-b")}
    assert users["a"].startswith("$argon2id$")
    assert users["b"].startswith("$2y$12$")
    text = "".join(f"{user}:{hashed}\n" for user, hashed in users.items())
    assert parse_htpasswd(text, "users") == users
    assert verify_user(users, "a", "pw-a") and not verify_user(users, "a", "pw-b")
    assert verify_user(users, "b", "pw-b") and not verify_user(users, "b", "pw-a")


def test_long_passwords_match_as_htpasswd_cuts_them() -> None:
    hashed = htpasswd("-nbB", "u", "x" * 72).strip().split(":", 1)[1]
    assert verify_user({"u": hashed}, "u", "x" * 80)  # bcrypt reads 72 bytes, as Apache does
    with pytest.raises(ValueError, match="72 bytes"):
        hash_password("x" * 73)
    assert verify_user({"u": hash_password("y" * 100, "argon2")}, "u", "y" * 100)


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        ("-m", r"MD5 \(\$apr1\$\)"),
        ("-s", r"unsalted SHA-1"),
        ("-d", r"DES crypt"),
        ("-p", r"plain text or an unknown scheme"),
    ],
)
def test_weak_schemes_are_refused_with_file_and_line(
    tmp_path: Path, flag: str, reason: str
) -> None:
    path = tmp_path / "users"
    htpasswd("-B", "-c", "-b", str(path), "good", "pw")
    with path.open("a") as f:
        f.write("# a comment\n\n")
    htpasswd(flag, "-b", str(path), "weak", "pw")
    with pytest.raises(HtpasswdError, match=rf"^{path}:4: user 'weak': {reason}"):
        read_htpasswd(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no colon here\n", "users:1: expected user:hash"),
        (":$2y$05$" + "a" * 53 + "\n", "users:1: the user name is empty"),
        ("u:$2y$05$short\n", "users:1: user 'u': a bcrypt hash has 60 characters"),
        ("u:$argon2id$nonsense\n", "users:1: user 'u': the argon2 hash is malformed"),
        ("u:$argon2d$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g\n", "argon2d"),
        ("u:$6$salt$hash\n", "SHA-crypt"),
    ],
)
def test_unusable_lines_are_refused(text: str, message: str) -> None:
    with pytest.raises(HtpasswdError, match=message.replace("$", r"\$")):
        parse_htpasswd(text, "users")


def test_a_user_listed_twice_is_refused() -> None:
    hashed = hash_password("pw")
    with pytest.raises(HtpasswdError, match="users:2: user 'u' appears twice"):
        parse_htpasswd(f"u:{hashed}\nu:{hashed}\n", "users")


def test_passwd_command_creates_a_private_file_apache_can_verify(tmp_path: Path) -> None:
    path = tmp_path / "users"
    result = passwd(str(path), "alice", "--stdin", stdin="alice-pw\n")
    assert result.returncode == 0, result.stderr
    assert "Added alice" in result.stdout
    assert path.stat().st_mode & 0o777 == 0o600
    htpasswd("-v", "-b", str(path), "alice", "alice-pw")  # Apache's own check of our hash
    result = passwd(str(path), "bob", "--stdin", "--scheme", "argon2", stdin="bob-pw\n")
    assert result.returncode == 0, result.stderr
    users = read_htpasswd(str(path))
    assert verify_user(users, "bob", "bob-pw") and users["bob"].startswith("$argon2id$")
    # Changing a password replaces the line and keeps the others and the file's mode.
    path.chmod(0o640)
    result = passwd(str(path), "alice", "--stdin", stdin="new-pw\n")
    assert "Updated alice" in result.stdout
    users = read_htpasswd(str(path))
    assert verify_user(users, "alice", "new-pw") and not verify_user(users, "alice", "alice-pw")
    assert verify_user(users, "bob", "bob-pw")
    assert path.stat().st_mode & 0o777 == 0o640
    assert "new-pw" not in path.read_text()


def test_passwd_command_refuses_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "users"
    result = passwd(str(path), "alice", "--stdin", stdin="\n")
    assert result.returncode == 1 and "the password is empty" in result.stderr
    result = passwd(str(path), "a:b", "--stdin", stdin="pw\n")
    assert result.returncode == 1 and "cannot contain ':'" in result.stderr
    assert not path.exists()
    # The file's reader skips lines starting with '#': such a user could never log in.
    result = passwd(str(path), "#ops", "--stdin", stdin="pw\n")
    assert result.returncode == 1 and "cannot start with '#'" in result.stderr
    assert not path.exists()
    # Without a terminal and without --stdin: say so, not a GetPassWarning.
    result = passwd(str(path), "alice", stdin="")
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "ftp-gateway passwd: no terminal to ask for the password on; "
        "use --stdin to read it from standard input\n"
    )
    assert not path.exists()
    path.write_text("old:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    result = passwd(str(path), "alice", "--stdin", stdin="pw\n")
    assert result.returncode == 1 and f"{path}:1: user 'old'" in result.stderr
    assert "alice" not in path.read_text()  # a file with weak entries is not touched


def test_set_password_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# proxy users\nbob:{hash_password('b')}\n")
    assert set_password(str(path), "alice", hash_password("a"))
    assert path.read_text().startswith("# proxy users\nbob:")


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("alice", "alice"),
        ("*", "\\2a"),
        ("a*)(uid=*", "a\\2a\\29\\28uid=\\2a"),
        ("back\\slash", "back\\5cslash"),
        ("nul\0", "nul\\00"),
        ("o'brien, jr", "o'brien, jr"),
    ],
)
def test_filter_values_are_escaped_per_rfc4515(value: str, escaped: str) -> None:
    assert escape_filter_value(value) == escaped
    # ldaptor reads the escaped value back as exactly the literal name: one equality match.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = ldapfilter.parseFilter(f"(uid={escaped})")
    assert type(parsed).__name__ == "LDAPFilter_equalityMatch"
    assert parsed.assertionValue.value == value


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("alice", "alice"),
        ("o'brien, jr", "o'brien\\, jr"),
        ("a+b", "a\\+b"),
        ("x,ou=admins", "x\\,ou=admins"),
        ('q"<>;\\', 'q\\"\\<\\>\\;\\\\'),
        ("#lead", "\\#lead"),
        (" both ", "\\ both\\ "),
        ("mid#dle", "mid#dle"),
        ("nul\0", "nul\\00"),
    ],
)
def test_dn_values_are_escaped_per_rfc4514(value: str, escaped: str) -> None:
    assert escape_dn_value(value) == escaped


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({}, "ldap.url: the ldap: checker needs"),
        ({"ldap.url": "ldap://dir.example"}, "ldap.url: ldap:// needs starttls = true"),
        ({"ldap.url": "ldaps://d", "ldap.starttls": True}, "ldap.starttls: ldaps:// is already"),
        ({"ldap.url": "ldaps://d"}, "ldap: set either user_dn_template"),
        (
            {"ldap.url": "ldaps://d", "ldap.user_dn_template": "x", "ldap.base_dn": "y"},
            "ldap: set either",
        ),
        ({"ldap.url": "ldaps://d", "ldap.user_dn_template": "uid=x"}, "must contain {user}"),
        (
            {"ldap.url": "ldaps://d", "ldap.base_dn": "dc=x", "ldap.bind_dn": "cn=s"},
            "ldap.bind_dn: the service account needs both",
        ),
    ],
)
def test_ldap_settings_are_checked(layer: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", "\\{").replace("}", "\\}")):
        build({"proxy_auth": ["ldap:"], **layer})


def _prompted(path: Path, answers: list[str]) -> tuple[int, str]:
    """Run `ftp-gateway passwd FILE alice` on a pseudo-terminal (its controlling terminal, as
    getpass wants), typing `answers` at its prompts; its exit status and what it printed."""
    primary, secondary = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(secondary, termios.TIOCSCTTY, 0)

    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "passwd", str(path), "alice"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
        preexec_fn=controlling_terminal,
    )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 60
    answered = 0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        # Answer each prompt once it is shown in full (getpass turned echo off before it).
        shown = output.count(b"password: ")
        if answered < min(shown, len(answers)) and output.endswith(b"password: "):
            os.write(primary, answers[answered].encode() + b"\n")
            answered += 1
    os.close(primary)
    return proc.wait(timeout=30), output.decode(errors="replace")


def test_passwd_command_asks_twice_without_echo(tmp_path: Path) -> None:
    path = tmp_path / "users"
    status, output = _prompted(path, ["typed-pw", "typed-pw"])
    assert status == 0, output
    assert "New password:" in output and "Repeat the password:" in output
    assert "typed-pw" not in output  # not echoed
    assert verify_user(read_htpasswd(str(path)), "alice", "typed-pw")
    status, output = _prompted(path, ["one-pw", "other-pw"])
    assert status == 1 and "the passwords do not match" in output
    assert verify_user(read_htpasswd(str(path)), "alice", "typed-pw")  # unchanged
