"""
The node's log vocabulary: every mail event pullmail emits, defined once.

Each L{Event} has one name (the C{event} field of the twisted.logger event,
with one meaning), one format, and so one set of fields: the names in its
format.  Code emits an event by calling it with those fields, and the
metrics, the tests and the operator's log searches all read the same names.
Diagnostics that are not mail events (a traceback, a start-up line) are
plain log calls.

"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from types import MappingProxyType

from twisted.logger import Logger, LogLevel

__all__ = ["Event", "VOCABULARY"]  # and one constant per event, below


@dataclass(frozen=True)
class Event:
    """One kind of mail event: its name, its level and its format."""

    name: str
    format: str
    level: LogLevel = LogLevel.info
    extras: tuple[str, ...] = ()     # fields beyond the format's, for metrics and searches
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = {f.split(".")[0].split("[")[0].split("!")[0]
                 for _, f, _, _ in string.Formatter().parse(self.format) if f}
        object.__setattr__(self, "fields", frozenset(names) | frozenset(self.extras))

    def __call__(self, log: Logger, **fields: object) -> None:
        """Emit this event on C{log}; the fields must be exactly the format's."""
        if fields.keys() != self.fields:
            missing = sorted(self.fields - fields.keys())
            extra = sorted(fields.keys() - self.fields)
            raise TypeError(f"event {self.name}: missing {missing}, unexpected {extra}")
        log.emit(self.level, self.format, event=self.name, **fields)


def _vocabulary(*events: Event) -> MappingProxyType:
    table: dict[str, Event] = {}
    for event in events:
        if event.name in table:
            raise ValueError(f"two events named {event.name}")
        table[event.name] = event
    return MappingProxyType(table)


# -- Connections and commands (smtp/) ----------------------------------------------------

STOP_DRAINING = Event(
    "stop-draining",
    "stopping: no new connections or commands; waiting up to {grace} s for {requests}"
    " requests in flight on {connections} connections",
)
STOP_DRAINED = Event(
    "stop-drained",
    "stopping: nothing in flight after {waited} s ({connections} connections still closing)",
)
STOP_CUT_OFF = Event(
    "stop-cut-off",
    "stopping: {requests} requests still in flight after {waited} s are cut off",
    LogLevel.warn,
)
IDLE_TIMEOUT = Event("idle-timeout", "{what} for {peer}")
COMMAND_TIMEOUT = Event("command-timeout", "{what} for {peer}")
DATA_TIMEOUT = Event("data-timeout", "{what} for {peer}")
TLS_TIMEOUT = Event("tls-timeout", "TLS handshake timeout for {peer}")
# As the connection ends (after its place in the limits is given back).
CONNECTION = Event("connection", "connection from {peer} on {service}", extras=("messages",))
IMPROPER_PIPELINING = Event("improper-pipelining", "{peer} pipelined behind {verb}")
TLS_STARTED = Event("tls-started", "TLS started with {peer}")
TLS_INJECTION = Event(
    "tls-injection",
    "{peer} sent {count} octets behind its 220 to STARTTLS; dropping the session",
    LogLevel.warn,
)
TURN_ABORTED = Event("turn-aborted", "peer left during the reversed turn")
CONNECTION_REFUSED = Event(
    "connection-refused",
    "refused connection from {peer}: {reply}",
    extras=("code",),
)
PREGREET = Event("pregreet", "{peer} spoke before the greeting ended", extras=("code",))
BUDGET_SPENT = Event("budget-spent", "closing {peer}: {reply}", extras=("errors", "junk"))
COMMAND_REJECTED = Event("command-rejected", "{peer} {verb}: {reply}", extras=("code",))
COMMAND = Event("command", "{peer} {verb}: {code}")
REPLY = Event("reply", "{verb}: {code}", LogLevel.debug)

# -- Trust (trust/, net/) ----------------------------------------------------------------

