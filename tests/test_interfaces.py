"""
Tests for L{pullmail.interfaces}: implementations provide their interfaces,
and every module's C{__all__} names what it defines.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from twisted.internet.task import Clock
from zope.interface.verify import verifyClass, verifyObject

from pullmail.interfaces import IDeliveryAgent, IOutbox, ITrustPolicy
from pullmail.storage.maildir import MaildirDelivery, MaildirNames
from pullmail.storage.outbox import MaildirOutbox
from pullmail.trust.policy import TrustChecker

MODULES = [
    "pullmail", "pullmail.config", "pullmail.smtp.address", "pullmail.accounts.users", "pullmail.storage.durable",
    "pullmail.storage.maildir", "pullmail.ids", "pullmail.smtp.replies", "pullmail.smtp.envelope",
    "pullmail.interfaces", "pullmail.smtp.data", "pullmail.smtp.server", "pullmail.smtp.protocol",
    "pullmail.inbound.router", "pullmail.inbound.lmtp", "pullmail.outbound.local",
    "pullmail.testing", "pullmail.net.tls", "pullmail.node.cli", "pullmail.node.tap",
    "pullmail.pull.handover", "pullmail.pull.cluster", "pullmail.storage.postgresql.startup",
    "pullmail.node.control", "pullmail.storage.postgresql.pending",
]


class DeliveryAgentTests:
    def test_maildir_delivery(self):
        """MaildirDelivery provides IDeliveryAgent."""
        delivery = MaildirDelivery(Path("/m"), MaildirNames(Clock(), "h", 1), object())
        assert verifyObject(IDeliveryAgent, delivery)
        assert verifyClass(IDeliveryAgent, MaildirDelivery)
        assert delivery.root == Path("/m")


class OtherSeamTests:
    def test_outbox(self):
        """MaildirOutbox provides IOutbox."""
        assert verifyClass(IOutbox, MaildirOutbox)
        assert verifyObject(IOutbox, MaildirOutbox(Path("/nonexistent/outbox")))

    def test_trust_checker(self):
        """TrustChecker implements ITrustPolicy."""
        assert verifyClass(ITrustPolicy, TrustChecker)


class ExportTests:
    def test_all_defined(self):
        """Every name in each module's __all__ exists in that module."""
        for name in MODULES:
            module = importlib.import_module(name)
            exported = getattr(module, "__all__", None)
            assert exported is not None, name
            for attribute in exported:
                assert hasattr(module, attribute), f"{name}.{attribute}"
            assert len(set(exported)) == len(exported), name
