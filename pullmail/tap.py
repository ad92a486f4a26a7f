"""
``twistd pullmail``: options, and the node built as a MultiService.

This is the only module that touches the global reactor: it builds every
other object from its slice of the L{Config} and hands the reactor in as a
clock, a thread runner and a connector.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from pullmail import config as configuration
from pullmail.accounts import Accounts, AccountsError
from pullmail.esmtp.server import Authenticate, Deliver, ServerPolicy
from pullmail.maildir import MaildirDelivery, MaildirNames
from pullmail.protocol import ConnectionLimits, SMTPServerFactory
from pullmail.router import Router
from pullmail.tls import ensure_certificate, server_context

__all__ = ["Options", "makeService"]

log = Logger(namespace="pullmail.node")

# Threads for blocking disk and password work: enough to overlap fsyncs of
# concurrent sessions, few enough not to thrash a small machine.
DISK_THREADS = 4


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
            self["node_config"] = load_config(self["config"], self.overrides)
        except (configuration.ConfigError, AccountsError) as e:
            raise usage.UsageError(str(e)) from None


def load_config(path: str | None, overrides=()) -> configuration.Config:
    config = (
        configuration.load(path) if path else configuration.embedded_default(Path.cwd())
    )
    for option, value in overrides:
        config = configuration.override(config, option, value)
    return config


class ThreadPoolService(service.Service):
    """Runs a thread pool for the life of the node."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def build_node(config: configuration.Config, reactor) -> service.MultiService:
    """Every service of one node, from its config."""
    node = service.MultiService()
    hostname = config.node.hostname
    mail_root = config.state_dir / "mail"
    mail_root.mkdir(parents=True, exist_ok=True)
    ensure_certificate(config.tls.certificate, config.tls.key, hostname, config.tls.generate)
    tls_context = server_context(config.tls.certificate, config.tls.key)
    accounts = Accounts.load(config.node.domains, config.accounts.users, config.accounts.aliases)

    pool = ThreadPool(minthreads=1, maxthreads=DISK_THREADS, name="pullmail-disk")
    ThreadPoolService(pool).setServiceParent(node)
    delivery = MaildirDelivery(mail_root, MaildirNames(reactor, hostname, os.getpid()), reactor, pool)
    router = Router(hostname, accounts, delivery, reactor)
    limits = ConnectionLimits(config.limits.connections, config.limits.connections_per_ip)

    performers = {
        Deliver: lambda protocol, request: router.accept(
            request.session, request.envelope, request.chunks, request.size
        ),
        Authenticate: lambda protocol, request: deferToThreadPool(
            reactor, pool, accounts.check_password, request.user, request.password
        ),
    }
    domains = frozenset(config.node.domains)
    for service_name in ("smtp", "submission", "submissions"):
        policy = ServerPolicy(
            hostname=hostname,
            domains=domains,
            accounts=accounts,
            service=service_name,
            max_size=config.limits.message_size,
            max_recipients=config.limits.recipients,
            tls_available=service_name != "submissions",
        )
        implicit = service_name == "submissions"
        factory = SMTPServerFactory(
            policy, reactor, limits, config.limits.idle_timeout, performers,
            tls_context=tls_context, implicit_tls=implicit,
        )
        wrapped = TLSMemoryBIOFactory(tls_context, False, factory) if implicit else factory
        for description in getattr(config.listen, service_name):
            endpoint = endpoints.serverFromString(reactor, description)
            listener = StreamServerEndpointService(endpoint, wrapped)
            listener._raiseSynchronously = True
            listener.setServiceParent(node)
    log.info(
        "pullmail node {hostname} for {domains}, state in {state_dir}",
        hostname=hostname, domains=list(domains), state_dir=str(config.state_dir),
    )
    return node


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    return build_node(options["node_config"], reactor)
