"""TLS for both sides (RFC 4217): the gateway as FTPS server to clients, as FTPS client upstream.

The gateway terminates TLS on each side it encrypts, so it still sees PORT/PASV and can
translate them. Contexts are built once per gateway (server side) or once per upstream session
(client side) so that data connections can resume the control connection's TLS session: on the
server side through the shared session cache, on the client side by handing the control
connection's session to every data connection (what vsftpd's `require_ssl_reuse` and proftpd's
default `TLSOptions` demand).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message says which and why."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def server_options(certificate: str, private_key: str | None, min_version: str) -> Any:
    """Context factory for the gateway's FTPS server side (control and data connections).

    `certificate` is a PEM file holding the leaf first and optionally its chain; the key may be
    in the same file. Sessions are cached so data connections can resume the control session.
    """
    pem = _read(certificate, "certificate")
    key_pem = _read(private_key, "private key") if private_key else pem
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise TLSConfigError(f"no PEM certificate in {certificate}")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        leaf = crypto.load_certificate(crypto.FILETYPE_PEM, blocks[0])
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks[1:]]
    except crypto.Error as e:
        raise TLSConfigError(f"cannot load certificate or key: {e}") from None
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=_VERSIONS[min_version],
        enableSessions=True,
        enableSessionTickets=True,
    )


def fingerprint(certificate: crypto.X509) -> str:
    """SHA-256 fingerprint, lower-case hex without separators."""
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
    return hashlib.sha256(der).hexdigest()


_UNVERIFIED = "the upstream's certificate could not be verified"

#: OpenSSL X509_V_ERR codes and what to tell a person about them.
_VERIFY_ERRORS = {
    9: "the upstream's certificate is not valid yet",
    10: "the upstream's certificate has expired",
    2: "the upstream's certificate is signed by an unknown CA",
    18: "the upstream's certificate is self-signed and not trusted",
    19: "the upstream's certificate is signed by an unknown CA",
    20: "the upstream's certificate is signed by an unknown CA",
    21: "the upstream's certificate is signed by an unknown CA",
    23: "the upstream's certificate has been revoked",
}


@implementer(IOpenSSLClientConnectionCreator)
class UpstreamTLS:
    """TLS client settings for one upstream session, and the one place that decides whether
    an upstream's certificate is trusted, on its control and on every data connection alike.

    Every TLS connection to the upstream gets its `SSL.Connection` from
    `clientConnectionForTLS` (data connections through `ResumingClientCreator`), and with it
    the same check, made by OpenSSL during the handshake: with a pinned fingerprint
    (`tls.upstream_fingerprint`) the leaf certificate's SHA-256 must be the pinned one (the
    chain is not checked against CAs, the name is not checked); otherwise the chain must lead
    to the system store or `tls.upstream_ca_file` and service-identity matches the name. A
    refused certificate fails the handshake, so nothing is sent or accepted on that connection.
    A data connection that resumes the control connection's session presents no certificate:
    only the server verified on the control connection holds that session's secret.
    """

    def __init__(
        self, hostname: str, context: SSL.Context | None, verify: Any, pin: str | None = None
    ) -> None:
        self.hostname = hostname
        self.pin = pin
        self._context = context
        self._verify: Any = verify  # Twisted's ClientTLSOptions; None when pinned
        #: Why a connection's certificate was refused, per connection, for `describe`.
        self._refusals: WeakKeyDictionary[SSL.Connection, str] = WeakKeyDictionary()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self._verify is None:
            connection = SSL.Connection(self._context, None)
            connection.set_app_data(tlsProtocol)
            connection.set_connect_state()
            if not re.fullmatch(r"[0-9.]+|.*:.*", self.hostname):
                connection.set_tlsext_host_name(self.hostname.encode("idna"))
            chain_and_name = None
        else:
            connection = self._verify.clientConnectionForTLS(tlsProtocol)
            chain_and_name = _twisted_verify_callback(self._verify, tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._checker(chain_and_name)
        )
        return connection

    def _checker(self, chain_and_name: Any) -> Any:
        """The OpenSSL verify callback for one connection: the pin, or Twisted's chain and
        name check, remembering why a certificate was refused so the client hears
        "expired" or "not the pinned one" rather than "verify failed"."""

        def check(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
            if self.pin is not None:
                if depth != 0:
                    return True  # only the leaf is pinned
                seen = fingerprint(cert)
                if seen == self.pin:
                    return True
                self._refusals.setdefault(conn, _not_pinned(seen))
                return False
            accepted = bool(chain_and_name(conn, cert, errno, depth, ok))
            earlier = self._refusals.get(conn)
            if not ok and (earlier is None or earlier.startswith(_UNVERIFIED)):
                # OpenSSL may report several errors; a known one says more than a number.
                self._refusals[conn] = _VERIFY_ERRORS.get(errno, f"{_UNVERIFIED} (error {errno})")
            elif ok and not accepted:
                self._refusals.setdefault(
                    conn, f"the upstream's certificate does not match the name {self.hostname}"
                )
            return accepted

        return check

    def describe(self, reason: Any, connection: SSL.Connection | None = None) -> str:
        """A sentence saying why the TLS handshake of `connection` with the upstream failed."""
        if connection is not None and connection in self._refusals:
            return self._refusals[connection]
        text = str(getattr(reason, "value", reason))
        if "VerificationError" in text or "hostname" in text.lower() or "match" in text.lower():
            return f"the upstream's certificate does not match the name {self.hostname}"
        return f"TLS handshake failed: {text}"


def _twisted_verify_callback(options: Any, tls_protocol: Any) -> Any:
    """The certificate check Twisted installs for `optionsForClientTLS` (chain, then name).

    The only use of private Twisted API (`twisted.internet._sslverify`): Twisted offers no
    public hook to learn *why* verification failed, so the gateway installs Twisted's own
    callback wrapped in one that records the OpenSSL error, rather than re-implementing the
    name check."""
    from twisted.internet._sslverify import _verifyCB

    return _verifyCB(tls_protocol, options._hostnameIsDnsName, options._hostnameASCII)


def _not_pinned(seen: str) -> str:
    return f"the upstream's certificate fingerprint {seen} is not the pinned one"


def client_options(
    hostname: str, *, ca_file: str | None, pin: str | None, min_version: str
) -> UpstreamTLS:
    """TLS client settings for one upstream session's control and data connections; `pin`
    is the SHA-256 fingerprint the upstream's certificate must have, if any."""
    extra: dict[str, Any] = {"raiseMinimumTo": _VERSIONS[min_version]}
    if pin is not None:
        context = ssl.CertificateOptions(verify=False, **extra).getContext()
        return UpstreamTLS(hostname, context, None, pin)
    trust: Any = ssl.platformTrust()
    if ca_file:
        pem = _read(ca_file, "CA file")
        blocks = _PEM_CERT.findall(pem)
        if not blocks:
            raise TLSConfigError(f"no PEM certificate in CA file {ca_file}")
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    options = ssl.optionsForClientTLS(hostname, trustRoot=trust, extraCertificateOptions=extra)
    return UpstreamTLS(hostname, None, options)


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientCreator:
    """Creates upstream data-connection TLS clients that resume the control connection's
    session (RFC 4217 section 10 recommends it; many servers require it)."""

    def __init__(self, base: UpstreamTLS, control: SSL.Connection) -> None:
        self._base = base
        self._control = control

    def describe(self, reason: Any, connection: SSL.Connection | None = None) -> str:
        return self._base.describe(reason, connection)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._base.clientConnectionForTLS(tlsProtocol)
        session = self._control.get_session()
        if session is not None:
            connection.set_session(session)
        return connection
