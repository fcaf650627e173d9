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
    """TLS client settings for one upstream session, recording why verification failed.

    With a pinned fingerprint the chain is not checked against CAs and the name is not
    checked; the caller compares the fingerprint after the handshake, before it sends
    anything. Otherwise service-identity checks the name once the chain verified.
    """

    def __init__(self, hostname: str, context: SSL.Context | None, verify: Any) -> None:
        self.hostname = hostname
        self.verify_errors: list[int] = []
        self._context = context
        self._verify: Any = verify  # twisted's ClientTLSOptions, or None when pinned

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self._verify is None:
            connection = SSL.Connection(self._context, None)
            connection.set_app_data(tlsProtocol)
            connection.set_connect_state()
            if not re.fullmatch(r"[0-9.]+|.*:.*", self.hostname):
                connection.set_tlsext_host_name(self.hostname.encode("idna"))
            return connection
        connection = self._verify.clientConnectionForTLS(tlsProtocol)
        # Twisted's callback checks the chain and the name; wrap it to remember why a chain
        # was refused, so the client hears "expired" rather than "verify failed".
        check = _twisted_verify_callback(self._verify, tlsProtocol)

        def record(
            conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: bool
        ) -> bool:
            if not ok:
                self.verify_errors.append(errno)
            return check(conn, cert, errno, depth, ok)

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, record)
        return connection

    def describe(self, reason: Any) -> str:
        """A sentence saying why the TLS handshake with the upstream failed."""
        for errno in self.verify_errors:
            if errno in _VERIFY_ERRORS:
                return _VERIFY_ERRORS[errno]
        text = str(getattr(reason, "value", reason))
        if "VerificationError" in text or "hostname" in text.lower() or "match" in text.lower():
            return f"the upstream's certificate does not match the name {self.hostname}"
        if self.verify_errors:
            return (
                f"the upstream's certificate could not be verified (error {self.verify_errors[0]})"
            )
        return f"TLS handshake failed: {text}"


def _twisted_verify_callback(options: Any, tls_protocol: Any) -> Any:
    """The certificate check Twisted installs for `optionsForClientTLS` (chain, then name).

    The only use of private Twisted API (`twisted.internet._sslverify`): Twisted offers no
    public hook to learn *why* verification failed, so the gateway installs Twisted's own
    callback wrapped in one that records the OpenSSL error, rather than re-implementing the
    name check."""
    from twisted.internet._sslverify import _verifyCB

    return _verifyCB(tls_protocol, options._hostnameIsDnsName, options._hostnameASCII)


def client_options(
    hostname: str, *, ca_file: str | None, pinned: bool, min_version: str
) -> UpstreamTLS:
    """TLS client settings for one upstream session's control and data connections."""
    extra: dict[str, Any] = {"raiseMinimumTo": _VERSIONS[min_version]}
    if pinned:
        context = ssl.CertificateOptions(verify=False, **extra).getContext()
        return UpstreamTLS(hostname, context, None)
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

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._base.clientConnectionForTLS(tlsProtocol)
        session = self._control.get_session()
        if session is not None:
            connection.set_session(session)
        return connection
