"""
The node's listening sockets as services.

A port the node cannot have (taken, or privileged) must stop the node at
start, so that ``twistd`` exits non-zero with the reason, instead of running
without one of its services.  Twisted's L{StreamServerEndpointService}
only logs such a failure unless a private flag is set; this service says
so in its own code.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

__all__ = ["Listener"]


class Listener(service.Service):
    """Listens on one server endpoint for as long as the node runs."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Bind before twistd gives up privileges (port 25 as root)."""
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"{self.endpoint!r} did not listen at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
