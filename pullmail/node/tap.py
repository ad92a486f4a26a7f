"""
``twistd pullmail``: options, and the node built as a MultiService.

This is the only module that touches the global reactor: it builds every
other object from its slice of the L{Config} and hands the reactor in as a
clock, a thread runner and a connector.
"""

from __future__ import annotations

import functools
import gc
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from pullmail import config as configuration
from pullmail import maillog
from pullmail.accounts.login import Authenticator, make_portal
from pullmail.accounts.users import Accounts, AccountsError
from pullmail.inbound.lmtp import LMTPDelivery, lmtp_connector
from pullmail.inbound.recent_verdicts import RecentVerdicts
from pullmail.inbound.router import Router
from pullmail.inbound.verdicts import MessageChecker
from pullmail.interfaces import IDeliveryHook, ITrustPolicy
from pullmail.net.dns import Resolver, make_dnspython_resolver
from pullmail.net.nameserver import NameserverQuery
from pullmail.net.tls import (
    OutboundTLS,
    SystemTrust,
    client_context,
    ensure_certificate,
    server_context,
)
from pullmail.node.control import LOCAL_QUEUE, SOCKET_NAME, ControlFactory
from pullmail.node.listeners import Listener
from pullmail.node.lock import StateLocked, lock_state_dir
from pullmail.node.logs import NodeService, log_observer, twistd_stream
from pullmail.node.maildrop import MAILDROP, Maildrop
from pullmail.node.metrics import Metrics, MetricsObserver, QueueCollector, metrics_site
from pullmail.node.plugin import enabled_plugins
from pullmail.outbound import mx
from pullmail.outbound.bouncer import Reports
from pullmail.outbound.delivery import Outbound
from pullmail.outbound.lifecycle import due_at
from pullmail.outbound.local import LocalQueue
from pullmail.outbound.sts import MTASTS
from pullmail.outbound.sts.cache import PolicyCache
from pullmail.outbound.sts.fetch import PolicyFetcher
from pullmail.pull.retrieve import Retriever
from pullmail.pull.serve import PickupCounter
from pullmail.pull.verbs import Notify, Retrieve, pull_extension
from pullmail.smtp.conduct import SessionLimits
from pullmail.smtp.drain import Drain
from pullmail.smtp.protocol import ConnectionLimits, Connector, SMTPServerFactory
from pullmail.smtp.server import (
    Authenticate,
    CheckPush,
    CheckSender,
    Deliver,
    ServerPolicy,
)
from pullmail.storage.disk_threads import DiskPool
from pullmail.storage.fsync_helper import FsyncHelper
from pullmail.storage.indoubt import IN_DOUBT, InDoubt
from pullmail.storage.maildir import MaildirDelivery, MaildirNames
from pullmail.storage.outbox import MaildirOutbox
from pullmail.storage.pending import PendingStore
from pullmail.storage.refresh import SnapshotRefresh
from pullmail.storage.durable import fsync_directory
from pullmail.storage.postgresql import schema
from pullmail.storage.postgresql.database import Database, StoreUnavailable
from pullmail.storage.postgresql.outbox import PostgresOutbox
from pullmail.storage.postgresql.pending import PostgresPending
from pullmail.storage.postgresql.startup import StoreStartup
from pullmail.storage.postgresql.watch import Watch
from pullmail.trust import throttle
from pullmail.trust.arc import ARCVerifier
from pullmail.trust.dkim import Signer, Verifier
from pullmail.trust.dkim_keys import dns_record, ensure_keys, load_keys
from pullmail.trust.dkim_records import KeyRecords
from pullmail.trust.dmarc import DMARCChecker, OrganizationalDomains
from pullmail.trust.policy import TrustChecker
from pullmail.trust.throttle import FailureTracker

__all__ = ["Options", "makeService"]

log = Logger(namespace="pullmail.node")

# Threads for the blocking disk work the fsync helper does not take (the
# outbox) and for password hashing: a few, not to thrash a small machine.
DISK_THREADS = 4
# sockaddr_un.sun_path holds 108 bytes on Linux.
MAX_UNIX_PATH = 107
# Connections (and threads) to the cluster's database (backend = "postgresql").
DB_THREADS = 8
# Bounds of the cluster's poll for due work and lease renewal.
MIN_POLL, MAX_POLL = 0.5, 15.0


