"""
The seams of pullmail, as zope interfaces.  Each implementation and each
test fake is checked against these with C{verifyObject}.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from zope.interface import Attribute, Interface

__all__ = [
    "DeliveryOutcome", "IDeliveryAgent", "IDeliveryHook", "IOutbox", "IPendingStore",
    "ITrustPolicy",
]


class IDeliveryAgent(Interface):
    """
    Hands accepted mail to the local mailboxes: maildirs on this node's
    disk, or a mail store reached over LMTP (RFC 2033).
    """

    root = Attribute(
        "The folder holding the maildirs, or None when the mailboxes are not "
        "files of this node (LMTP): then a stored copy cannot be looked for."
    )

    def deliver(queue_id, sender, addresses, chunks, folder=None):
        """
        Store one message for each of C{addresses} (normalised local
        mailbox addresses), durably; into their Maildir++ C{folder}
        (``".Junk"``) when given, else the inbox.

        @param queue_id: the id logged for this message; part of file names.
        @param sender: the envelope sender ("" for the null reverse-path).
        @param chunks: the message bytes, headers first, CRLF line ends.
        @return: a Deferred firing with a L{DeliveryOutcome} once every copy
            it reports delivered is durable (fsynced, or acknowledged by
            the store with 250) and every copy it reports in doubt is
            kept; failing with C{OSError} (disk full,
            permissions) when nothing could be stored.
        """


@dataclass(frozen=True)
class DeliveryOutcome:
    """
    What a delivery agent did with each address of one message: delivered,
    or refused with the store's reply (4xx: try again later; 5xx: never),
    or C{in_doubt}: the store may have it or not (its reply to the data
    never came), and a copy is kept for the operator
    (L{pullmail.storage.indoubt}) -- neither retried nor bounced, as
    delivering again might deliver twice.  C{paths} are the files
    written, when the mailboxes are files here.
    """

    delivered: tuple[str, ...] = ()
    refused: Mapping[str, Any] = field(default_factory=dict)   # address -> Reply
    paths: tuple[Path, ...] = ()
    in_doubt: tuple[str, ...] = ()

    def transient(self) -> list[str]:
        return [a for a, reply in self.refused.items() if reply.transient]

    def permanent(self) -> list[str]:
        return [a for a, reply in self.refused.items() if reply.permanent]


class IOutbox(Interface):
    """
    Outbound mail, one entry per (message, recipient domain), keyed by its
    General Delivery id.  A clustered backend may share it between nodes;
    L{claim} must then be atomic across them.
    """

    def load():
        """Build the index at start-up; release stale claims; return their ids."""

    def get(entry_id):
        """The entry with this id, or None.  Must not touch the disk."""

    def entries():
        """An iterator over a snapshot of all entries."""

    def add(entries, chunks):
        """Store one message for C{entries} durably (blocking)."""

    def update(entry):
        """Persist a changed entry durably (blocking)."""

    def flushed(entry_id):
        """A Deferred firing once the entry's pending writes are on disk."""

    def claim(entry_id):
        """Take the entry for one retrieval: the entry, or None if taken."""

    def release(entry_id):
        """Give a claimed entry back (the retrieval broke off)."""

    def remove(entry_id, after=None):
        """
        Forget an entry and its message; with C{after} (a Deferred), delete
        the stored copy only once it has fired, and keep it if it fails.
        """

    def read_message(entry_id):
        """The message bytes of an entry (blocking)."""

    def find(entry_id):
        """A Deferred firing with the entry (any node's, if shared) or None."""

    def acquire(entry_id):
        """L{claim} as a Deferred (a transaction, if shared): the entry or None."""

    def take(entry_id):
        """
        A Deferred firing with the entry, taken for due work by this node
        and as it now is, or with None: gone, or another node has it.
        """


class IPendingStore(Interface):
    """
    The RMTA's pending notifications and retrieved-id records (SPEC 3-5),
    indexed in memory by key (a hash of origin and id).  A clustered
    backend shares them between the receiving nodes (SPEC 11.3): then a
    due notification is taken with L{take} before it is retrieved, so that
    two nodes never both retrieve one id.
    """

    shared = Attribute("True when other nodes share the records.")

    def load():
        """Blocking: build the index (start-up)."""

    def get(origin, gdel_id):
        """The indexed notification of (origin, id), or None."""

    def by_key(key):
        """The indexed notification with this key, or None."""

    def pending_from(peer):
        """How many pending notifications this peer has here."""

    def save(notification, limit=None, keep_taken=False):
        """
        Blocking: store the record durably, then index it.  With
        C{keep_taken}, a shared store leaves it taken by this node (a write
        in the middle of a retrieval); otherwise it is free afterwards.

        @param limit: C{[limits] pending_per_origin} for a notification not
            stored yet: refused when its peer has that many pending already
            (here; in a shared store, in the whole cluster, counted with the
            insert).
        @raise TooManyPending: refused by C{limit}; nothing stored.
        """

    def remember(notification):
        """Index a record stored by other means (the fsync helper)."""

    def remove(notification):
        """Blocking: forget the record."""

    def find(origin, gdel_id):
        """A Deferred firing with the notification (any node's, if shared) or None."""

    def take(key):
        """
        A Deferred firing with the notification, taken for one retrieval by
        this node and as it now is, or None: gone, or another node has it.
        """


class ITrustPolicy(Interface):
    """Decides whether a sender may be trusted (SPEC 6)."""

    name = Attribute("The name by which [trust] policies enables it.")

    def check(peer, domain, helo, sender):
        """
        @param peer: the connecting IP address (text).
        @param domain: the identity checked: MAIL FROM domain, or the EHLO
            domain for the bare form and the null sender.
        @return: a Deferred firing with None (no objection) or a L{Reply}
            refusing the sender (4xx temporary, 5xx permanent).
        """


class IDeliveryHook(Interface):
    """Told about each local delivery, after the message is on disk."""

    name = Attribute("The name by which [delivery] hooks enables it.")

    def delivered(queue_id, sender, recipients, paths):
        """
        Called once the message is durable, before the 250 is sent, with
        the C{recipients} it was delivered to (not those an LMTP store
        refused) and the C{paths} written (none over LMTP).  The return
        value (or a Deferred's result) is ignored, and an exception is
        logged: a hook can never make an accepted message fail.
        """
