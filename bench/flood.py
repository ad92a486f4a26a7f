"""
The flood (issue 17 item 6): legitimate push throughput at 2 KB (smtp-source,
20 sessions) while the node holds 2,000 slow connections (bench/slowloris.py:
one octet every 10 s, half in a command line, half in DATA) and takes 500
GDEL/s from senders whose SPF fails (spam.bench, "v=spf1 -all", from
127.0.4.1-20, five notifications a session), against the same push with no
flood, interleaved.  Every address the floods could make the node connect to
(the GDEL sources, the slow clients' addresses and spam.bench's MX, port
2525) has a listener that counts connections: the target is none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import selectors
import socket
import threading
import time

import common
import slowloris
from common import PullmailServer, fmt, ratio, ratio_value, table

GDEL_RATE = 500.0          # notifications a second
GDEL_PER_SESSION = 5       # under half of [limits] max_errors: no tarpit, no 421
GDEL_WORKERS = 40
LORIS_INTERVAL = 10.0
# Legitimate messages per measured run, at least: --quick's 800 last half a
# second, where one scheduling hiccup on a shared machine decides the ratio.
MIN_PUSH = 3000
SETTLE = 1.0               # seconds after a flood ends: the node closes 2,000 connections


class Victims:
    """
    Listeners on C{addresses}:2525 in one thread (a selector, not a thread
    each): counts the connections the node opens to any of them, accepts
    and closes them at once.
    """

    def __init__(self, addresses: list[str], port: int = 2525) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.selector = selectors.DefaultSelector()
        for address in addresses:
            sock = socket.create_server((address, port), backlog=128)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, address)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            for key, _ in self.selector.select(0.2):
                with contextlib.suppress(OSError):
                    conn, _ = key.fileobj.accept()
                    conn.close()
                    self.counts[key.data] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


class Flood:
    """
    The slow connections and the GDEL flood, on an event loop in a thread of
    their own, until C{stop()}: replies to the GDELs counted by code.
    """

    def __init__(self, address: str, connections: int, rcpt: str) -> None:
        self.address, self.connections, self.rcpt = address, connections, rcpt
        self.held, self.refused, self.ready = [], [], []
        self.replies: collections.Counter = collections.Counter()
        self.sent = self.done = 0        # notifications due so far, and answered
        self.began, self.cpu0, self.load = time.monotonic(), 0.0, 0.0
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.tasks: list[asyncio.Task] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start both floods; return once the slow clients are all in place."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        deadline = time.monotonic() + timeout
        while len(self.ready) + len(self.refused) < self.connections:
            if time.monotonic() > deadline:
                raise RuntimeError(f"flood: {len(self.ready)} of {self.connections} slow "
                                   f"clients in place after {timeout:.0f} s")
            time.sleep(0.1)

    async def _start(self) -> None:
        self.tasks = slowloris.start(self.address, 2525, self.connections, LORIS_INTERVAL,
                                     self.held, self.refused, self.ready)
        self.began, self.cpu0 = time.monotonic(), time.thread_time()
        self.tasks += [asyncio.ensure_future(self._gdel_worker(i)) for i in range(GDEL_WORKERS)]

    def _next_slot(self) -> float:
        """When the next notification is due, at GDEL_RATE from the start."""
        self.sent += 1
        return self.began + self.sent / GDEL_RATE

    async def _gdel_worker(self, i: int) -> None:
        source = common.SPAM_CLIENT_IPS[i % len(common.SPAM_CLIENT_IPS)]
        while True:
            try:
                await self._gdel_session(source)
            except (OSError, ConnectionError, RuntimeError) as e:
                self.errors.append(repr(e))
                await asyncio.sleep(0.1)

    async def _gdel_session(self, source: str) -> None:
        client = await common.SMTPClient.connect(self.address, 2525, source=source)
        try:
            await client.ehlo("mx.spam.bench")
            for _ in range(GDEL_PER_SESSION):
                await asyncio.sleep(max(0.0, self._next_slot() - time.monotonic()))
                client.writer.write(
                    f"MAIL FROM:<x@spam.bench>\r\nRCPT TO:<{self.rcpt}>\r\n"
                    f"GDEL {secrets.token_urlsafe(24)}\r\n".encode())
                for _ in range(3):
                    code, _ = await client.reply()
                    self.replies[code] += 1
                self.done += 1
        finally:
            await client.quit()

    def stop(self) -> float:
        """End both floods; the GDEL rate achieved (notifications a second)."""
        if not self._thread.is_alive():
            return 0.0
        elapsed = time.monotonic() - self.began

        async def cancel():
            self.load = (time.thread_time() - self.cpu0) / elapsed     # the generator's share of a core
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        return self.done / elapsed


def run(args, workdir, dns, log) -> None:
    server = PullmailServer(workdir, dns)
    count = max(args.n2k, MIN_PUSH)
    rates = {"quiet": [], "flood": []}
    cpu = {"quiet": [], "flood": []}
    gdel_rates, load, in_place, replies, refused, errors = [], [], [], collections.Counter(), 0, 0
    victims = Victims(common.SPAM_CLIENT_IPS + slowloris.SOURCES + [common.SPAM_MX_IP])
    server.start()
    try:
        common.smtp_source(server, 20, 2048, args.warmup * count)         # warm-up, as in push
        for rnd in range(args.rounds):
            for mode in (("quiet", "flood") if rnd % 2 == 0 else ("flood", "quiet")):
                flood = Flood(server.address, args.loris, server.rcpt) if mode == "flood" else None
                try:
                    if flood is not None:
                        flood.start()
                        time.sleep(1.0)                          # the GDELs get going
                    one = common.measure_push(server, 20, 2048, count)
                finally:
                    if flood is not None:
                        in_place.append(len(flood.ready) - len(flood.held))
                        gdel_rates.append(flood.stop())
                        load.append(flood.load * 100)
                        replies.update(flood.replies)
                        refused += len(flood.refused)
                        errors += len(flood.errors)
                        time.sleep(SETTLE)       # not the next round's to pay for
                rates[mode].append(one["msgs"])
                cpu[mode].append(one["cpu"])
                log(f"flood round {rnd + 1} {mode}: {one['msgs']:.0f} msg/s, cpu {one['cpu']:.2f} "
                    f"ms/msg" + (f", GDEL {gdel_rates[-1]:.0f}/s" if flood else ""))
        time.sleep(2.0)                # a retrieval the GDELs set off would have begun by now
    finally:
        server.stop()
        victims.close()
    caused = victims.total
    args.results["flood"] = (ratio_value(rates["flood"], rates["quiet"]), caused)
    table(f"8. Legitimate push (2 KB × 20 sessions, {count} msgs/run) during a flood: {args.loris} "
          f"slow connections (an octet every {LORIS_INTERVAL:.0f} s) + {GDEL_RATE:.0f} GDEL/s "
          "from spam.bench (SPF -all); quiet and flooded rounds interleaved",
          ["rounds", "msgs/s", "node CPU ms per legitimate msg (floods included)"],
          [[mode, fmt(rates[mode]), fmt(cpu[mode], 2)] for mode in ("quiet", "flood")])
    extra = [(f - q) * r / g for f, q, r, g in zip(cpu["flood"], cpu["quiet"], rates["flood"], gdel_rates)
             if g]
    table("8. Flood figures", ["measure", "value"], [
        ["legitimate msgs/s, flood / quiet", ratio(rates["flood"], rates["quiet"])],
        ["node's extra CPU per flood GDEL, ms (slow connections' share included)", fmt(extra, 3)],
        ["slow connections still open at the end of a flooded round", fmt(in_place)],
        ["GDEL/s achieved during the flood", fmt(gdel_rates)],
        ["the floods' generator (one thread of the bench), % of a core", fmt(load)],
        ["replies to the flood's MAIL/RCPT/GDEL", ", ".join(f"{c}: {n}" for c, n in sorted(replies.items()))],
        ["slow connections refused at connect; GDEL sessions broken", f"{refused}; {errors}"],
        ["connections the node made to the floods' addresses", f"{caused} {dict(victims.counts)}"],
    ])
