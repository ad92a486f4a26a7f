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
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl

# Twisted offers no public way to trust the system store and a file at once.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import TLSVersion
from zope.interface import implementer

from pullmail.storage.durable import write_atomically

__all__ = [
    "ensure_certificate", "server_context", "client_context", "self_signed_pair", "OutboundTLS",
    "SystemTrust", "verifying_options", "ObservedTLS",
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


@implementer(IOpenSSLTrustRoot)
class SystemTrust:
    """
    The system's trust store, and besides it the CA certificates in
    C{ca_file} when one is given (``[delivery] tls_ca``, SPEC 11.2): a
    private CA can vouch for some peers without distrusting the public ones.
    """

    def __init__(self, ca_file: Path | None = None) -> None:
        self.ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self.ca_file is not None:
            context.load_verify_locations(str(self.ca_file))


def verifying_options(host: str, trust) -> IOpenSSLClientConnectionCreator:
    """TLS 1.2 or later, a chain to C{trust} and a certificate valid for C{host} (RFC 6125)."""
    return ssl.optionsForClientTLS(
        host, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
    )


@implementer(IOpenSSLClientConnectionCreator)
class ObservedTLS:
    """
    The checks of L{verifying_options}, made but not enforced: the
    handshake succeeds whatever the certificate, and C{verified} tells
    afterwards whether it would have passed (C{problem} says why not).
    MTA-STS ``testing`` mode (RFC 8461 5) delivers either way and reports.
    One instance serves one connection.
    """

    def __init__(self, host: str, trust) -> None:
        self._host = host
        self._options = verifying_options(host, trust)
        self.verified: bool | None = None
        self.problem = ""

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER, self._observe)
        return connection

    def _observe(self, connection, certificate, errno: int, depth: int, ok: int) -> bool:
        # OpenSSL calls this for each certificate of the chain, the leaf last.
        if not ok and self.verified is not False:
            self.verified = False
            self.problem = f"certificate verify failed (X509 error {errno}, depth {depth})"
        elif depth == 0 and self.verified is None:
            try:
                verify_service_identity(extract_patterns(certificate), [DNS_ID(self._host)], [])
            except VerificationError as e:
                self.verified, self.problem = False, f"certificate not valid for {self._host}: {e}"
            else:
                self.verified = True
        return True


class OutboundTLS:
    """
    The outbound TLS policy (``[delivery] tls``): "opportunistic" encrypts
    when offered; "verify" requires STARTTLS and a certificate valid for the
    MX host name (service-identity, RFC 6125), checked against the
    system's trust store and C{ca_file}; anything less defers the mail.
    """

    def __init__(self, mode: str, ca_file: Path | None = None) -> None:
        self.mode = mode
        self.required = mode == "verify"
        self._opportunistic = client_context()
        self._trust = SystemTrust(ca_file)

    def options_for(self, host: str):
        if not self.required:
            return self._opportunistic
        return verifying_options(host, self._trust)
