"""
Prometheus metrics (SPEC 11.4), counted from the node's own log events.

The node already emits one twisted.logger event per outcome, each defined
once in L{pullmail.maillog} (SPEC 9).  L{MetricsObserver} maps those events
to counters through one table, L{EVENT_METRICS}, so no increment is
scattered through the code.  Queue sizes are read
from the in-memory indexes at scrape time (L{QueueCollector}), never from
the disk.  Every label value is taken from a closed set: a peer's address or
a domain is never a label (Prometheus keeps one series per label value).

Each node has its own L{CollectorRegistry}; nothing here is module-level
mutable state.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.logger import ILogObserver
from zope.interface import implementer

from pullmail import maillog
from pullmail.storage.outbox import NOTIFIED
from pullmail.storage.pending import PENDING

__all__ = ["EVENT_METRICS", "Metrics", "MetricsObserver", "QueueCollector", "metrics_site"]

SERVICES = frozenset({"smtp", "submission", "submissions", "retrieval", "sendmail"})
SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
RDTYPES = frozenset({"A", "AAAA", "MX", "TXT", "PTR"})
# Seconds from arrival to delivery: a minute's push to days of waiting for RETR.
DELIVERY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)


def _one_of(value: object, allowed: frozenset[str], other: str = "other") -> str:
    return value if isinstance(value, str) and value in allowed else other


def _code(event: Mapping) -> str:
    code = event.get("code")
    return str(code) if isinstance(code, int) and 200 <= code < 600 else "other"


def _tls_outcome(event: Mapping) -> str:
    text = str(event.get("tls", ""))
    if text.startswith("no TLS"):
        return "plain"
    return "verified" if "verified" in text else "ok"


def _tls_failed(event: Mapping) -> bool:
    error = str(event.get("error", "")).upper()
    return "TLS" in error or "SSL" in error or "CERTIFICATE" in error


@dataclass(frozen=True)
class Rule:
    """One count for one event: C{metric} with C{labels(event)}; skipped when C{when} says no."""

    metric: str
    labels: Callable[[Mapping], dict[str, str]]
    when: Callable[[Mapping], bool] = lambda event: True


def _fixed(**labels: str) -> Callable[[Mapping], dict[str, str]]:
    return lambda event: labels


# Vocabulary event -> the counts it makes (each event name has one
# meaning, pullmail.maillog, so the name alone says what happened).
_REPLY_CODE = (Rule("replies", lambda e: {"code": _code(e)}),)
_RULES: dict[maillog.Event, tuple[Rule, ...]] = {
    maillog.ACCEPTED: (
        Rule("messages_accepted", lambda e: {"service": _one_of(e.get("service"), SERVICES)}),
    ),
    maillog.COMMAND_REJECTED: _REPLY_CODE,
    maillog.COMMAND: _REPLY_CODE,
    maillog.REPLY: _REPLY_CODE,
    maillog.CONNECTION_REFUSED: _REPLY_CODE,
    maillog.PREGREET: _REPLY_CODE,
    maillog.TLS_STARTED: (Rule("tls", _fixed(direction="inbound", result="ok")),),
    maillog.TLS_TIMEOUT: (Rule("tls", _fixed(direction="inbound", result="failed")),),
    maillog.DELIVERED: (Rule("deliveries", _fixed(result="delivered")),),
    maillog.RETR_SERVED: (Rule("deliveries", _fixed(result="retrieved")),),
    maillog.DEFERRED: (Rule("deliveries", _fixed(result="deferred")),),
    maillog.OUTBOX_EXPIRED: (Rule("deliveries", _fixed(result="expired")),),
    maillog.PUSH_EXPIRED: (Rule("deliveries", _fixed(result="expired")),),
    maillog.BOUNCED: (
        Rule("deliveries", _fixed(result="bounced"), lambda e: e.get("action") == "failed"),
        Rule("deliveries", _fixed(result="delay-warned"), lambda e: e.get("action") == "delayed"),
    ),
    maillog.LOCAL_BOUNCED: (
        Rule("deliveries", _fixed(result="bounced"), lambda e: e.get("action") == "failed"),
    ),
    maillog.SESSION_TLS: (
        Rule("tls", lambda e: {"direction": "outbound", "result": _tls_outcome(e)}),
    ),
    maillog.SESSION_FAILED: (
        Rule("tls", _fixed(direction="outbound", result="failed"), _tls_failed),
    ),
    maillog.NOTIFICATION_ACCEPTED: (Rule("gdel", _fixed(verdict="accepted")),),
    # A refused GDEL is logged once, as this (not command-rejected too).
    maillog.NOTIFICATION_REFUSED: (
        Rule("gdel", lambda e: {"verdict": "deferred" if _code(e).startswith("4")
                                else "refused"}),
        *_REPLY_CODE,
    ),
    maillog.RETRIEVED: (Rule("retrievals", _fixed(result="retrieved")),),
    maillog.DUPLICATE_DROPPED: (Rule("retrievals", _fixed(result="duplicate")),),
    maillog.RETRIEVAL_DEFERRED: (Rule("retrievals", _fixed(result="deferred")),),
    maillog.NOTIFICATION_DROPPED: (Rule("retrievals", _fixed(result="dropped")),),
    maillog.SPF: (
        Rule("spf", lambda e: {"result": _one_of(e.get("result"), SPF_RESULTS)}),
    ),
    maillog.DNS_TEMPERROR: (
        Rule("dns_temperrors", lambda e: {"rdtype": _one_of(e.get("rdtype"), RDTYPES)}),
    ),
}
EVENT_METRICS: Mapping[str, tuple[Rule, ...]] = MappingProxyType(
    {event.name: rules for event, rules in _RULES.items()})
# Observed into pullmail_delivery_seconds from the event's ``seconds`` field.
TIMED_EVENTS = frozenset({maillog.DELIVERED.name, maillog.RETR_SERVED.name})


class Metrics:
    """The node's registry and its counters (names from SPEC 11.4)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(f"pullmail_{name}", documentation, labels, registry=self.registry)

        self.counters: dict[str, Counter] = {
            "messages_accepted": counter(
                "messages_accepted", "Messages stored, by the service that took them.",
                "service"),
            "replies": counter("replies", "SMTP replies sent, by three-digit code.", "code"),
            "deliveries": counter(
                "deliveries", "Outbound outcomes: delivered (push), retrieved (by the "
                "recipient's server), deferred, expired, bounced, delay-warned.", "result"),
            "gdel": counter("gdel", "GDEL notifications received, by verdict.", "verdict"),
            "retrievals": counter(
                "retrievals", "Retrievals (RETR) of notified mail, by result.", "result"),
            "tls": counter("tls", "TLS sessions and failures.", "direction", "result"),
            "spf": counter("spf", "SPF checks of incoming mail, by result.", "result"),
            "dns_temperrors": counter(
                "dns_temperrors", "DNS lookups that failed temporarily.", "rdtype"),
        }
        self.delivery_seconds = Histogram(
            "pullmail_delivery_seconds", "Time from arrival to delivery or retrieval.",
            buckets=DELIVERY_BUCKETS, registry=self.registry,
        )