SPF = Event("spf", "SPF {result} for {domain} from {peer}: {verdict}", extras=("explanation",))
POLICY_VETO = Event("policy-veto", "policy {name} refused {domain} from {peer}: {verdict}")
BLOCKED = Event(
    "blocked",
    "blocking {peer} for {seconds}s after {count} failed {what}s from {network}",
)
DNS_TEMPERROR = Event("dns-temperror", "DNS lookup failed: {error}", extras=("rdtype",))

# -- Accepted mail (inbound/) ------------------------------------------------------------

LMTP_FAILED = Event(
    "lmtp-failed",
    "LMTP delivery of {queue_id} to {where} failed: {error!r}",
    LogLevel.warn,
)
LMTP_DELIVERY = Event(
    "lmtp-delivery",
    "LMTP delivery of {queue_id} to {where}: delivered {delivered}, refused {refused}",
    extras=("in_doubt",),
)
LMTP_IN_DOUBT = Event(
    "lmtp-in-doubt",
    "LMTP delivery of {queue_id} to {where} cut off after the data ({error}): the store may"
    " have it or not for {recipients}; kept aside in {path}, not retried, not bounced; look"
    " in their mailboxes and re-send it if it is not there",
    LogLevel.error,
)
INJECTED = Event("injected", "injected {queue_id} from <{sender}> for {recipients}")
ACCEPTED = Event(
    "accepted",
    "accepted {queue_id} from <{sender}> for {recipients} ({size} bytes) via {peer}",
    extras=("delivered", "in_doubt", "local_bounced", "local_deferred", "queued", "service"),
)
LOCAL_REFUSED = Event(
    "local-refused",
    "local delivery of {queue_id} refused: {reply}",
    extras=("refused",),
)
MAIL_LOOP = Event("mail-loop", "refused {queue_id} from {peer}: {reply}", LogLevel.warn)
STORE_FAILED = Event("store-failed", "storing {queue_id} failed: {error}", LogLevel.error)

# -- Outbound delivery and bounces (outbound/): the SMTA"s side --------------------------

BOUNCED = Event("bounced", "{action} DSN for {queue_id} to <{sender}>: {recipients} {status}")
BOUNCE_OF_BOUNCE_DROPPED = Event("bounce-of-bounce-dropped", "not bouncing a bounce: {id}")
BOUNCE_UNAUTHORISED_DROPPED = Event(
    "bounce-unauthorised-dropped",
    "not bouncing {queue_id} to <{sender}>: SPF does not authorise {origin}",
)
QUEUED = Event("queued", "queued {queue_id} as {id} for {recipients}")
DELIVERY_ATTEMPT = Event(
    "delivery-attempt",
    "{mode} attempt {id} ({queue_id}) to {host}: accepted {accepted}, "
    "refused {permanent}, deferred {transient}",
)
DEFERRED = Event("deferred", "deferred {id} ({queue_id}) until {when}: {reason}")
RENOTIFIED = Event("renotified", "renotified {id} ({queue_id}): {outcome}")
RETR_SERVED = Event(
    "retr-served",
    "retrieved {id} ({queue_id}) by {peer}: accepted {accepted}, refused {refused}",
    extras=("seconds",),
)
OUTBOX_EXPIRED = Event(
    "outbox-expired",
    "{id} not retrieved in time, bouncing",
    extras=("queue_id",),
)
DELIVERED = Event(
    "delivered",
    "delivered {queue_id} to {recipients} at {host}",
    extras=("seconds",),
)
PUSH_EXPIRED = Event("push-expired", "giving up on {id} ({queue_id}): {reason}")
RETR_BROKEN = Event("retr-broken", "retrieval of {id} by {peer} broke off; notifying again")
LOCAL_QUEUE_LOADED = Event("local-queue-loaded", "local queue loaded: {count} entries")
LOCAL_ATTEMPT = Event(
    "local-attempt",
    "local retry of {id} ({queue_id}): delivered {delivered}, refused {refused}, "
    "deferred {deferred}",
)
LOCAL_BOUNCED = Event("local-bounced", "{action} DSN for {queue_id} to <{sender}>: {recipients}")
LOCAL_DEFERRED = Event(
    "local-deferred",
    "deferred local delivery of {queue_id} to {recipients} as {id} until {when}: {reason}",
)
SESSION_TLS = Event("session-tls", "session with {host} [{address}]: {tls}")
SESSION_FAILED = Event(
    "session-failed",
    "session for {domain} ({ids}) with {host} [{address}] failed: {error}",
)

