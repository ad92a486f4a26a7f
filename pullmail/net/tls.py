"""
Certificates: load the configured pair, or make a self-signed one on first
start (``[tls] generate``).  Contexts refuse anything older than TLS 1.2.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

from pullmail.storage.durable import write_atomically

__all__ = [
    "ensure_certificate", "server_context", "client_context", "self_signed_pair", "OutboundTLS",
]


def self_signed_pair(hostname: str, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A P-256 key and a certificate for C{hostname}, valid ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(certificate: Path, key: Path, hostname: str, generate: bool) -> bool:
    """Make the pair if missing and allowed; True when one was made."""
    if certificate.is_file() and key.is_file():
        return False
    if not generate:
        raise FileNotFoundError(f"TLS certificate or key missing: {certificate}, {key}")
    cert_pem, key_pem = self_signed_pair(
        hostname, datetime.datetime.now(datetime.timezone.utc)
    )
    for path in (certificate, key):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(key, key_pem, mode=0o600)
    write_atomically(certificate, cert_pem, mode=0o644)
    return True


def server_context(certificate: Path, key: Path) -> ssl.CertificateOptions:
    """The first certificate of the file is ours; the rest is its chain."""
    chain = x509.load_pem_x509_certificates(certificate.read_bytes())
    return ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(key.read_bytes(), password=None),
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def client_context() -> ssl.CertificateOptions:
    """
    Opportunistic outbound TLS (RFC 7435): encrypt whenever the peer offers
    STARTTLS, without judging its certificate.
    """
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2)


class OutboundTLS:
    """
    The outbound TLS policy (``[delivery] tls``): "opportunistic" encrypts
    when offered; "verify" requires STARTTLS and a certificate valid for the
    MX host name (service-identity, RFC 6125), checked against C{ca_file}
    or the system's trust store; anything less defers the mail.
    """

    def __init__(self, mode: str, ca_file: Path | None = None) -> None:
        self.mode = mode
        self.required = mode == "verify"
        self._opportunistic = client_context()
        self._trust = (
            ssl.Certificate.loadPEM(ca_file.read_bytes()) if ca_file else ssl.platformTrust()
        ) if self.required else None

    def options_for(self, host: str):
        if not self.required:
            return self._opportunistic
        return ssl.optionsForClientTLS(
            host, trustRoot=self._trust, extraCertificateOptions={
                "raiseMinimumTo": TLSVersion.TLSv1_2,
            }
        )
