"""
Eager writes: send a reply on the socket at once when nothing waits before it.

Twisted's TCP transport never sends in C{write()}: it buffers, asks epoll
for writability (one C{epoll_ctl}), sends in the next reactor turn, and
drops the interest again (another).  For a dialogue of small replies,
each awaited by the peer before it sends again, that is two system calls
and a reactor dispatch per reply for nothing (issue 17: about a tenth of
pullmail's CPU per pushed message).  asyncio's transports try the send
first; this does the same for Twisted's: whatever the kernel does not take
goes through C{write()} as before, behind nothing, so the order holds.
"""

from __future__ import annotations

from twisted.internet import tcp

__all__ = ["write_now"]


def write_now(transport, data: bytes) -> None:
    """
    C{transport.write(data)}, sent at once where C{transport} is a plain
    TCP connection with nothing buffered; otherwise (TLS, a test's
    transport, data already waiting, closing) exactly C{write()}.
    """
    # Exactly a TCP connection: a wrapper (implicit TLS's TLSMemoryBIOProtocol)
    # answers for its transport's attributes, writeSomeData included, and
    # would put plaintext under the TLS.
    # The buffers are Twisted's internals (abstract.FileDescriptor): should
    # they be renamed, every write takes write()'s way, never a wrong one.
    if (isinstance(transport, tcp.Connection) and transport.TLS is False
            and transport.connected and not transport.disconnecting
            and not getattr(transport, "dataBuffer", True)
            and not getattr(transport, "_tempDataBuffer", True)):
        sent = transport.writeSomeData(data)
        if sent == len(data):
            return
        if isinstance(sent, int):
            data = data[sent:]
        # else the connection is lost: write() leaves it to the reactor's
        # next turn to find out and close, as it always does.
    transport.write(data)