class Options(usage.Options):
    synopsis = "[--config FILE] [--set section.key=value ...]"
    optParameters = [
        ["config", "c", None, "The TOML configuration file (default: the embedded default)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.overrides: list[tuple[str, str]] = []

    def opt_set(self, assignment: str) -> None:
        """Override one key: --set limits.recipients=50 (repeatable)."""
        option, equals, value = assignment.partition("=")
        if not equals:
            raise usage.UsageError(f"--set needs section.key=value, not {assignment!r}")
        self.overrides.append((option.strip(), value.strip()))

    def postOptions(self) -> None:
        try:
            self["node_config"] = configuration.load_config(self["config"], self.overrides)
        except (configuration.ConfigError, AccountsError) as e:
            raise usage.UsageError(str(e)) from None
        check_store(self["node_config"])


# Twisted's listen backlog is 50; a burst of connecting peers beyond it is
# dropped by the kernel before pullmail sees it.
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """A tcp endpoint string gets ``backlog=LISTEN_BACKLOG`` unless it has one."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


class Startable(service.Service):
    """
    Runs C{start} and C{stop} with the node (after the thread pools); a
    C{stop} that returns a Deferred holds the reactor's shutdown until it
    fires (the last outbox snapshot: its result comes back from a disk
    thread, which needs the reactor still turning).
    """

    def __init__(self, start, stop) -> None:
        self._start, self._stop = start, stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self):
        super().stopService()
        return self._stop()


def freeze_start_up_heap() -> None:
    """
    The outbox index and the notifications read at start-up live as long as
    their entries, and hold no reference cycles (refcounting frees them).
    Frozen out of the garbage collector's sight, they no longer make every
    full collection walk them: at 100k outbox entries that walk stopped the
    reactor for 80 ms each time, at a million for 1.1 s.  No collection
    first: the outbox is read with the collector off (a thread meanwhile
    serves), so its million entries all wait in the youngest generation and
    a collection would walk them, a second's stall; the few cycles of
    garbage from the start-up that get frozen with them are a one-off.
    """
    gc.freeze()
    maillog.HEAP_FROZEN(log, objects=gc.get_freeze_count())


def local_delivery(config: configuration.Config, reactor, mail_root, fsync_helper,
                   run_blocking):
    """
    The L{IDeliveryAgent} that ``[delivery] local`` names: maildirs, or
    LMTP, which keeps a message whose store went silent after the data in
    C{<state_dir>/in-doubt} (L{pullmail.storage.indoubt}).
    """
    hostname = config.node.hostname
    if config.delivery.local == "maildir":
        return MaildirDelivery(mail_root, MaildirNames(reactor, hostname, os.getpid()),
                               fsync_helper)
    description = config.delivery.local.removeprefix("lmtp:")
    connect = lmtp_connector(reactor, reactor, description, config.delivery.connect_timeout,
                             config.limits.idle_timeout)
    return LMTPDelivery(connect, hostname, where=f"LMTP server {description}",
                        in_doubt=InDoubt(in_doubt_folder(config), run_blocking))


def make_signer(config: configuration.Config, reactor, run_blocking) -> Signer | None:
    """
    SPEC 11.1: with ``[dkim] generate`` the missing keys are made (and the
    records to publish logged); the keys are loaded once, here.
    """
    if not config.dkim.sign:
        return None
    configuration.check_dkim_keys(config)
    if config.dkim.generate:
        for key in ensure_keys(config.dkim, config.node.domains):
            maillog.DKIM_KEY_MADE(log, domain=key.domain, record=dns_record(key))
    return Signer(load_keys(config.dkim, config.node.domains), reactor, run_blocking)


@dataclass(frozen=True)
class Stores:
    outbox: object
    pending: object
    watch: Watch | None = None
    database: Database | None = None
    # What starts once the cluster's database answers (L{StoreStartup}).
    steps: list = field(default_factory=list)

    def start_with(self, node: service.MultiService, start, stop) -> None:
        """C{start} now (files), or once the database answers; C{stop} with the node."""
        if self.database is None:
            Startable(start, stop).setServiceParent(node)
        else:
            self.steps.append(start)
            Startable(lambda: None, stop).setServiceParent(node)


def open_stores(config: configuration.Config, reactor, node: service.MultiService,
                run_blocking) -> Stores:
    """
    SPEC 11.3: the files under state_dir (one node), or the cluster's
    PostgreSQL database, with its threads and its watch (started with the
    node).
    """
    if config.store.backend == "files":
        outbox = MaildirOutbox(config.state_dir / "outbox", run_blocking, background=True)
        # Its snapshot written again as entries change, and at a clean stop
        # (before the disk threads stop, which finish the write).
        refresh = SnapshotRefresh(outbox, reactor)
        Startable(refresh.start, refresh.stop).setServiceParent(node)
        return Stores(outbox, PendingStore(config.state_dir / "pending"))
    database = Database(config.store.dsn, reactor, DB_THREADS, ready=False)
    Startable(database.start, database.stop).setServiceParent(node)
    name, lease = config.node.hostname, config.store.lease
    due = functools.partial(due_at, config=config.delivery)
    return Stores(
        PostgresOutbox(database, name, lease, reactor, due, run=database.run),
        PostgresPending(database, name, lease, reactor, run=database.run),
        Watch(database, reactor, poll_interval(lease)), database,
    )


def poll_interval(lease: float) -> float:
    """Leases are renewed three times a lease, and due work looked for as often."""
    return max(MIN_POLL, min(lease / 3, MAX_POLL))


def check_store(config: configuration.Config) -> None:
    """
    A node refuses to start on a database without the schema it knows.  A
    database out of reach does not stop it: the node starts, answers 4xx to
    what needs the store, and checks the schema once the database answers
    (L{StoreStartup}).

    @raise usage.UsageError: saying what to do.
    """
    if config.store.backend != "postgresql":
        return
    database = Database(config.store.dsn)
    try:
        with database.connect() as connection, connection.cursor() as cursor:
            schema.check(cursor)
    except StoreUnavailable:
        return
    except schema.SchemaError as e:
        raise usage.UsageError(f"store.dsn: {e}") from None


def in_doubt_folder(config: configuration.Config) -> Path | None:
    """
    With LMTP, where copies whose delivery to the store is unknown are kept
    (L{pullmail.storage.indoubt}); made now, so that its entry is durable.
    """
    if config.delivery.local == "maildir":
        return None
    folder = config.state_dir / IN_DOUBT
    if not folder.is_dir():
        folder.mkdir(mode=0o700)
        fsync_directory(config.state_dir)
    return folder


def build_node(config: configuration.Config, reactor) -> service.MultiService:
    """Every service of one node, from its config."""
    node = NodeService()
    hostname = config.node.hostname
    state = config.state_dir
    mail_root = state / "mail"
    mail_root.mkdir(parents=True, exist_ok=True)
    ensure_certificate(config.tls.certificate, config.tls.key, hostname, config.tls.generate)
    tls_context = server_context(config.tls.certificate, config.tls.key)
    accounts = Accounts.load(config.node.domains, config.accounts.users, config.accounts.aliases)
    domains = tuple(config.node.domains)

    run_blocking = DiskPool(reactor, DISK_THREADS)
    Startable(run_blocking.start, run_blocking.stop).setServiceParent(node)
    # DNS runs on the reactor: no thread waits on a nameserver (issue 18).
    dnspython = make_dnspython_resolver(config.dns.nameservers, config.dns.timeout)
    resolver = Resolver(dnspython, reactor, NameserverQuery.of(dnspython, reactor))
    fsync_helper = FsyncHelper(reactor)
    Startable(fsync_helper.start, fsync_helper.stop).setServiceParent(node)
    delivery = local_delivery(config, reactor, mail_root, fsync_helper, run_blocking)
    hooks = enabled_plugins(IDeliveryHook, config.delivery.hooks, "delivery.hooks")
    policies = enabled_plugins(ITrustPolicy, config.trust.policies, "trust.policies")
    router = Router(hostname, accounts, delivery, reactor, hooks=hooks)
    # A stop lets what the connections have in hand finish first.
    node.drain = Drain(reactor)
    connect = Connector(reactor, reactor, config.delivery.bind_address,
                        config.delivery.connect_timeout, config.limits.idle_timeout,
                        config.node.log_commands, drain=node.drain)
    # Issue 18: no outbound connection reaches a blocked network, whoever
    # chose the address; only the operator's smarthost is exempt.
    guarded_connect = mx.guarded(connect, config.delivery.blocked_networks)
    client_tls = client_context()
    outbound_tls = OutboundTLS(config.delivery.tls, config.delivery.tls_ca)
    trust = TrustChecker(config.trust, resolver, reactor, config.dns.timeout * 4, policies)
    router.signer = make_signer(config, reactor, run_blocking)
    router.checker = MessageChecker(
        config.trust.authserv_id or hostname, trust.spf_result,
        Verifier(KeyRecords(resolver.txt_answer, reactor), run_blocking),
        DMARCChecker(resolver.txt, OrganizationalDomains()), config.trust.dmarc,
        ARCVerifier(resolver.txt, run_blocking),
        RecentVerdicts(reactor, trust.spf_known, resolver.ttl),
    )
    stores = open_stores(config, reactor, node, run_blocking)
    outbox = stores.outbox

    def send_bounce(sender: str, message: bytes):
        return router.inject("", [sender], [message])

    # One set of rules for every DSN the node sends (outbox, local queue,
    # success reports): DSN parameters, SPF against backscatter, RET=FULL.
    reports = Reports(hostname, reactor, send_bounce, trust.spf_passes,
                      config.limits.message_size)
    router.reports = reports

    mta_sts = None
    if config.delivery.mta_sts:
        trust_root = SystemTrust(config.delivery.tls_ca)
        fetcher = PolicyFetcher(reactor, resolver, config.delivery.mta_sts_port, trust_root,
                                config.delivery.bind_address)
        mta_sts = MTASTS(resolver=resolver, fetch=fetcher.fetch, clock=reactor, trust=trust_root,
                         cache=PolicyCache(state / "mta-sts", run_blocking))
        Startable(mta_sts.start, mta_sts.stop).setServiceParent(node)
    outbound = Outbound(
        outbox=outbox, resolver=resolver,
        connect=connect if config.delivery.smarthost else guarded_connect, clock=reactor,
        run_blocking=run_blocking, hostname=hostname, config=config.delivery,
        send_bounce=send_bounce,
        client_tls=outbound_tls,
        sender_authorised=trust.spf_passes, mta_sts=mta_sts, reports=reports,
    )
    router.outbound = outbound
    # Issue 18: the throttles count per /ipv4_prefix and /ipv6_prefix.
    network_of = functools.partial(throttle.network_of, ipv4_prefix=config.limits.ipv4_prefix,
                                   ipv6_prefix=config.limits.ipv6_prefix)
    # Always: entries an LMTP store deferred wait here even if [delivery]
    # local has since gone back to maildir.
    local_queue = LocalQueue(
        store=MaildirOutbox(state / LOCAL_QUEUE, run_blocking), agent=delivery,
        clock=reactor, run_blocking=run_blocking, hostname=hostname, config=config.delivery,
        send_bounce=send_bounce, sender_authorised=trust.spf_passes, reports=reports,
    )
    router.local_queue = local_queue
    failures = FailureTracker(reactor, config.limits.retr_fail_limit,
                              config.limits.retr_fail_window, config.limits.retr_block,
                              config.limits.retr_tarpit_max, key=network_of)
    auth_failures = FailureTracker(reactor, config.limits.auth_fail_limit,
                                   config.limits.auth_fail_window, config.limits.auth_block,
                                   config.limits.auth_tarpit_max, what="AUTH", key=network_of)
    pickup = PickupCounter(outbox, outbound, resolver, reactor, failures, run_blocking,
                           mta_sts=mta_sts)
    mx_policy = ServerPolicy(
        hostname=hostname, domains=domains, accounts=accounts, service="smtp",
        max_size=config.limits.message_size, max_recipients=config.limits.recipients,
        tls_available=True, push=config.trust.push, own_addresses=config.own_addresses,
        max_received=config.limits.max_received,
    )
    retriever = Retriever(
        store=stores.pending, trust=trust, connect=guarded_connect,
        clock=reactor, mx_limit=config.delivery.mx_limit,
        blocked_networks=config.delivery.blocked_networks,
        run_blocking=run_blocking, hostname=hostname, schedule=config.retrieval.schedule,
        remote_port=config.delivery.remote_port, keep_for=config.delivery.outbox_lifetime,
        pending_per_origin=config.limits.pending_per_origin,
        per_minute=config.limits.retrievals_per_minute, policy=mx_policy,
        deliver=router.accept, client_tls=client_tls, resolver=resolver,
        sender_authorised=trust.spf_passes,
        store_file=None if stores.pending.shared else fsync_helper.store,
        # Only a maildir can be searched for a copy (not an LMTP store).
        delivered_of=router.delivered_of if router.delivery.root is not None else None,
        in_doubt=in_doubt_folder(config),
        connection_cache_time=config.delivery.connection_cache_time,
    )
    stores.start_with(node, outbound.start, outbound.stop)
    maildrop = Maildrop(state / MAILDROP, router, reports, reactor, run_blocking, hostname,
                        config.sendmail.trusted_users, config.limits.message_size)
    Startable(local_queue.start, local_queue.stop).setServiceParent(node)
    control_socket = state / SOCKET_NAME
    if len(str(control_socket)) < MAX_UNIX_PATH:
        control_socket.unlink(missing_ok=True)
        Listener(
            endpoints.UNIXServerEndpoint(reactor, str(control_socket), mode=0o600),
            ControlFactory(outbound, retriever, reactor, maildrop, local_queue),
        ).setServiceParent(node)
    else:
        log.warn("state_dir path too long for the control socket; "
                 "`pullmail queue` will work on the files only")
    stores.start_with(node, retriever.start, retriever.stop)
    Startable(maildrop.start, maildrop.stop).setServiceParent(node)
    add_metrics(node, config, reactor, outbox, retriever.store, maildrop)
    if stores.watch is not None:   # after both loads
        stores.watch.register(stores.outbox.poll,
                              lambda found: outbound.cluster.polled(stores.outbox.polled(found)))
        stores.watch.register(stores.pending.poll,
                              lambda rows: retriever.polled(stores.pending.polled(rows)))
        stores.start_with(node, stores.watch.start, stores.watch.stop)
        startup = StoreStartup(stores.database, reactor, stores.steps, refuse=reactor.stop)
        Startable(startup.start, startup.stop).setServiceParent(node)
    # after every load (the outbox's may finish in the background)
    Startable(lambda: outbound.loaded.addCallback(lambda _: freeze_start_up_heap()),
              gc.unfreeze).setServiceParent(node)

    performers = {
        Deliver: lambda protocol, request: router.accept(
            request.session, request.envelope, request.chunks, request.size
        ),
        Authenticate: Authenticator(make_portal(accounts, run_blocking), auth_failures, reactor),
        Notify: retriever,
        Retrieve: pickup,
        CheckSender: lambda protocol, request: trust.check_own_domain(
            request.session, request.envelope
        ),
        CheckPush: lambda protocol, request: trust.check_push(request.session, request.envelope),
    }
    limits = ConnectionLimits(config.limits.connections, config.limits.connections_per_ip,
                              key=network_of)
    session_limits = SessionLimits(
        tls_handshake_timeout=config.limits.tls_handshake_timeout,
        command_timeout=config.limits.command_timeout,
        data_timeout=config.limits.data_timeout,
        min_data_rate=config.limits.min_data_rate,
        improper_pipelining=config.limits.improper_pipelining,
        pregreet_wait=config.limits.pregreet_wait,
        max_errors=config.limits.max_errors,
        max_junk_commands=config.limits.max_junk_commands,
    )
    pull = (pull_extension(config.trust.bare_gdel, enabled=config.trust.gdel),)
    for service_name in ("smtp", "submission", "submissions"):
        implicit = service_name == "submissions"
        policy = replace(mx_policy, service=service_name, tls_available=not implicit)
        factory = SMTPServerFactory(
            policy, reactor, limits, config.limits.idle_timeout, performers,
            tls_context=tls_context, implicit_tls=implicit,
            extensions=pull, log_commands=config.node.log_commands,
            count_replies=bool(config.metrics.listen),
            # postscreen's pre-greet test is for MTAs, on the MX service only.
            session_limits=session_limits if service_name == "smtp"
            else replace(session_limits, pregreet_wait=0.0),
            refuse_connection=failures.refuse_connection if service_name == "smtp"
            else auth_failures.refuse_connection,
            drain=node.drain,
        )
        wrapped = TLSMemoryBIOFactory(tls_context, False, factory) if implicit else factory
        for description in getattr(config.listen, service_name):
            endpoint = endpoints.serverFromString(reactor, with_backlog(description))
            Listener(endpoint, wrapped).setServiceParent(node)
    log.info(
        "pullmail node {hostname} for {domains}, state in {state_dir}",
        hostname=hostname, domains=sorted(domains), state_dir=str(state),
    )
    return node


def add_metrics(node, config, reactor, outbox, pending, maildrop) -> None:
    """C{[metrics] listen}: the counters' log observer, for the node's life, and GET /metrics."""
    if not config.metrics.listen:
        return
    from twisted.logger import globalLogPublisher

    metrics = Metrics()
    metrics.registry.register(QueueCollector(outbox, pending, maildrop))
    observer = MetricsObserver(metrics)
    Startable(lambda: globalLogPublisher.addObserver(observer),
              lambda: globalLogPublisher.removeObserver(observer)).setServiceParent(node)
    Listener(
        endpoints.serverFromString(reactor, config.metrics.listen),
        metrics_site(metrics.registry),
    ).setServiceParent(node)
    node.metrics = metrics


def makeService(options: Options) -> service.MultiService:
    """
    The node of C{options}, holding its state dir's lock (one node per
    state dir) and logging as C{[node] log_format} says.
    """
    from twisted.internet import reactor

    config = options["node_config"]
    try:
        lock = lock_state_dir(config.state_dir)
    except StateLocked as e:
        raise SystemExit(f"pullmail: refusing to start: {e}") from None
    node = build_node(config, reactor)
    node.lock = lock
    stream = twistd_stream(getattr(options, "parent", None))
    if stream is not None:
        node.log_observer = log_observer(config.node.log_format, stream)
    return node