@implementer(ILogObserver)
class MetricsObserver:
    """A log observer counting the events of L{EVENT_METRICS}."""

    def __init__(self, metrics: Metrics, table=EVENT_METRICS) -> None:
        self.metrics = metrics
        self.table = table
        # (metric, labels) -> its labelled counter: prometheus_client's
        # labels() costs more than the count; label values come from
        # closed sets, so this stays small.
        self._children: dict[tuple, object] = {}

    def __call__(self, event: Mapping) -> None:
        key = event.get("event")
        rules = self.table.get(key)
        if rules is None:
            return
        for rule in rules:
            if rule.when(event):
                self._child(rule.metric, rule.labels(event)).inc()
        seconds = event.get("seconds")
        if key in TIMED_EVENTS and isinstance(seconds, (int, float)) and seconds >= 0:
            self.metrics.delivery_seconds.observe(seconds)


    def _child(self, metric: str, labels: dict[str, str]):
        key = (metric, tuple(labels.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metrics.counters[metric].labels(**labels)
        return child


class QueueCollector:
    """
    ``pullmail_queue_messages{queue}`` read from the in-memory indexes at
    each scrape: outbox (notified, waiting for RETR), push (waiting for an
    attempt), pending (notifications to retrieve), held (any of them, held
    by the operator), maildrop (sendmail messages not yet taken in).
    """

    def __init__(self, outbox, pending, maildrop=None) -> None:
        self.outbox = outbox
        self.pending = pending
        self.maildrop = maildrop

    def collect(self):
        counts = {"outbox": 0, "push": 0, "pending": 0, "held": 0, "maildrop": 0}
        for entry in self.outbox.entries():
            counts["outbox" if entry.state == NOTIFIED else "push"] += 1
            counts["held"] += bool(getattr(entry, "held", False))
        for notification in self.pending:
            if notification.state == PENDING:
                counts["pending"] += 1
                counts["held"] += bool(getattr(notification, "held", False))
        if self.maildrop is not None:
            counts["maildrop"] = self.maildrop.waiting
        family = GaugeMetricFamily("pullmail_queue_messages", "Messages queued, by queue.",
                                   labels=["queue"])
        for queue, count in counts.items():
            family.add_metric([queue], count)
        yield family


def metrics_site(registry: CollectorRegistry):
    """A twisted.web site serving C{GET /metrics} (text, or OpenMetrics by Accept)."""
    # Imported here: prometheus_client.twisted imports the global reactor.
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    site = Site(root)
    site.log = lambda request: None   # a scrape is not worth a log line
    return site