# -- General Delivery (pull/): retr-* is the SMTA answering RETR, the rest the RMTA ---

RETRIEVAL_ATTEMPT = Event("retrieval-attempt", "RETR {id} at {peer}: {reply}", extras=("code",))
RETRIEVAL_FAILED = Event("retrieval-failed", "retrieval from {peer} broke off: {error}")
DUPLICATE_DROPPED = Event("duplicate-dropped", "duplicate {id} from {peer} dropped")
RETRIEVAL_IN_DOUBT = Event(
    "retrieval-in-doubt",
    "retrieved {id} ({queue_id}) again after its delivery to the mail store was cut off:"
    " kept aside in {path}, not delivered twice; look in the mailboxes of {recipients}"
    " and re-send it if it is not there",
    LogLevel.error,
)
RETRIEVAL_FALLBACK = Event(
    "retrieval-fallback",
    "{peer} did not answer; retrieving from {address}, an MX of {origin} that passes SPF",
)
NOTIFICATION_ACCEPTED = Event(
    "notification-accepted",
    "notification {id} from {peer} ({identity}) for {recipients} accepted",
)
RETRIEVED = Event("retrieved", "retrieved {id} from {peer}")
RETRIEVAL_DEFERRED = Event(
    "retrieval-deferred",
    "retrieval of {id} from {peer} failed ({reason}); next attempt at {when}",
    extras=("attempts",),
)
NOTIFICATION_DROPPED = Event(
    "notification-dropped",
    "dropping notification {id} from {peer}: {reason}",
    LogLevel.warn,
)
# A refused GDEL's one event: it stands for command-rejected too (verb, code).
NOTIFICATION_REFUSED = Event(
    "notification-refused",
    "notification {id} from {peer} ({identity}) refused: {reply}",
    extras=("code", "verb"),
)
NOTIFICATION_STORE_FAILED = Event(
    "notification-store-failed",
    "storing notification {id} failed: {error}",
    LogLevel.error,
)
RETR_HANDED_OVER = Event("retr-handed-over", "RETR {id} ({queue_id}) by {peer}: handing over")
RETR_REFUSED = Event("retr-refused", "RETR {id} from {peer} refused ({why}); answering in {delay}s")
RETR_DNS_ERROR = Event("retr-dns-error", "RETR {id} from {peer}: DNS failed: {error}")
RETR_STORE_UNAVAILABLE = Event(
    "retr-store-unavailable", "RETR {id}: the outbox is out of reach: {error}", LogLevel.warn,
)

# -- Message authentication (trust/dkim, trust/dmarc, inbound/verdicts) ------------------

DMARC_REJECTED = Event(
    "dmarc-rejected", "rejected {queue_id} from <{sender}>: {reason}", extras=("peer",),
)
DKIM_ERROR = Event("dkim-error", "DKIM check of {domain} failed: {error}", LogLevel.warn)
ARC_FAILED = Event("arc-failed", "ARC seal for {domain} failed: {error}", LogLevel.warn)
DKIM_SIGN_FAILED = Event(
    "dkim-sign-failed", "DKIM signing for {domain} failed, sent unsigned: {error}", LogLevel.warn,
)
DKIM_KEY_MADE = Event(
    "dkim-key-made", "new DKIM key for {domain}; publish: {record}", LogLevel.warn,
)

# -- MTA-STS (outbound/sts/) -------------------------------------------------------------

