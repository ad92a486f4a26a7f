"""
The floor peer: the least a Twisted ESMTP server can do and still make each
message durable before its 250.  Per message, in the reactor thread: write
the maildir tmp/ file, fsync it, rename it into new/, fsync new/, then 250.
No Received header, no queue id, no log line, no checks: what pullmail's
cost per message is compared with (issue 17).

    python bench/peers/floor_twisted.py --listen 127.0.1.15:2525 \
        --maildir /tmp/x/Maildir

Commands are lines (LineReceiver); the message after 354 is read in raw
mode, searched for CRLF.CRLF with bytes.find and unstuffed with one
replace, as a careful server frames it.  Prints "ready" once listening.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver

from maildir_store import Maildir

END = b"\r\n.\r\n"


class FloorSMTP(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir
        self.buffer = b""

    def connectionMade(self) -> None:
        self.sendLine(b"220 floor.bench ESMTP")

    def lineReceived(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.transport.write(b"250-floor.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 60000000\r\n")
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"DATA":
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
            self.buffer = b"\r\n"          # so that an empty message's "." is found too
            self.setRawMode()
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Command not recognized")

    def rawDataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(END, max(0, len(self.buffer) - len(data) - 4))
        if end < 0:
            return
        message = self.buffer[2:end + 2].replace(b"\r\n..", b"\r\n.")
        rest, self.buffer = self.buffer[end + len(END):], b""
        name = self.maildir.store(message)
        self.sendLine(b"250 2.0.0 Ok: queued as " + name.encode())
        self.setLineMode(rest)


class FloorFactory(protocol.Factory):
    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir

    def buildProtocol(self, addr):
        return FloorSMTP(self.maildir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--maildir", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    from twisted.internet import reactor

    reactor.listenTCP(int(port), FloorFactory(Maildir(args.maildir)), backlog=1024,
                      interface=host)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
