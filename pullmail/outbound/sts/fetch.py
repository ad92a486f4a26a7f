"""
Fetching an MTA-STS policy (RFC 8461 3.3): ``GET
https://mta-sts.<domain>/.well-known/mta-sts.txt`` with twisted.web's
L{Agent}, the certificate verified for that name against the system's
trust store plus ``[delivery] tls_ca``.

The name is resolved through the node's own resolver and the connection
goes to the address it returned, on ``[delivery] mta_sts_port``; only the
certificate check uses the name.  Redirects are not followed, only a
``200`` with ``Content-Type: text/plain`` counts, the body is cut off at
L{MAX_POLICY_SIZE}, and the whole fetch has L{FETCH_TIMEOUT}.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from pullmail.net.tls import verifying_options
from pullmail.outbound.sts.policy import MAX_POLICY_SIZE

__all__ = ["FETCH_TIMEOUT", "FetchError", "PolicyFetcher", "check_response", "policy_url"]

# RFC 8461 3.3 leaves the limit to the sender; a minute covers a slow
# server without holding a delivery attempt for long.
FETCH_TIMEOUT = 60.0
POLICY_PATH = "/.well-known/mta-sts.txt"


class FetchError(Exception):
    """No policy could be had from the policy host."""


def policy_url(domain: str, port: int) -> bytes:
    netloc = f"mta-sts.{domain}" + ("" if port == 443 else f":{port}")
    return f"https://{netloc}{POLICY_PATH}".encode("ascii")


def check_response(code: int, content_types: list[bytes], length: int | None) -> None:
    """
    RFC 8461 3.3: a redirect is not followed, only 200 counts, and the
    media type must be ``text/plain`` (parameters such as a charset allowed).

    @raise FetchError: the response carries no policy.
    """
    if 300 <= code < 400:
        raise FetchError(f"HTTP {code}: a redirect, which MTA-STS does not follow")
    if code != 200:
        raise FetchError(f"HTTP {code}")
    media = [value.split(b";", 1)[0].strip().lower() for value in content_types]
    if media != [b"text/plain"]:
        shown = b", ".join(content_types).decode("latin-1")[:80] or "none"
        raise FetchError(f"Content-Type {shown!r} is not text/plain")
    if length is not None and length > MAX_POLICY_SIZE:
        raise FetchError(f"policy of {length} octets is over {MAX_POLICY_SIZE}")


class _CappedBody(Protocol):
    """Collects a response body, giving up once it passes C{limit} octets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.finished: defer.Deferred = defer.Deferred(lambda _: self._stop())
        self._chunks: list[bytes] = []
        self._size = 0

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self.limit:
            self._stop()
            self.finished.errback(FetchError(f"policy over {self.limit} octets"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(FetchError(f"body cut off: {reason.getErrorMessage()}"))


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Every request goes to one address, over TLS verified for one name."""

    def __init__(self, reactor, address: str, port: int, tls, timeout: float,
                 bind_address: str) -> None:
        self._reactor, self._address, self._port = reactor, address, port
        self._tls, self._timeout, self._bind = tls, timeout, bind_address

    def endpointForURI(self, uri):
        ip = ipaddress.ip_address(self._address)
        kind = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
        bind = None
        if self._bind and ipaddress.ip_address(self._bind).version == ip.version:
            bind = (self._bind, 0)
        tcp = kind(self._reactor, self._address, self._port, timeout=self._timeout,
                   bindAddress=bind)
        return endpoints.wrapClientTLS(self._tls, tcp)


class PolicyFetcher:
    """C{fetch(domain)} -> Deferred of the policy file's bytes, or L{FetchError}."""

    def __init__(self, reactor, resolver, port: int, trust, bind_address: str = "",
                 timeout: float = FETCH_TIMEOUT) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.port = port
        self.trust = trust
        self.bind_address = bind_address
        self.timeout = timeout

    def fetch(self, domain: str) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(self._fetch(domain))
        return d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._timed_out)

    @staticmethod
    def _timed_out(result, timeout: float):
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise FetchError(f"no policy within {timeout:g} s")
        return result

    async def _fetch(self, domain: str) -> bytes:
        host = f"mta-sts.{domain}"
        addresses = await self.resolver.addresses(host)
        if not addresses:
            raise FetchError(f"{host} has no address")
        errors = []
        for address in addresses:
            try:
                return await self._get(host, address, domain)
            except FetchError:
                raise
            except Exception as e:  # connection refused, TLS failure ...: the next address
                errors.append(f"{address}: {e.__class__.__name__}: {e}")
        raise FetchError("; ".join(errors))

    async def _get(self, host: str, address: str, domain: str) -> bytes:
        agent = Agent.usingEndpointFactory(
            self.reactor,
            _PinnedEndpoints(self.reactor, address, self.port,
                             verifying_options(host, self.trust), self.timeout,
                             self.bind_address),
            pool=HTTPConnectionPool(self.reactor, persistent=False),
        )
        response = await agent.request(b"GET", policy_url(domain, self.port),
                                       Headers({b"User-Agent": [b"pullmail MTA-STS"]}))
        body = _CappedBody(MAX_POLICY_SIZE)
        try:
            check_response(response.code, response.headers.getRawHeaders(b"content-type", []),
                           None if response.length is UNKNOWN_LENGTH else response.length)
        except FetchError:
            body.limit = -1  # read nothing: the connection is dropped
            response.deliverBody(body)
            body.finished.addErrback(lambda _: None)
            raise
        response.deliverBody(body)
        return await body.finished
