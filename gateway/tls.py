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
from twisted.internet._sslverify import ClientTLSOptions
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


def client_options(
    hostname: str, *, ca_file: str | None, pinned: bool, min_version: str
) -> ClientTLSOptions:
    """Context factory for one upstream session's control connection.

    With `pinned`, the chain is not checked against CAs (the caller compares the fingerprint
    after the handshake, before sending anything); otherwise the certificate must chain to the
    system store or `ca_file` and match `hostname` (service-identity).
    """
    extra: dict[str, Any] = {"raiseMinimumTo": _VERSIONS[min_version]}
    if pinned:
        options = ssl.CertificateOptions(verify=False, **extra)
        return ClientTLSOptions(hostname, options.getContext())
    trust: Any = ssl.platformTrust()
    if ca_file:
        pem = _read(ca_file, "CA file")
        blocks = _PEM_CERT.findall(pem)
        if not blocks:
            raise TLSConfigError(f"no PEM certificate in CA file {ca_file}")
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, extraCertificateOptions=extra)


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientCreator:
    """Creates upstream data-connection TLS clients that resume the control connection's
    session (RFC 4217 section 10 recommends it; many servers require it)."""

    def __init__(self, base: ClientTLSOptions, control: SSL.Connection) -> None:
        self._base = base
        self._control = control

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._base.clientConnectionForTLS(tlsProtocol)
        session = self._control.get_session()
        if session is not None:
            connection.set_session(session)
        return connection


def describe_failure(reason: Any) -> str:
    """A sentence saying why a TLS handshake with an upstream failed."""
    text = str(getattr(reason, "value", reason))
    lowered = text.lower()
    if "expired" in lowered:
        return "the upstream's certificate has expired"
    if "hostname" in lowered or "verificationerror" in lowered or "doesn't match" in lowered:
        return "the upstream's certificate does not match its host name"
    if (
        "unable to get local issuer" in lowered
        or "self-signed" in lowered
        or "self signed" in lowered
    ):
        return "the upstream's certificate is signed by an unknown CA"
    if "certificate verify failed" in lowered:
        return "the upstream's certificate could not be verified"
    return f"TLS handshake failed: {text}"
