"""
DKIM signing keys (SPEC 11.1): one key pair per local domain and algorithm,
in ``<key_dir>/<domain>.<selector>-rsa.pem`` and ``…-ed25519.pem``; the DNS
records that publish them; making the missing ones.  An existing key is
never overwritten: a rotation is a new selector.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pullmail.config import DKIMConfig

__all__ = ["SigningKey", "ensure_keys", "load_keys", "dns_record", "txt_strings"]

# RFC 8301 3.2: signers MUST use at least 1024 bits, SHOULD use 2048.
RSA_BITS = 2048
# RFC 1035 3.3.14: a TXT record is a list of <character-string>s of <= 255 octets.
MAX_STRING = 255


@dataclass(frozen=True)
class SigningKey:
    """One loaded key: what dkimpy's signer takes, and the public half."""

    domain: str
    selector: str
    algorithm: str          # "rsa-sha256" | "ed25519-sha256"
    private: object         # cryptography's private key: signs in OpenSSL
    pem: bytes              # PKCS#1 PEM for dkimpy's ARC sealer (RSA only)
    public: bytes           # the record's p= value, base64

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."

    @property
    def record_value(self) -> str:
        kind = "rsa" if self.algorithm.startswith("rsa") else "ed25519"
        return f"v=DKIM1; k={kind}; p={self.public.decode('ascii')}"


def txt_strings(value: str) -> str:
    """The zone-file form of a TXT value: quoted strings of <= 255 octets."""
    data = value.encode("ascii")
    parts = [data[i: i + MAX_STRING].decode("ascii") for i in range(0, len(data), MAX_STRING)]
    return " ".join(f'"{part}"' for part in parts)


def dns_record(key: SigningKey) -> str:
    """``pm1-rsa._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=…" "…"``."""
    return f"{key.record_name} IN TXT {txt_strings(key.record_value)}"


def _generate(algorithm: str) -> bytes:
    if algorithm.startswith("rsa"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        # PKCS#1 ("RSA PRIVATE KEY"): what dkimpy and OpenDKIM both read.
        form = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        form = serialization.PrivateFormat.PKCS8
    return private.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def _write_new(path: Path, data: bytes) -> bool:
    """Create C{path} (0600) with C{data}; False when it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)     # fails when the key exists: never overwritten
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def _load(config: DKIMConfig, domain: str, algorithm: str) -> SigningKey:
    pem = config.key_path(domain, algorithm).read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    if algorithm.startswith("rsa"):
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError(f"{config.key_path(domain, algorithm)} is not an RSA key")
        if private.key_size < 1024:
            raise ValueError(f"{config.key_path(domain, algorithm)}: RSA key under 1024 bits"
                             " (RFC 8301)")
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{config.key_path(domain, algorithm)} is not an Ed25519 key")
        pem = b""
        # RFC 8463 4.2: p= is the bare 32-octet public key.
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(domain, config.selector_for(algorithm), algorithm, private, pem,
                      base64.b64encode(public))


def ensure_keys(config: DKIMConfig, domains: Iterable[str]) -> list[SigningKey]:
    """Blocking: make each missing key of C{domains}; the keys made."""
    made = []
    for domain in domains:
        for algorithm in config.algorithms:
            path = config.key_path(domain, algorithm)
            if not path.exists() and _write_new(path, _generate(algorithm)):
                made.append(_load(config, domain, algorithm))
    return made


def load_keys(config: DKIMConfig, domains: Iterable[str]) -> dict[str, list[SigningKey]]:
    """
    Blocking, once at start: every configured key of C{domains}, by domain
    (a domain without a key file is left out).

    @raise ValueError: a key file that is not a key of its algorithm.
    """
    keys: dict[str, list[SigningKey]] = {}
    for domain in domains:
        for algorithm in config.algorithms:
            if config.key_path(domain, algorithm).is_file():
                keys.setdefault(domain, []).append(_load(config, domain, algorithm))
    return keys
