"""twisted.cred checkers for proxy logins against real user stores: `htpasswd:PATH` (bcrypt and
argon2 hashes) and `ldap:` (bind as the user, over LDAPS or StartTLS, with ldaptor).

`make_checker` builds the checker for one `proxy_auth` description; descriptions it does not
know (`file:`, `memory:`, `unix`, ...) go to twisted.cred.strcred as before. Both checkers
return a `ProxyIdentity` as the avatar ID and raise `UserStoreUnavailable` when the store cannot
answer (so the client hears "try later", and the failure is not counted against it).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import Config, ConfigError
from gateway.events import Event
from gateway.userstore import (
    HtpasswdError,
    ProxyIdentity,
    escape_dn_value,
    escape_filter_value,
    read_htpasswd,
    verify_user,
)

with warnings.catch_warnings():
    # ldaptor's filter grammar uses pyparsing names that pyparsing 3 marks as deprecated.
    warnings.simplefilter("ignore")
    from ldaptor import ldapfilter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapclient import LDAPClient

_log = Logger(namespace="gateway.auth")

#: An attribute compared with the login name in a DN template or filter: `uid={user}`.
_USER_ATTRIBUTE = re.compile(r"([A-Za-z][A-Za-z0-9-]*)=\{user\}")


# A directory user's attribute values, the attributes that spell the name, and whether the
# user is in ldap.require_group.
_Found = tuple[dict[str, list[str]], tuple[str, ...], bool]


class UserStoreUnavailable(Exception):
    """The user store could not give an answer (unreachable, timed out, TLS refused, service
    account refused); the message says why, without any password."""


def _text(credentials: IUsernamePassword) -> tuple[str, str]:
    user, password = credentials.username, credentials.password
    try:
        if isinstance(user, bytes):
            user = user.decode("utf-8")
        if isinstance(password, bytes):
            password = password.decode("utf-8")
    except UnicodeDecodeError:
        raise UnauthorizedLogin() from None
    return str(user), str(password)


class TextChecker:
    """A checker that takes user name and password as text (bytes are decoded as UTF-8), so the
    gateway offers the credentials once: one hash, one LDAP bind per login attempt."""

    credentialInterfaces = (IUsernamePassword,)


@implementer(ICredentialsChecker)
class HtpasswdChecker(TextChecker):
    """Users and bcrypt/argon2 hashes from an htpasswd file.

    The file is read at start (an unusable file stops start-up with its path and line) and
    again whenever its size, times or inode change, so `ftp-gateway passwd` and `htpasswd`
    take effect at the next login, as with `file:`. If a changed file cannot be used, every
    login through it fails (logged with the reason) until it is fixed: a broken edit must not
    leave removed users able to log in. Hash checks run in the reactor's thread pool."""

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self._reactor = reactor
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._users = read_htpasswd(path)

    def _stat(self) -> tuple[int, ...] | None:
        try:
            s = os.stat(self.path)
        except OSError:
            return None
        return (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)

    def _refresh(self) -> str | None:
        """Re-read the file if it changed; the reason it is unusable, once per change."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            self._users = read_htpasswd(self.path)
        except HtpasswdError as e:
            self._users = {}
            return str(e)
        return None

    def _check(self, user: str, password: str) -> tuple[bool, str | None]:
        with self._lock:
            problem = self._refresh()
            users = self._users
        return verify_user(users, user, password), problem

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[ProxyIdentity]:
        user, password = _text(credentials)
        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._check, user, password
        )

        def checked(result: tuple[bool, str | None]) -> ProxyIdentity:
            ok, problem = result
            if problem is not None:
                _log.error(
                    "Proxy logins through {path} fail until it is fixed: {problem}",
                    path=self.path,
                    problem=problem,
                    event=Event.HTPASSWD_UNUSABLE,
                )
            if not ok:
                raise UnauthorizedLogin()
            return ProxyIdentity(user)

        return d.addCallback(checked)


@dataclass(frozen=True, slots=True)
class LdapSettings:
    """The [ldap] table, checked: where the directory is and how to find and bind a user."""

    host: str
    port: int
    ldaps: bool
    starttls: bool
    ca_file: str | None
    user_dn_template: str | None
    bind_dn: str | None
    bind_password: str | None
    base_dn: str | None
    filter: str
    require_group: str | None
    timeout: float

    @classmethod
    def from_config(cls, config: Config) -> LdapSettings:
        """Raises ConfigError (one line, naming the setting) for what `config.build` cannot
        check without reading files: the URL's parts and the service password file."""
        url = urlsplit(config.ldap.url or "")
        if url.scheme not in ("ldap", "ldaps") or not url.hostname:
            raise ConfigError("ldap.url: expected ldaps://HOST[:PORT] or ldap://HOST[:PORT]")
        if url.path not in ("", "/") or url.query or url.username:
            raise ConfigError("ldap.url: only ldap[s]://HOST[:PORT] is supported")
        ldaps = url.scheme == "ldaps"
        password = config.ldap.bind_password
        if config.ldap.bind_password_file is not None:
            try:
                password = Path(config.ldap.bind_password_file).read_text().strip()
            except OSError as e:
                raise ConfigError(
                    f"ldap.bind_password_file: cannot read "
                    f"{config.ldap.bind_password_file}: {e.strerror}"
                ) from None
        try:
            port = url.port or (636 if ldaps else 389)
        except ValueError:
            raise ConfigError("ldap.url: the port is not a number from 1 to 65535") from None
        return cls(
            host=url.hostname,
            port=port,
            ldaps=ldaps,
            starttls=config.ldap.starttls,
            ca_file=config.ldap.ca_file,
            user_dn_template=config.ldap.user_dn_template,
            bind_dn=config.ldap.bind_dn,
            bind_password=password,
            base_dn=config.ldap.base_dn,
            filter=config.ldap.filter,
            require_group=config.ldap.require_group,
            timeout=config.ldap.timeout,
        )

    def tls_options(self) -> Any:
        """Client TLS that verifies the directory's certificate and name (the CA file, or the
        system's trust store)."""
        trust: Any = None
        if self.ca_file is not None:
            try:
                trust = Certificate.loadPEM(Path(self.ca_file).read_bytes())
            except OSError as e:
                raise ConfigError(
                    f"ldap.ca_file: cannot read {self.ca_file}: {e.strerror}"
                ) from None
            except Exception as e:
                raise ConfigError(
                    f"ldap.ca_file: {self.ca_file} is not a PEM certificate: {e}"
                ) from None
        return optionsForClientTLS(self.host, trustRoot=trust)


