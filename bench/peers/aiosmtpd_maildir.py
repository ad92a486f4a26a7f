"""
The fair Python peer: aiosmtpd with a small maildir handler that makes each
message durable before its 250, the way pullmail does (maildir_store.py:
write into tmp/, fsync the file, rename into new/, fsync new/).

    python bench/peers/aiosmtpd_maildir.py --listen 127.0.1.11:2525 \
        --maildir /tmp/x/Maildir [--inline]

By default the disk work runs in a thread pool (4 threads, like pullmail's
disk pool) so that sessions overlap their fsyncs; --inline does it in the
event loop, which wins where an fsync is cheap and the thread hops cost
more than they save (issue 17).  The bench runs both.  Prints "ready" on
stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys

from aiosmtpd.smtp import SMTP
from maildir_store import Maildir


class MaildirHandler:
    def __init__(self, root: str, inline: bool) -> None:
        self.maildir = Maildir(root)
        self.inline = inline
        self.pool = None if inline else concurrent.futures.ThreadPoolExecutor(4)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or envelope.content
        if self.inline:
            name = self.maildir.store(data)
        else:
            name = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.maildir.store, data)
        return f"250 2.0.0 Ok: queued as {name}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--inline", action="store_true")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    handler = MaildirHandler(args.maildir, args.inline)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="aiosmtpd.bench", data_size_limit=50_000_000,
                         decode_data=False, ident="aiosmtpd bench"),
            host, int(port), backlog=1024, reuse_address=True,
        )
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