MTA_STS_POLICY = Event(
    "mta-sts-policy",
    "MTA-STS policy of {domain} (id {id}): {mode}, mx {mx}, max_age {max_age}",
)
MTA_STS_FETCH_FAILED = Event(
    "mta-sts-fetch-failed",
    "MTA-STS policy of {domain} (id {id}) not usable: {error}; {fallback}",
)
MTA_STS_CACHED = Event(
    "mta-sts-cached",
    "MTA-STS TXT of {domain} unusable ({error}); keeping the cached policy (id {id})",
)
MTA_STS_CACHE_DAMAGED = Event(
    "mta-sts-cache-damaged", "ignoring MTA-STS cache file {name}: {error}", LogLevel.warn,
)
MTA_STS_EXPIRED = Event(
    "mta-sts-expired", "MTA-STS policies past their max_age forgotten: {domains}",
)
MTA_STS_REFRESH = Event(
    "mta-sts-refresh", "MTA-STS refresh: {count} cached policies looked up again",
)
MTA_STS_VERIFIED = Event(
    "mta-sts-verified", "MTA-STS enforce ({domain}): MX {host} certificate verified",
)
MTA_STS_TLS_REPORT = Event(
    "mta-sts-tls-report", "MTA-STS testing ({domain}): MX {host}: {problem}",
)
# A decision against the policy: refused (enforce) or only reported (testing).
MTA_STS_REFUSED = Event("mta-sts-refused", "MTA-STS {mode} ({domain}, id {id}): {reason}")
MTA_STS_REPORT = Event("mta-sts-report", "MTA-STS {mode} ({domain}, id {id}): {reason}")

# -- Storage -----------------------------------------------------------------------------

OUTBOX_UNREADABLE = Event(
    "outbox-unreadable",
    "outbox entry {id} unreadable, left on disk: {error}",
    LogLevel.error,
)
OUTBOX_INDEXED = Event(
    "outbox-indexed",
    "outbox {folder} indexed: {reused} entries from its snapshot, {read} read from their files",
)
OUTBOX_SNAPSHOT_IGNORED = Event(
    "outbox-snapshot-ignored",
    "outbox snapshot {path} not used ({reason}): every entry is read from its file",
    LogLevel.warn,
)
OUTBOX_SNAPSHOT_WRITTEN = Event(
    "outbox-snapshot-written",
    "outbox snapshot {path} written: {entries} entries",
)
OUTBOX_SNAPSHOT_FAILED = Event(
    "outbox-snapshot-failed",
    "outbox snapshot {path} not written: {error}",
    LogLevel.warn,
)

# The cluster's database (storage/postgresql): a node starts and listens without it.
DATABASE_UNREACHABLE = Event(
    "database-unreachable",
    "the database is out of reach ({error}): answering 451 4.3.0 to what needs it,"
    " trying again every {retry}s",
    LogLevel.warn,
)
DATABASE_CONNECTED = Event(
    "database-connected", "the database answers (schema checked, stores loaded) after {after}s",
)
DATABASE_SCHEMA_REFUSED = Event(
    "database-schema-refused", "refusing to run: {error}", LogLevel.critical,
)

# -- The operator's tools and the node (node/) -------------------------------------------

OPERATOR_FLUSH = Event("operator-flush", "queues flushed by the operator")
OPERATOR_DELETE = Event("operator-delete", "operator deleted {id}: {deleted}")
OPERATOR_HOLD = Event("operator-hold", "operator {command} {id}: {changed}")
MAILDROP_TAKEN = Event(
    "maildrop-taken",
    "sendmail by {user}: <{sender}> to {recipients}, unknown {unknown}",
)
MAILDROP_BAD = Event(
    "maildrop-bad",
    "dropped message {name} set aside in maildrop/bad: {reason}",
    LogLevel.error,
)
SENDMAIL_SENDER_REFUSED = Event(
    "sendmail-sender-refused",
    "sendmail -f {claimed} by {user} ignored (not a trusted user)",
    LogLevel.warn,
)
MAILDROP_ERROR = Event("maildrop-error", "cannot read the drop folder: {error}", LogLevel.error)
MAILDROP_DEFERRED = Event(
    "maildrop-deferred",
    "dropped message {name} kept for later: {reply}",
    LogLevel.warn,
)
HEAP_FROZEN = Event("heap-frozen", "start-up heap frozen: {objects} objects")

