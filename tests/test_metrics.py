"""
Tests for L{pullmail.node.metrics}: log events counted through the one
table, bounded labels, queue gauges read from memory.
"""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import Logger

from pullmail.node.metrics import EVENT_METRICS, Metrics, MetricsObserver, QueueCollector
from pullmail.storage.outbox import OutboxEntry
from pullmail.storage.pending import Notification


def values(metrics: Metrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def emit(observer, **fields) -> None:
    Logger(namespace="pullmail.test", observer=observer).info("x", **fields)


def test_events_become_counts():
    metrics = Metrics()
    observer = MetricsObserver(metrics)
    emit(observer, event="accepted", service="submission", peer="192.0.2.1")
    emit(observer, event="accepted", service="retrieval")
    emit(observer, event="accepted", service="evil.example")
    emit(observer, event="command-rejected", code=550)
    emit(observer, event="reply", code=250)
    emit(observer, event="reply", code="250; drop")
    emit(observer, event="delivered", seconds=2.5)
    emit(observer, event="retr-served", seconds=700.0)
    emit(observer, event="bounced", action="failed")
    emit(observer, event="bounced", action="delayed")
    emit(observer, event="session-failed", error="SSL routines: certificate verify failed")
    emit(observer, event="session-failed", error="connection refused")
    emit(observer, event="session-tls", tls="TLS, certificate verified")
    emit(observer, event="retrieved")
    emit(observer, event="notification-accepted")
    emit(observer, event="notification-refused", code=451)
    emit(observer, event="notification-refused", code=550)
    emit(observer, event="dns-temperror", rdtype="MX")
    emit(observer, event="spf", result="temperror")
    emit(observer, event="no-such-event", service="smtp")   # not in the table
    found = values(metrics)
    assert found[("pullmail_messages_accepted_total", (("service", "submission"),))] == 1
    assert found[("pullmail_messages_accepted_total", (("service", "retrieval"),))] == 1
    assert found[("pullmail_messages_accepted_total", (("service", "other"),))] == 1
    assert ("pullmail_messages_accepted_total", (("service", "smtp"),)) not in found
    # A refused GDEL's one event counts its reply too: 550 twice, 451 once.
    assert found[("pullmail_replies_total", (("code", "550"),))] == 2
    assert found[("pullmail_replies_total", (("code", "451"),))] == 1
    assert found[("pullmail_replies_total", (("code", "250"),))] == 1
    assert found[("pullmail_replies_total", (("code", "other"),))] == 1
    assert found[("pullmail_deliveries_total", (("result", "delivered"),))] == 1
    assert found[("pullmail_deliveries_total", (("result", "retrieved"),))] == 1
    assert found[("pullmail_deliveries_total", (("result", "bounced"),))] == 1
    assert found[("pullmail_deliveries_total", (("result", "delay-warned"),))] == 1
    assert found[("pullmail_tls_total", (("direction", "outbound"), ("result", "failed")))] == 1
    assert found[("pullmail_tls_total", (("direction", "outbound"), ("result", "verified")))] == 1
    assert found[("pullmail_retrievals_total", (("result", "retrieved"),))] == 1
    assert found[("pullmail_gdel_total", (("verdict", "accepted"),))] == 1
    assert found[("pullmail_gdel_total", (("verdict", "deferred"),))] == 1
    assert found[("pullmail_gdel_total", (("verdict", "refused"),))] == 1
    assert found[("pullmail_dns_temperrors_total", (("rdtype", "MX"),))] == 1
    assert found[("pullmail_spf_total", (("result", "temperror"),))] == 1
    assert found[("pullmail_delivery_seconds_count", ())] == 2
    assert found[("pullmail_delivery_seconds_sum", ())] == 702.5


def test_every_rule_names_a_counter():
    metrics = Metrics()
    for rules in EVENT_METRICS.values():
        for rule in rules:
            assert rule.metric in metrics.counters


def test_registries_are_per_node():
    first, second = Metrics(), Metrics()
    emit(MetricsObserver(first), event="notification-accepted")
    assert values(first)[("pullmail_gdel_total", (("verdict", "accepted"),))] == 1
    assert ("pullmail_gdel_total", (("verdict", "accepted"),)) not in values(second)


class _Outbox:
    def __init__(self, entries):
        self._entries = entries

    def entries(self):
        return iter(list(self._entries))


class _Drop:
    waiting = 3


def test_queue_gauges():
    def entry(state, held=False):
        return OutboxEntry(id="x", queue_id="q", sender="", domain="d.test", recipients=[],
                           created=0.0, size=1, state=state, held=held)

    def notification(state, held=False):
        return Notification(gdel_id="g", origin="o", peer="p", helo="h", sender=None,
                            recipients=None, notified_at=0.0, state=state, held=held)

    metrics = Metrics()
    metrics.registry.register(QueueCollector(
        _Outbox([entry("queued"), entry("queued", held=True), entry("notified")]),
        [notification("pending"), notification("retrieved")], _Drop()))
    found = values(metrics)
    gauge = "pullmail_queue_messages"
    assert {q: found[(gauge, (("queue", q),))] for q in
            ("push", "outbox", "pending", "held", "maildrop")} == {
        "push": 2, "outbox": 1, "pending": 1, "held": 1, "maildrop": 3}


def test_the_table_speaks_the_vocabulary():
    """Every event the metrics count is one the node emits (pullmail.maillog)."""
    from pullmail.maillog import VOCABULARY

    assert set(EVENT_METRICS) <= set(VOCABULARY)


def test_repeated_events_add_up():
    """Each event counts, the labelled counters being made once and kept."""
    metrics = Metrics()
    observer = MetricsObserver(metrics)
    for _ in range(3):
        emit(observer, event="reply", code=250)
        emit(observer, event="accepted", service="smtp")
    emit(observer, event="reply", code=550)
    found = values(metrics)
    assert found[("pullmail_replies_total", (("code", "250"),))] == 3
    assert found[("pullmail_replies_total", (("code", "550"),))] == 1
    assert found[("pullmail_messages_accepted_total", (("service", "smtp"),))] == 3
