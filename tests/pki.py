"""A throwaway PKI for TLS tests: one trusted CA, good and deliberately bad server certificates.

Each bad certificate fails verification for exactly one reason (expired, wrong name, unknown
issuer), so a test can tell which check of the gateway refused it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# RSA because proftpd's TLSRSACertificateFile wants RSA; 2048 bits keeps generation fast.
_KEY_BITS = 2048
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files written by `make_pki`, and the good leaf's fingerprint."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    """Leaf for DNS `localhost`, IP 127.0.0.1 and ::1, signed by `ca_cert`."""
    server_key: Path
    server_chain: Path
    """`server_cert` followed by `ca_cert`."""
    expired_cert: Path
    """Same names as `server_cert`, signed by `ca_cert`, but no longer valid."""
    expired_key: Path
    wrong_name_cert: Path
    """Valid and signed by `ca_cert`, but only for `wrong.example`."""
    wrong_name_key: Path
    untrusted_ca_cert: Path
    untrusted_cert: Path
    """Same names as `server_cert`, but signed by `untrusted_ca_cert`."""
    untrusted_key: Path
    twin_cert: Path
    """Same names and CA as `server_cert`, another key: only a pinned fingerprint tells them
    apart."""
    twin_key: Path
    server_sha256: str
    """SHA-256 of `server_cert` in DER form, lowercase hex without separators."""


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str, now: datetime.datetime) -> _Issued:
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 365 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _make_leaf(
    issuer: _Issued,
    names: list[x509.GeneralName],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> _Issued:
    key = _new_key()
    common_name = str(names[0].value)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _write_pair(directory: Path, stem: str, issued: _Issued) -> tuple[Path, Path]:
    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return (
        _write(directory / f"{stem}.crt", _cert_pem(issued.cert)),
        # Servers such as vsftpd and proftpd refuse keys that others can read.
        _write(directory / f"{stem}.key", key_pem, 0o600),
    )


def make_pki(directory: Path) -> Pki:
    """Write a fresh PKI into `directory` (created if missing) and describe it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    loopback: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]

    ca = _make_ca("ftp-gateway test CA", now)
    server = _make_leaf(ca, loopback, now - _DAY, now + 30 * _DAY)
    expired = _make_leaf(ca, loopback, now - 30 * _DAY, now - _DAY)
    wrong_name = _make_leaf(ca, [x509.DNSName("wrong.example")], now - _DAY, now + 30 * _DAY)
    untrusted_ca = _make_ca("ftp-gateway untrusted CA", now)
    untrusted = _make_leaf(untrusted_ca, loopback, now - _DAY, now + 30 * _DAY)
    twin = _make_leaf(ca, loopback, now - _DAY, now + 30 * _DAY)

    ca_cert, ca_key = _write_pair(directory, "ca", ca)
    server_cert, server_key = _write_pair(directory, "server", server)
    expired_cert, expired_key = _write_pair(directory, "expired", expired)
    wrong_name_cert, wrong_name_key = _write_pair(directory, "wrong-name", wrong_name)
    untrusted_ca_cert, _ = _write_pair(directory, "untrusted-ca", untrusted_ca)
    untrusted_cert, untrusted_key = _write_pair(directory, "untrusted", untrusted)
    twin_cert, twin_key = _write_pair(directory, "twin", twin)
    server_chain = _write(
        directory / "server-chain.crt", _cert_pem(server.cert) + _cert_pem(ca.cert)
    )
    return Pki(
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        server_chain=server_chain,
        expired_cert=expired_cert,
        expired_key=expired_key,
        wrong_name_cert=wrong_name_cert,
        wrong_name_key=wrong_name_key,
        untrusted_ca_cert=untrusted_ca_cert,
        untrusted_cert=untrusted_cert,
        untrusted_key=untrusted_key,
        twin_cert=twin_cert,
        twin_key=twin_key,
        server_sha256=server.cert.fingerprint(hashes.SHA256()).hex(),
    )
