"""A real OpenLDAP `slapd` for tests: a foreground child process on loopback with a throwaway
configuration and mdb database in a temporary directory.

It serves `ldap://127.0.0.1:PORT/` (StartTLS offered) and `ldaps://127.0.0.1:TLS_PORT/` with a
certificate from tests/pki.py, holds the entries in `DIRECTORY_LDIF` (people, a service account
and one groupOfNames), and needs nothing from the system slapd service, which may stay stopped.
A missing binary raises FileNotFoundError: the tests fail, never skip, without slapd.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway_process import free_port, wait_for_port
from pki import Pki

SLAPD: Final = Path("/usr/sbin/slapd")
SCHEMA: Final = Path("/etc/ldap/schema")
SUFFIX: Final = "dc=example,dc=org"
ADMIN_DN: Final = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD: Final = "admin-secret"
SERVICE_DN: Final = f"cn=gateway,ou=services,{SUFFIX}"
SERVICE_PASSWORD: Final = "service-secret"
GROUP_DN: Final = f"cn=ftp-users,ou=groups,{SUFFIX}"

#: uid -> password. alice is in GROUP_DN, bob is not; "o'brien, jr" has characters that DNs and
#: filters must escape (RFC 4514 section 2.4, RFC 4515 section 3).
USERS: Final = {
    "alice": "alice-pass-1",
    "bob": "bob-pass-2",
    "o'brien, jr": "comma-pass-3",
}
GROUP_MEMBERS: Final = ("alice", "o'brien, jr")


def _user_dn(uid: str) -> str:
    return f"uid={uid.replace(',', chr(92) + ',')},ou=people,{SUFFIX}"


def directory_ldif() -> str:
    """The entries loaded with ldapadd: the tree, users, the service account, the group."""
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: gateway\nuserPassword: {SERVICE_PASSWORD}",
    ]
    for uid, password in USERS.items():
        entries.append(
            f"dn: {_user_dn(uid)}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
            f"sn: {uid}\nuserPassword: {password}"
        )
    members = "\n".join(f"member: {_user_dn(uid)}" for uid in GROUP_MEMBERS)
    entries.append(f"dn: {GROUP_DN}\nobjectClass: groupOfNames\ncn: ftp-users\n{members}")
    return "\n\n".join(entries) + "\n"


@dataclass
class RunningSlapd:
    proc: subprocess.Popen[bytes]
    port: int
    tls_port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_slapd(directory: Path, pki: Pki) -> RunningSlapd:
    """Start slapd on two free loopback ports and load `directory_ldif()` with ldapadd."""
    if not SLAPD.exists():
        raise FileNotFoundError(f"{SLAPD} is missing: install Debian's slapd package")
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "db"
    database.mkdir()
    config = directory / "slapd.conf"
    config.write_text(
        "".join(
            f"include {SCHEMA}/{name}.schema\n"
            for name in ("core", "cosine", "inetorgperson", "nis")
        )
        + f"pidfile {directory}/slapd.pid\n"
        f"argsfile {directory}/slapd.args\n"
        "modulepath /usr/lib/ldap\n"
        "moduleload back_mdb\n"
        f"TLSCACertificateFile {pki.ca_cert}\n"
        f"TLSCertificateFile {pki.server_cert}\n"
        f"TLSCertificateKeyFile {pki.server_key}\n"
        "database mdb\n"
        "maxsize 16777216\n"
        f'suffix "{SUFFIX}"\n'
        f'rootdn "{ADMIN_DN}"\n'
        f"rootpw {ADMIN_PASSWORD}\n"
        f"directory {database}\n"
        "access to attrs=userPassword by anonymous auth by * none\n"
        "access to * by * read\n"
    )
    port, tls_port = free_port(), free_port()
    log = open(directory / "slapd.log", "wb")  # noqa: SIM115 - kept open for the child
    proc = subprocess.Popen(
        [
            str(SLAPD),
            "-d",
            "0",
            "-h",
            f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/",
            "-f",
            str(config),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = RunningSlapd(proc, port, tls_port, directory)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        wait_for_port("127.0.0.1", tls_port, proc=proc)
        ldapadd = shutil.which("ldapadd")
        if ldapadd is None:
            raise FileNotFoundError("ldapadd is missing: install Debian's ldap-utils package")
        deadline = time.monotonic() + 15
        while True:
            result = subprocess.run(
                [ldapadd, "-x", "-H", server.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD],
                input=directory_ldif().encode(),
                capture_output=True,
                timeout=30,
                check=False,
            )
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ldapadd failed: {result.stderr.decode(errors='replace')}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    return server
