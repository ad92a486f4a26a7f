"""
Tests for L{pullmail.net.tls}: self-signed pairs and server contexts.
"""

from __future__ import annotations

import datetime
import stat
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from pullmail.net.tls import (
    ObservedTLS,
    SystemTrust,
    ensure_certificate,
    self_signed_pair,
    server_context,
    verifying_options,
)

NOW = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """Shuttle bytes between two memory-BIO connections until both are done."""
    done = {server: False, client: False}
    for _ in range(50):
        for conn in (client, server):
            if not done[conn]:
                try:
                    conn.do_handshake()
                    done[conn] = True
                except SSL.WantReadError:
                    pass
        for source, sink in ((client, server), (server, client)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


class SelfSignedTests:
    @pytest.fixture(autouse=True)
    def _files(self, tmp_path):
        self.dir = tmp_path
        self.cert, self.key = self.dir / "tls" / "cert.pem", self.dir / "tls" / "key.pem"

    def test_pair(self):
        """The pair names the host and is valid from the given time on."""
        cert_pem, key_pem = self_signed_pair("mx.example.org", NOW)
        certificate = x509.load_pem_x509_certificate(cert_pem)
        common_name = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        assert common_name[0].value == "mx.example.org"
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["mx.example.org"]
        assert certificate.not_valid_before_utc <= NOW
        assert certificate.not_valid_after_utc > NOW + datetime.timedelta(days=365)
        assert b"PRIVATE KEY" in key_pem

    def test_generate(self):
        """Missing files are made once, key private, and load as a context."""
        assert ensure_certificate(self.cert, self.key, "mx.example.org", True)
        assert stat.S_IMODE(self.key.stat().st_mode) == 0o600
        first = self.cert.read_bytes()
        assert not ensure_certificate(self.cert, self.key, "mx.example.org", True)
        assert self.cert.read_bytes() == first
        assert server_context(self.cert, self.key).getContext() is not None

    def test_no_generate(self):
        """With generate off, missing files are an error and nothing is made."""
        with pytest.raises(FileNotFoundError):
            ensure_certificate(self.cert, self.key, "mx.example.org", False)
        assert not self.cert.exists()


class ContextTests:
    @pytest.fixture(autouse=True)
    def _context(self, tmp_path):
        folder = tmp_path
        self.cert, self.key = folder / "c.pem", folder / "k.pem"
        ensure_certificate(self.cert, self.key, "mx.example.org", True)
        self.context = server_context(self.cert, self.key).getContext()

    def client(self, version=None) -> SSL.Connection:
        ctx = SSL.Context(SSL.TLS_METHOD)
        if version is not None:
            ctx.set_min_proto_version(version)
            ctx.set_max_proto_version(version)
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        return conn

    def server(self) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_accept_state()
        return conn

    def test_old_versions_disabled(self):
        """The context sets the options that refuse TLS 1.0 and 1.1."""
        options = self.context.set_options(0)
        assert options & SSL.OP_NO_TLSv1
        assert options & SSL.OP_NO_TLSv1_1

    def test_handshake_tls12(self):
        """A TLS 1.2 client completes a handshake."""
        server, client = self.server(), self.client(SSL.TLS1_2_VERSION)
        _handshake(server, client)
        assert server.get_protocol_version_name() == "TLSv1.2"

    def test_handshake_tls11_refused(self):
        """A TLS 1.1 client is refused."""
        server, client = self.server(), self.client(SSL.TLS1_1_VERSION)
        with pytest.raises(SSL.Error):
            _handshake(server, client)

    def test_chain_is_served(self):
        """A full-chain file (ours, then an intermediate) sends both to the client."""
        intermediate, _ = self_signed_pair("intermediate.example.org", NOW)
        self.cert.write_bytes(self.cert.read_bytes() + intermediate)
        self.context = server_context(self.cert, self.key).getContext()
        server, client = self.server(), self.client()
        _handshake(server, client)
        names = [
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            for cert in client.get_peer_cert_chain(as_cryptography=True)
        ]
        assert names == ["mx.example.org", "intermediate.example.org"]


# -- verifying peers: SystemTrust, verifying_options, ObservedTLS ----------------------


class _TLSProtocol:
    """What Twisted's connection creators ask of the TLS protocol they serve."""

    def __init__(self) -> None:
        self.failures: list = []
        self.factory = SimpleNamespace(wrappedFactory=object())

    def failVerification(self, reason) -> None:
        self.failures.append(reason)


@pytest.fixture
def peer_pair(tmp_path):
    """A server certificate for mx.example.org, and a CA file that trusts it."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ensure_certificate(cert, key, "mx.example.org", True)
    return cert, key


def _connect(creator, cert, key) -> tuple[SSL.Connection, SSL.Connection]:
    server = SSL.Connection(server_context(cert, key).getContext(), None)
    server.set_accept_state()
    client = creator.clientConnectionForTLS(_TLSProtocol())
    client.set_connect_state()
    return server, client


@pytest.mark.parametrize("host, trusted, verified, problem", [
    ("mx.example.org", True, True, ""),
    ("MX.Example.ORG", True, True, ""),
    ("other.example.org", True, False, "not valid for other.example.org"),
    ("mx.example.org", False, False, "certificate verify failed"),
])
def test_observed_tls_records_but_never_refuses(peer_pair, host, trusted, verified, problem):
    """MTA-STS testing mode: the handshake completes; the verdict is kept."""
    cert, key = peer_pair
    observed = ObservedTLS(host, SystemTrust(cert if trusted else None))
    _handshake(*_connect(observed, cert, key))
    assert observed.verified is verified
    assert problem in observed.problem


def test_verifying_options_trust_the_ca_file_besides_the_system(peer_pair):
    cert, key = peer_pair
    server, client = _connect(verifying_options("mx.example.org", SystemTrust(cert)), cert, key)
    _handshake(server, client)
    with pytest.raises(SSL.Error):
        _handshake(*_connect(verifying_options("mx.example.org", SystemTrust()), cert, key))
    other = verifying_options("other.example.org", SystemTrust(cert))
    server, client = _connect(other, cert, key)
    with pytest.raises(SSL.Error):
        _handshake(server, client)


def test_system_trust_adds_the_default_paths(peer_pair):
    """Besides the file, the system's store: its default verify paths are loaded."""
    calls = []

    class Context:
        def set_default_verify_paths(self):
            calls.append("system")

        def load_verify_locations(self, path):
            calls.append(path)

    SystemTrust(peer_pair[0])._addCACertsToContext(Context())
    SystemTrust()._addCACertsToContext(Context())
    assert calls == ["system", str(peer_pair[0]), "system"]