@implementer(IHandshakeListener)
class _Client(LDAPClient):  # type: ignore[misc]
    """ldaptor's client, telling when TLS is up and why the connection ended."""

    def __init__(self) -> None:
        super().__init__()
        self.handshake: Deferred[None] = Deferred()
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        if not self.handshake.called:
            self.handshake.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.handshake.addErrback(lambda _: None)
        super().connectionLost(reason)


def _why(failure: Failure | BaseException, client: _Client | None) -> str:
    """A sentence for the log and the client: what went wrong talking to the directory."""
    exception = failure.value if isinstance(failure, Failure) else failure
    lost = client.lost if client is not None else None
    if lost is not None and not lost.check(error.ConnectionDone):
        exception = lost.value
    text = str(exception) or type(exception).__name__
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return "the directory's TLS certificate could not be verified"
    if isinstance(exception, error.ConnectionRefusedError):
        return "the directory refused the connection"
    if isinstance(exception, defer.TimeoutError | error.TimeoutError):
        return "the directory did not answer in time"
    return f"the directory connection failed ({type(exception).__name__})"


@implementer(ICredentialsChecker)
class LdapChecker(TextChecker):
    """Authenticates by binding to the directory as the user, over LDAPS or StartTLS with the
    certificate verified; never by comparing passwords itself.

    The user's DN comes from `user_dn_template` (the name escaped as an RFC 4514 attribute
    value) or from a search under `base_dn` with `filter` (the name escaped per RFC 4515),
    bound as the service account `bind_dn` (or anonymously). An empty password is refused
    before any bind: LDAP treats a simple bind with a DN and no password as an anonymous bind
    that succeeds (RFC 4513 section 5.1.2). With `require_group`, the user's DN must be a
    `member` of that groupOfNames (checked with the service account if there is one, else as
    the user). Each login has one connection, bounded by `timeout` from connect to the last
    answer."""

    def __init__(self, settings: LdapSettings, reactor: Any) -> None:
        self.settings = settings
        self._reactor = reactor
        self._tls = settings.tls_options()

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[ProxyIdentity]:
        user, password = _text(credentials)
        if not user or not password or any(not c.isprintable() for c in user):
            return defer.fail(UnauthorizedLogin())
        holder: list[_Client] = []
        d = Deferred.fromCoroutine(self._authenticate(user, password, holder))
        d.addTimeout(self.settings.timeout, self._reactor)

        def failed(failure: Failure) -> Failure:
            client = holder[0] if holder else None
            if client is not None and client.transport is not None:
                client.transport.abortConnection()
            if failure.check(UnauthorizedLogin, UserStoreUnavailable):
                return failure
            raise UserStoreUnavailable(_why(failure, client))

        def done(identity: ProxyIdentity) -> ProxyIdentity:
            client = holder[0]
            if client.transport is not None:
                client.transport.loseConnection()
            return identity

        return d.addCallbacks(done, failed)

    async def _connect(self, holder: list[_Client]) -> _Client:
        s = self.settings
        endpoint: Any = HostnameEndpoint(self._reactor, s.host, s.port, timeout=s.timeout)
        if s.ldaps:
            endpoint = wrapClientTLS(self._tls, endpoint)
        client = _Client()
        holder.append(client)
        await connectProtocol(endpoint, client)
        if s.starttls:
            # RFC 4511 section 4.14: the StartTLS extended operation, then TLS on the same
            # connection before anything else is sent.
            try:
                await client.startTLS(self._tls)
            except ldaperrors.LDAPException as e:
                raise UserStoreUnavailable(f"the directory refused StartTLS ({e})") from None
        if s.ldaps or s.starttls:
            await client.handshake
        return client

    async def _bind(self, client: _Client, dn: str, password: str) -> bool:
        """Simple bind (RFC 4511 section 4.2); False for invalid credentials."""
        response = await client.send(pureldap.LDAPBindRequest(dn=dn, auth=password))
        if response.resultCode == ldaperrors.Success.resultCode:
            return True
        if response.resultCode == ldaperrors.LDAPInvalidCredentials.resultCode:
            return False
        raise UserStoreUnavailable(
            f"the directory answered a bind with result {response.resultCode}"
        )

    async def _search(
        self,
        client: _Client,
        base: str,
        scope: int,
        filter_text: str,
        attributes: tuple[str, ...] = (),
    ) -> list[tuple[str, dict[str, list[str]]]]:
        """The entries under `base` matching `filter_text` (at most two are asked for: more
        than one match is already an answer): each its DN and the values of `attributes`
        (lower-case names) that the directory let the connection read."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = ldapfilter.parseFilter(filter_text)
        request = pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            sizeLimit=2,
            timeLimit=max(1, int(self.settings.timeout)),
            filter=parsed,
            # RFC 4511 section 4.5.1.8: "1.1" asks for no attributes, only DNs.
            attributes=list(attributes) or ["1.1"],
        )
        found: list[tuple[str, dict[str, list[str]]]] = []
        finished: Deferred[list[str]] = Deferred()

        def handle(message: Any) -> bool:
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                values = {
                    _decode(kind).lower(): [_decode(value) for value in kind_values]
                    for kind, kind_values in message.attributes
                }
                found.append((_decode(message.objectName), values))
                return False
            if isinstance(message, pureldap.LDAPSearchResultDone):
                code = message.resultCode
                if code in (
                    ldaperrors.Success.resultCode,
                    ldaperrors.LDAPSizeLimitExceeded.resultCode,
                    ldaperrors.LDAPNoSuchObject.resultCode,
                ):
                    finished.callback(found)
                else:
                    finished.errback(
                        UserStoreUnavailable(f"the directory answered a search with result {code}")
                    )
                return True
            return False  # references are not followed

        client.send_multiResponse(request, handle).addErrback(
            lambda failure: None if finished.called else finished.errback(failure)
        )
        return await finished

    async def _authenticate(self, user: str, password: str, holder: list[_Client]) -> ProxyIdentity:
        s = self.settings
        client = await self._connect(holder)
        if s.user_dn_template is not None:
            found = await self._bind_by_template(client, s.user_dn_template, user, password)
        else:
            found = await self._search_then_bind(client, user, password)
        values, spellings, in_group = found
        if spellings and not any(user in values.get(kind, []) for kind in spellings):
            # The directory matched the name without regard to case or spaces (uid's
            # caseIgnoreMatch, RFC 4517 section 4.2.11), but routes, rate_per_user and the
            # logs take names as given: "ALICE" must not log in as alice under another name.
            _log.info(
                "Proxy user {user} is not spelled as the directory spells it ({attributes})",
                user=user,
                attributes=", ".join(spellings),
                event=Event.LDAP_SPELLING,
            )
            raise UnauthorizedLogin()
        if not in_group:
            _log.info(
                "Proxy user {user} is not a member of {group}",
                user=user,
                group=s.require_group,
                event=Event.LDAP_NOT_IN_GROUP,
            )
            raise UnauthorizedLogin()
        groups = frozenset({s.require_group}) if s.require_group else frozenset()
        return ProxyIdentity(user, groups)

    async def _bind_by_template(
        self, client: _Client, template: str, user: str, password: str
    ) -> _Found:
        """Bind as the DN the template makes of `user`, then read the entry's spellings of
        the name."""
        dn = template.replace("{user}", escape_dn_value(user))
        if not await self._bind(client, dn, password):
            raise UnauthorizedLogin()
        in_group = await self._in_group(client, dn)
        spellings = _user_attributes(template)
        entries = await self._search(
            client, dn, pureldap.LDAP_SCOPE_baseObject, "(objectClass=*)", spellings
        )
        return (entries[0][1] if entries else {}), spellings, in_group

    async def _search_then_bind(self, client: _Client, user: str, password: str) -> _Found:
        """Find the one entry the filter matches for `user` (as the service account, if
        any), then bind as it with the user's password."""
        s = self.settings
        if s.bind_dn is not None and not await self._bind(client, s.bind_dn, s.bind_password or ""):
            raise UserStoreUnavailable("the directory refused the service account's bind")
        assert s.base_dn is not None
        spellings = _user_attributes(s.filter)
        entries = await self._search(
            client,
            s.base_dn,
            pureldap.LDAP_SCOPE_wholeSubtree,
            s.filter.replace("{user}", escape_filter_value(user)),
            spellings,
        )
        if len(entries) != 1:
            raise UnauthorizedLogin()  # no such user, or the name is not unique
        dn, values = entries[0]
        in_group = await self._in_group(client, dn)
        if not await self._bind(client, dn, password):
            raise UnauthorizedLogin()
        return values, spellings, in_group

    async def _in_group(self, client: _Client, dn: str) -> bool:
        group = self.settings.require_group
        if group is None:
            return True
        member = escape_filter_value(dn)
        names = await self._search(
            client, group, pureldap.LDAP_SCOPE_baseObject, f"(member={member})"
        )
        return bool(names)


def _user_attributes(template: str) -> tuple[str, ...]:
    """The attributes a DN template or filter compares with the login name (lower case)."""
    return tuple(dict.fromkeys(m.lower() for m in _USER_ATTRIBUTE.findall(template)))


def _decode(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def make_checker(description: str, config: Config, reactor: Any) -> Any:
    """The twisted.cred checker for one `proxy_auth` description. Raises ConfigError or
    HtpasswdError (one line) if it cannot be built."""
    kind, _, argument = description.partition(":")
    if kind == "htpasswd":
        if not argument:
            raise ConfigError(
                "proxy_auth: htpasswd: needs a file, as in htpasswd:/etc/ftp-gateway/users"
            )
        return HtpasswdChecker(argument, reactor)
    if kind == "ldap":
        if argument:
            raise ConfigError("proxy_auth: ldap: takes its settings from [ldap]; write just ldap:")
        return LdapChecker(LdapSettings.from_config(config), reactor)
    return strcred.makeChecker(description)
