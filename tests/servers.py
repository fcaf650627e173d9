"""Start and stop real FTP servers on loopback for integration tests.

The gateway has to cope with what real servers do, not with what a mock assumes they do: reply
texts, multi-line replies, PASV/EPSV quirks, TLS session reuse on data connections. So this module
runs four of them, each as a foreground child process in its own temporary directory, on a free
port of 127.0.0.1 or ::1:

- pyftpdlib (the Python library, in a separate interpreter),
- vsftpd (the Debian package),
- pure-ftpd and proftpd (unpacked from their Debian packages under /opt/ftp-test-servers by
  `scripts/install-test-deps`, because their packages conflict with vsftpd's).

Logins: vsftpd authenticates through PAM, so its user is the system user `ftptest` that
`scripts/install-test-deps` creates with a fixed password. pure-ftpd (puredb) and proftpd
(AuthUserFile) get a virtual user with a fresh password per instance, mapped onto the uid of
`ftptest` so that, as with vsftpd, uploads are written by an unprivileged user. pyftpdlib has its
own in-memory user and runs as root. Every server confines the user to `RunningServer.root`.
vsftpd and proftpd look up that root with the user's rights before they chroot, so for them
`start_server` adds search permission for others (o+x, not read) to the directories above it.

A missing server binary raises `ServerUnavailable`: tests must fail, not skip, on a machine that
lacks one, or a green run would hide the gap.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import pwd
import re
import secrets
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self

from gateway_process import free_port

KINDS: Final = ("pyftpdlib", "vsftpd", "pure-ftpd", "proftpd")
TLS_MODES: Final = (None, "explicit", "required", "implicit")
TLS_VERSIONS: Final = ("1.2", "1.3")

SERVERS_DIR: Final = Path("/opt/ftp-test-servers")
VSFTPD: Final = Path("/usr/sbin/vsftpd")
PURE_FTPD: Final = SERVERS_DIR / "pure-ftpd/usr/sbin/pure-ftpd"
PURE_PW: Final = SERVERS_DIR / "pure-ftpd/usr/bin/pure-pw"
PROFTPD: Final = SERVERS_DIR / "proftpd/usr/sbin/proftpd"
PROFTPD_MODULES: Final = SERVERS_DIR / "proftpd/usr/lib/proftpd"

SYSTEM_USER: Final = "ftptest"
SYSTEM_PASSWORD: Final = "ftptest-password"
"""Set by scripts/install-test-deps; vsftpd logs in with it."""

STARTUP_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
_INSTALL_HINT: Final = "run `bash scripts/install-test-deps` as root"


class ServerUnavailable(RuntimeError):
    """A server binary or the `ftptest` user is missing from this machine."""


class ServerStartError(RuntimeError):
    """The server exited or did not greet with 220 in time; the message carries its output."""


@dataclass(eq=False)  # identity semantics: each instance is one process
class RunningServer:
    """A server process that answered 220; `stop()` it (or use it as a context manager)."""

    kind: str
    host: str
    port: int
    root: Path
    """What the FTP user sees as "/": uploads land here on disk."""
    user: str
    password: str
    log_path: Path | None
    """The server's own log (protocol or transfer log), if it writes one."""
    output_path: Path = field(repr=False)
    """stdout and stderr of the process."""
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self) -> None:
        """End the server and every session process it forked, then reap it; idempotent."""
        if self in _running:
            _running.discard(self)
            _end_process_group(self.process)

    def log(self) -> str:
        """The server's output and log, for assertion messages."""
        return _describe_output(self.output_path, self.log_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class _Options:
    host: str
    active: bool
    passive: bool
    tls: str | None
    cert: Path | None
    key: Path | None
    require_ssl_reuse: bool
    tls_max_version: str | None


@dataclass(frozen=True)
class _Launch:
    """How to run one configured server; built per kind by the `_launch_*` functions."""

    argv: list[str]
    user: str
    password: str
    log_path: Path | None
    env: dict[str, str] = field(default_factory=dict)
    errors_on_stdin: bool = False
    """vsftpd writes "500 OOPS" start-up errors to fd 0, its would-be control connection."""


_running: set[RunningServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    """A test that forgot `stop()` must not leave servers behind after pytest exits."""
    for server in list(_running):
        server.stop()


def start_server(
    kind: str,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    active: bool = True,
    passive: bool = True,
    tls: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    require_ssl_reuse: bool = False,
    tls_max_version: str | None = None,
    port: int | None = None,
) -> RunningServer:
    """Start a `kind` server on `host` and return once it has greeted a client with 220.

    `active=False` makes the server refuse PORT/EPRT and `passive=False` PASV/EPSV. `tls` is
    None, "explicit" (AUTH TLS offered but optional), "required" (TLS mandatory for login and
    data) or "implicit" (TLS from the first byte); `cert` and `key` are then PEM files.
    `require_ssl_reuse` makes the server refuse a TLS data connection that does not resume the
    control connection's session. `tls_max_version` ("1.2" or "1.3") caps the protocol.
    `port`: listen there (a server restarted where it was) instead of on a free port.
    A combination the server cannot do raises NotImplementedError rather than quietly running
    something else.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown server kind {kind!r}; expected one of {KINDS}")
    if tls not in TLS_MODES:
        raise ValueError(f"unknown tls mode {tls!r}; expected one of {TLS_MODES}")
    if tls is None and (require_ssl_reuse or tls_max_version or cert or key):
        raise ValueError("TLS options given without tls")
    if tls is not None and (cert is None or key is None):
        raise ValueError("tls needs both cert and key")
    if tls_max_version not in (None, *TLS_VERSIONS):
        raise ValueError(f"tls_max_version must be one of {TLS_VERSIONS}")
    options = _Options(host, active, passive, tls, cert, key, require_ssl_reuse, tls_max_version)

    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    port = port or free_port(host)  # the server binds it a moment later
    launch = _LAUNCHERS[kind](options, workdir, root, port)
    output_path = workdir / f"{kind}.out"
    with output_path.open("wb") as output:
        process = subprocess.Popen(
            launch.argv,
            stdin=output if launch.errors_on_stdin else subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **launch.env},
            # Its own process group, so stop() also ends the per-session children it forks.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = RunningServer(
        kind=kind,
        host=host,
        port=port,
        root=root,
        user=launch.user,
        password=launch.password,
        log_path=launch.log_path,
        output_path=output_path,
        process=process,
    )
    _running.add(server)
    try:
        _wait_for_greeting(server, implicit_tls=tls == "implicit")
    except BaseException:
        server.stop()
        raise
    return server


# --- per-server configuration -------------------------------------------------------------------


_PYFTPDLIB_SCRIPT: Final = """
import json, logging, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.log import config_logging
from pyftpdlib.servers import FTPServer

cfg = json.loads(sys.argv[1])
config_logging(level=logging.DEBUG)
authorizer = DummyAuthorizer()
authorizer.add_user(cfg["user"], cfg["password"], cfg["root"], perm="elradfmwMT")
base = FTPHandler
if cfg["tls"]:
    from OpenSSL import SSL
    from pyftpdlib.handlers import TLS_FTPHandler as base
    base.certfile = cfg["cert"]
    base.keyfile = cfg["key"]
    base.tls_control_required = base.tls_data_required = cfg["tls"] == "required"
    if cfg["tls_max_version"] == "1.2":
        base.ssl_options |= SSL.OP_NO_TLSv1_3

def refuse(self, line):
    self.respond("502 Command disabled by configuration.")

class Handler(base):
    authorizer = authorizer
    banner = "pyftpdlib test server ready."
    if not cfg["active"]:
        ftp_PORT = ftp_EPRT = refuse
    if not cfg["passive"]:
        ftp_PASV = ftp_EPSV = refuse

FTPServer((cfg["host"], cfg["port"]), Handler).serve_forever(timeout=0.5)
"""


def _launch_pyftpdlib(options: _Options, workdir: Path, root: Path, port: int) -> _Launch:
    if options.tls == "implicit":
        raise NotImplementedError("pyftpdlib has no implicit TLS")
    if options.require_ssl_reuse:
        raise NotImplementedError("pyftpdlib cannot require TLS session reuse")
    password = secrets.token_urlsafe(12)
    config = {
        "host": options.host,
        "port": port,
        "user": SYSTEM_USER,
        "password": password,
        "root": str(root),
        "active": options.active,
        "passive": options.passive,
        "tls": options.tls,
        "cert": str(options.cert),
        "key": str(options.key),
        "tls_max_version": options.tls_max_version,
    }
    return _Launch(
        argv=[sys.executable, "-c", _PYFTPDLIB_SCRIPT, json.dumps(config)],
        user=SYSTEM_USER,
        password=password,
        # pyftpdlib logs every command and reply to stderr, which is the output file.
        log_path=None,
    )


def _launch_vsftpd(options: _Options, workdir: Path, root: Path, port: int) -> _Launch:
    _require_binary(VSFTPD)
    _give_to_test_user(root)
    _let_others_traverse(root)
    empty = workdir / "vsftpd-empty"
    empty.mkdir(mode=0o755, exist_ok=True)
    log_path = workdir / "vsftpd.log"
    ipv6 = ":" in options.host
    settings: dict[str, str | int | bool] = {
        "listen": not ipv6,
        "listen_ipv6": ipv6,
        ("listen_address6" if ipv6 else "listen_address"): options.host,
        "listen_port": port,
        "background": False,
        "anonymous_enable": False,
        "local_enable": True,
        "write_enable": True,
        "local_umask": "022",
        "local_root": str(root),
        "chroot_local_user": True,
        # The root belongs to the user so uploads to "/" work; vsftpd refuses that by default.
        "allow_writeable_chroot": True,
        "secure_chroot_dir": str(empty),
        # vsftpd's seccomp filter predates syscalls that today's glibc makes, killing sessions
        # ("500 OOPS: child died") on many container and CI hosts.
        "seccomp_sandbox": False,
        "pam_service_name": "vsftpd",
        "userlist_enable": False,
        "tcp_wrappers": False,
        "delay_failed_login": 0,
        "port_enable": options.active,
        "pasv_enable": options.passive,
        "connect_from_port_20": False,
        "syslog_enable": False,
        "vsftpd_log_file": str(log_path),
        "xferlog_enable": True,
        "xferlog_std_format": False,
        "log_ftp_protocol": True,
        "dual_log_enable": True,
        "xferlog_file": str(workdir / "xferlog"),
        "max_per_ip": 0,
        "max_clients": 0,
    }
    if options.tls is not None:
        required = options.tls != "explicit"
        settings |= {
            "ssl_enable": True,
            "rsa_cert_file": str(options.cert),
            "rsa_private_key_file": str(options.key),
            "allow_anon_ssl": False,
            "force_local_logins_ssl": required,
            "force_local_data_ssl": required,
            "require_ssl_reuse": options.require_ssl_reuse,
            "implicit_ssl": options.tls == "implicit",
            # Debian's vsftpd 3.0.3 knows only ssl_tlsv1 (TLS 1.0 and up), not ssl_tlsv1_2.
            "ssl_tlsv1": True,
            "ssl_sslv2": False,
            "ssl_sslv3": False,
            "ssl_ciphers": "HIGH",
            "debug_ssl": True,
        }
    config = workdir / "vsftpd.conf"
    config.write_text("".join(f"{name}={_vsftpd_value(v)}\n" for name, v in settings.items()))
    return _Launch(
        argv=[str(VSFTPD), str(config)],
        user=SYSTEM_USER,
        password=SYSTEM_PASSWORD,
        log_path=log_path,
        env=_openssl_env(options, workdir),
        errors_on_stdin=True,
    )


def _vsftpd_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    return str(value)


def _launch_pure_ftpd(options: _Options, workdir: Path, root: Path, port: int) -> _Launch:
    if not options.active:
        raise NotImplementedError("pure-ftpd has no switch to refuse PORT/EPRT")
    if options.tls == "implicit":
        raise NotImplementedError("Debian's pure-ftpd is built without implicit TLS")
    if options.require_ssl_reuse:
        raise NotImplementedError("pure-ftpd cannot require TLS session reuse")
    _require_binary(PURE_FTPD)
    _require_binary(PURE_PW)
    account = _give_to_test_user(root)
    password = secrets.token_urlsafe(12)
    passwd = workdir / "pureftpd.passwd"
    # pure-pw's own format; the trailing "/./" in the home directory means "chroot here".
    fields = [SYSTEM_USER, _crypt(password), str(account.pw_uid), str(account.pw_gid), ""]
    passwd.write_text(":".join([*fields, f"{root}/./", *[""] * 12]) + "\n")
    passwd.chmod(0o600)
    puredb = workdir / "pureftpd.pdb"
    _run_checked([str(PURE_PW), "mkdb", str(puredb), "-f", str(passwd)])
    log_path = workdir / "pure-ftpd-transfers.log"
    argv = [
        str(PURE_FTPD),
        "--bind", f"{options.host},{port}",
        "--login", f"puredb:{puredb}",
        "--noanonymous",
        "--chrooteveryone",
        "--dontresolve",
        "--minuid", "1",
        "--umask", "133:022",
        "--pidfile", str(workdir / "pure-ftpd.pid"),
        # Its diagnostics go only to syslog, which test machines rarely run: keep the transfer log.
        "--syslogfacility", "none",
        "--altlog", f"clf:{log_path}",
    ]  # fmt: skip
    if not options.passive:
        argv.append("--natmode")  # "force active mode": PASV and EPSV are refused
    if options.tls is not None:
        # --tls=1 offers TLS; --tls=3 refuses cleartext control and data connections.
        argv += ["--tls", "1" if options.tls == "explicit" else "3"]
        argv += ["--certfile", str(_combined_pem(options, workdir))]
    return _Launch(
        argv=argv,
        user=SYSTEM_USER,
        password=password,
        log_path=log_path,
        env=_openssl_env(options, workdir),
    )


def _launch_proftpd(options: _Options, workdir: Path, root: Path, port: int) -> _Launch:
    _require_binary(PROFTPD)
    account = _give_to_test_user(root)
    _let_others_traverse(root)
    password = secrets.token_urlsafe(12)
    passwd = workdir / "proftpd.passwd"
    passwd.write_text(
        f"{SYSTEM_USER}:{_crypt(password)}:{account.pw_uid}:{account.pw_gid}::{root}:/bin/sh\n"
    )
    group = workdir / "proftpd.group"
    group.write_text(f"{SYSTEM_USER}:x:{account.pw_gid}:\n")
    # mod_auth_file refuses files that others can write; keep them private.
    passwd.chmod(0o600)
    group.chmod(0o600)
    log_path = workdir / "proftpd.log"
    lines = [
        "ServerType standalone",
        'ServerName "proftpd test server"',
        "UseIPv6 on",
        f"DefaultAddress {options.host}",
        "SocketBindTight on",
        f"Port {port}",
        f"ModulePath {PROFTPD_MODULES}",
        "User nobody",
        "Group nogroup",
        "Umask 022",
        "MaxInstances 50",
        "UseReverseDNS off",
        # mod_ident asks the client's port 113 before the greeting: 0.4 s per connection here.
        "<IfModule mod_ident.c>",
        "  IdentLookups off",
        "</IfModule>",
        "WtmpLog off",
        "DelayEngine off",
        f"DelayTable {workdir / 'proftpd.delay'}",
        f"ScoreboardFile {workdir / 'proftpd.scoreboard'}",
        f"PidFile {workdir / 'proftpd.pid'}",
        f"SystemLog {log_path}",
        f"TransferLog {workdir / 'proftpd-xfer.log'}",
        # Every command and its reply, next to the server's own messages.
        r'LogFormat commands "%{iso8601} %a %u \"%r\" -> %s \"%S\""',
        f"ExtendedLog {log_path} ALL commands",
        f"AuthUserFile {passwd}",
        f"AuthGroupFile {group}",
        "AuthOrder mod_auth_file.c",
        "RequireValidShell off",
        "DefaultRoot ~",
        "AllowOverwrite on",
        "AllowStoreRestart on",
        "AllowRetrieveRestart on",
    ]
    if not options.active:
        lines += ["<Limit PORT EPRT>", "  DenyAll", "</Limit>"]
    if not options.passive:
        lines += ["<Limit PASV EPSV>", "  DenyAll", "</Limit>"]
    if options.tls is not None:
        tls_options = []
        if not options.require_ssl_reuse:
            tls_options.append("NoSessionReuseRequired")
        if options.tls == "implicit":
            tls_options.append("UseImplicitSSL")
        protocols = "TLSv1.2" if options.tls_max_version == "1.2" else "TLSv1.2 TLSv1.3"
        lines += [
            "<IfModule mod_dso.c>",
            "  LoadModule mod_tls.c",
            "</IfModule>",
            "TLSEngine on",
            f"TLSLog {workdir / 'proftpd-tls.log'}",
            f"TLSProtocol {protocols}",
            f"TLSRSACertificateFile {options.cert}",
            f"TLSRSACertificateKeyFile {options.key}",
            "TLSVerifyClient off",
            f"TLSRequired {'off' if options.tls == 'explicit' else 'on'}",
        ]
        if tls_options:
            lines.append(f"TLSOptions {' '.join(tls_options)}")
    config = workdir / "proftpd.conf"
    config.write_text("\n".join(lines) + "\n")
    return _Launch(
        # -n: stay in the foreground; -q: no banner on stderr.
        argv=[str(PROFTPD), "-n", "-q", "-c", str(config)],
        user=SYSTEM_USER,
        password=password,
        log_path=log_path,
    )


_LAUNCHERS: Final[dict[str, Callable[[_Options, Path, Path, int], _Launch]]] = {
    "pyftpdlib": _launch_pyftpdlib,
    "vsftpd": _launch_vsftpd,
    "pure-ftpd": _launch_pure_ftpd,
    "proftpd": _launch_proftpd,
}


# --- helpers ------------------------------------------------------------------------------------


def _require_binary(path: Path) -> None:
    if not os.access(path, os.X_OK):
        raise ServerUnavailable(f"{path} is missing; {_INSTALL_HINT}")


def _give_to_test_user(root: Path) -> pwd.struct_passwd:
    """Make `root` writable by the unprivileged user the servers run sessions as."""
    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise ServerUnavailable(
            f"system user {SYSTEM_USER!r} is missing; {_INSTALL_HINT}"
        ) from None
    os.chown(root, account.pw_uid, account.pw_gid)
    return account


def _let_others_traverse(root: Path) -> None:
    """Add search permission (not read) for others to every directory above `root`.

    vsftpd enters local_root, and proftpd resolves DefaultRoot, with the user's own rights before
    they chroot there, so a root below a private directory (pytest's tmp_path is under a 0700
    one) fails with "500 OOPS: cannot change directory" or "unable to set DefaultRoot".
    pure-ftpd and pyftpdlib do it as root and need none of this.
    """
    for directory in root.parents:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _crypt(password: str) -> str:
    """A SHA-512 crypt(3) hash, which both puredb and proftpd's AuthUserFile accept."""
    # The stdlib crypt module is deprecated (and gone in 3.13); openssl is a test dependency.
    result = _run_checked(["openssl", "passwd", "-6", "-stdin"], stdin=password.encode())
    return result.stdout.decode().strip()


def _combined_pem(options: _Options, workdir: Path) -> Path:
    """pure-ftpd's --certfile wants the certificate and its key in one file."""
    assert options.cert is not None and options.key is not None
    combined = workdir / "pure-ftpd.pem"
    combined.write_bytes(options.cert.read_bytes() + options.key.read_bytes())
    combined.chmod(0o600)
    return combined


def _openssl_env(options: _Options, workdir: Path) -> dict[str, str]:
    """Cap the TLS version of a server that has no setting for it, through OpenSSL's config."""
    if options.tls_max_version is None:
        return {}
    config = workdir / "openssl.cnf"
    config.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nssl_conf = ssl_section\n"
        "[ssl_section]\nsystem_default = system_default_section\n"
        f"[system_default_section]\nMaxProtocol = TLSv{options.tls_max_version}\n"
    )
    return {"OPENSSL_CONF": str(config)}


def _run_checked(
    argv: list[str], *, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=30, check=False)
    if result.returncode != 0:
        raise ServerStartError(
            f"{argv[0]} exited with {result.returncode}: {result.stderr.decode(errors='replace')}"
        )
    return result


_FINAL_REPLY_LINE: Final = re.compile(rb"^\d{3}(?: |$)")


def _wait_for_greeting(server: RunningServer, *, implicit_tls: bool) -> None:
    """Poll until the server sends a 220 greeting; raise with its output if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    problem = "no attempt"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            problem = f"process exited with status {server.process.returncode}"
            break
        try:
            greeting = _read_greeting(server.host, server.port, implicit_tls)
        except (OSError, TimeoutError) as error:
            problem = f"{type(error).__name__}: {error}"
            time.sleep(0.05)
            continue
        if greeting.startswith(b"220"):
            return
        problem = f"greeting was {greeting!r}"
        break
    raise ServerStartError(
        f"{server.kind} on [{server.host}]:{server.port} did not greet with 220 within "
        f"{STARTUP_TIMEOUT} s ({problem})\n{server.log()}"
    )


def _read_greeting(host: str, port: int, implicit_tls: bool) -> bytes:
    with socket.create_connection((host, port), timeout=2.0) as raw:
        stream: socket.socket = raw
        if implicit_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            stream = context.wrap_socket(raw)
        received = b""
        # A greeting may span lines ("220-..." then "220 ..."); read to its last line.
        while not any(_FINAL_REPLY_LINE.match(line) for line in received.split(b"\r\n") if line):
            chunk = stream.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {received!r}")
            received += chunk
        if implicit_tls:
            with contextlib.suppress(OSError):
                stream.close()
        return received


_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel SIGTERM it when the test process dies.

    atexit does not run when pytest is killed (or pytest-timeout calls os._exit), and a server
    left behind as root on loopback would outlive the run. The signal fires when the *thread*
    that started the server exits, so start servers from the main thread or a long-lived one.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _end_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group, give it STOP_TIMEOUT, SIGKILL whatever is left, and reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT)
    # Left: a leader that ignored SIGTERM, or session processes that outlive their listener.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=STOP_TIMEOUT)


def _describe_output(output_path: Path, log_path: Path | None, limit: int = 6000) -> str:
    parts = []
    for path in (output_path, log_path):
        if path is not None and path.exists():
            text = path.read_text(errors="replace")
            parts.append(f"--- {path} (last {limit} characters) ---\n{text[-limit:]}")
    return "\n".join(parts)
