"""
Example plugins shipped with pullmail; each is enabled only by name.

``no-literal-helo`` (a trust policy) refuses notifications and pushes from
peers that greet with an address literal instead of a host name.
``log-deliveries`` (a delivery hook) logs every local delivery.
"""

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from pullmail.interfaces import IDeliveryHook, ITrustPolicy
from pullmail.smtp import replies


@implementer(IPlugin, ITrustPolicy)
class NoLiteralHelo:
    name = "no-literal-helo"

    def check(self, peer, domain, helo, sender):
        if helo.startswith("["):
            return replies.S550_POLICY.with_text("Greet with your host name, not an address")
        return None


@implementer(IPlugin, IDeliveryHook)
class LogDeliveries:
    name = "log-deliveries"
    log = Logger(namespace="pullmail.hooks")

    def delivered(self, queue_id, sender, recipients, paths):
        self.log.info("hook: {queue_id} from <{sender}> stored for {recipients}",
                      queue_id=queue_id, sender=sender, recipients=list(recipients))


no_literal_helo = NoLiteralHelo()
log_deliveries = LogDeliveries()