VOCABULARY = _vocabulary(
    ACCEPTED,
    ARC_FAILED,
    BLOCKED,
    BOUNCED,
    BOUNCE_OF_BOUNCE_DROPPED,
    BOUNCE_UNAUTHORISED_DROPPED,
    BUDGET_SPENT,
    COMMAND,
    COMMAND_REJECTED,
    COMMAND_TIMEOUT,
    CONNECTION,
    CONNECTION_REFUSED,
    DATA_TIMEOUT,
    DEFERRED,
    DKIM_ERROR,
    DATABASE_CONNECTED,
    DATABASE_SCHEMA_REFUSED,
    DATABASE_UNREACHABLE,
    DKIM_KEY_MADE,
    DKIM_SIGN_FAILED,
    DMARC_REJECTED,
    DELIVERED,
    DELIVERY_ATTEMPT,
    DNS_TEMPERROR,
    DUPLICATE_DROPPED,
    HEAP_FROZEN,
    IDLE_TIMEOUT,
    IMPROPER_PIPELINING,
    INJECTED,
    LMTP_DELIVERY,
    LMTP_FAILED,
    LMTP_IN_DOUBT,
    LOCAL_ATTEMPT,
    LOCAL_BOUNCED,
    LOCAL_DEFERRED,
    LOCAL_QUEUE_LOADED,
    LOCAL_REFUSED,
    MAILDROP_BAD,
    MAILDROP_DEFERRED,
    MAILDROP_ERROR,
    MAILDROP_TAKEN,
    MAIL_LOOP,
    MTA_STS_CACHED,
    MTA_STS_CACHE_DAMAGED,
    MTA_STS_EXPIRED,
    MTA_STS_FETCH_FAILED,
    MTA_STS_POLICY,
    MTA_STS_REFRESH,
    MTA_STS_REFUSED,
    MTA_STS_REPORT,
    MTA_STS_TLS_REPORT,
    MTA_STS_VERIFIED,
    NOTIFICATION_ACCEPTED,
    NOTIFICATION_DROPPED,
    NOTIFICATION_REFUSED,
    NOTIFICATION_STORE_FAILED,
    OPERATOR_DELETE,
    OPERATOR_FLUSH,
    OPERATOR_HOLD,
    OUTBOX_EXPIRED,
    OUTBOX_INDEXED,
    OUTBOX_SNAPSHOT_FAILED,
    OUTBOX_SNAPSHOT_IGNORED,
    OUTBOX_SNAPSHOT_WRITTEN,
    OUTBOX_UNREADABLE,
    POLICY_VETO,
    PREGREET,
    PUSH_EXPIRED,
    QUEUED,
    RENOTIFIED,
    REPLY,
    RETRIEVAL_ATTEMPT,
    RETRIEVAL_DEFERRED,
    RETRIEVAL_FAILED,
    RETRIEVAL_FALLBACK,
    RETRIEVAL_IN_DOUBT,
    RETRIEVED,
    RETR_BROKEN,
    RETR_DNS_ERROR,
    RETR_HANDED_OVER,
    RETR_REFUSED,
    RETR_STORE_UNAVAILABLE,
    RETR_SERVED,
    SENDMAIL_SENDER_REFUSED,
    SESSION_FAILED,
    SESSION_TLS,
    SPF,
    STOP_CUT_OFF,
    STOP_DRAINED,
    STOP_DRAINING,
    STORE_FAILED,
    TLS_INJECTION,
    TLS_STARTED,
    TLS_TIMEOUT,
    TURN_ABORTED,
)
