"""
The seams of pullmail, as zope interfaces.  Each implementation and each
test fake is checked against these with C{verifyObject}.
"""

from zope.interface import Attribute, Interface

__all__ = ["IDeliveryAgent"]


class IDeliveryAgent(Interface):
    """Puts accepted mail for local mailboxes on disk."""

    root = Attribute("The folder holding the maildirs.")

    def deliver(queue_id, addresses, chunks):
        """
        Store one message for each of C{addresses} (normalised local
        mailbox addresses), durably.

        @param queue_id: the id logged for this message; part of file names.
        @param chunks: the message bytes, headers first, CRLF line ends.
        @return: a Deferred firing with the list of paths written once every
            file and directory entry is fsynced; failing with C{OSError}
            (disk full, permissions) when nothing could be stored.
        """
