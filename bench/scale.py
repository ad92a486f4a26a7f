"""
3. Scale curves, in-process on the real classes: MaildirOutbox.load(),
get(), a RETR lookup through PickupCounter (get + destined-host check +
claim rename), an expiry pass through Outbound._wake on a task.Clock, node
start-up time with the outbox on disk, and the Retriever's scheduler with
many pending notifications.

Synthetic outboxes are cached in $PULLMAIL_BENCH_CACHE (default
/tmp/pullmail-bench-cache) and reused by later runs.
"""

from __future__ import annotations

import enum
import os
import random
import secrets
import socket
import statistics
import sys
import time
from pathlib import Path

from common import STARTUP_IP, fmt, pullmail_node, status_kb, table
from twisted.internet import defer, task

from pullmail.config import DeliveryConfig
from pullmail.outbound.delivery import Outbound
from pullmail.pull.retrieve import Retriever
from pullmail.pull.serve import PickupCounter
from pullmail.pull.verbs import Retrieve
from pullmail.smtp.envelope import Session
from pullmail.storage.outbox import NOTIFIED, SNAPSHOT, MaildirOutbox, OutboxEntry
from pullmail.storage.pending import Notification, PendingStore
from pullmail.trust.throttle import FailureTracker

CACHE = Path(os.environ.get("PULLMAIL_BENCH_CACHE", "/tmp/pullmail-bench-cache"))
EXPIRE = 100          # entries expired in one measured pass, whatever N
EXPIRY_PASSES = 9     # measured passes (median); with the warm-up pass, 950 of the 1k entries
PEER = "127.0.1.40"   # the "destined host" the fake resolver names
BODY = b"From: a@x\r\nTo: b@y\r\nSubject: s\r\n\r\nhello\r\n"
DAY = 86400.0


def _entry(gid: str, expires: float) -> OutboxEntry:
    return OutboxEntry(id=gid, queue_id=secrets.token_hex(8).upper(), sender="alice@s.bench",
                       domain="far.bench", recipients=["bob@far.bench"], created=expires - 2 * DAY,
                       size=len(BODY), state=NOTIFIED, notified_at=expires - 2 * DAY,
                       expires=expires)


def _write_entry(root: Path, entry: OutboxEntry) -> None:
    for path, data in ((root / "entries" / f"{entry.id}.json", entry.to_json()),
                       (root / "data" / f"{entry.id}.eml", BODY)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.close(fd)


def outbox_dataset(n: int, log) -> tuple[Path, float]:
    """A folder with n NOTIFIED entries expiring at base+0 .. base+n-1 (s)."""
    root = CACHE / f"outbox-{n}"
    stamp = root / "READY"
    if stamp.exists():
        base = float(stamp.read_text())
        if base > time.time() + 7 * DAY and len(os.listdir(root / "entries")) == n:
            return root, base
    log(f"creating a synthetic outbox of {n} entries in {root}")
    if root.exists():
        os.system(f"rm -rf '{root}'")
    for sub in ("entries", "data", "claimed", "tmp"):
        (root / sub).mkdir(parents=True)
    base = time.time() + 30 * DAY
    t = time.monotonic()
    for i in range(n):
        _write_entry(root, _entry(secrets.token_urlsafe(24), base + i))
    os.sync()
    stamp.write_text(repr(base))
    log(f"  created in {time.monotonic() - t:.1f}s")
    return root, base


class FakeResolver:
    def mx(self, domain):
        return defer.succeed([(10, f"mx.{domain}")])

    def addresses(self, host):
        return defer.succeed([PEER])


def _measure_outbox(n: int, log) -> dict:
    root, base = outbox_dataset(n, log)
    out = {}
    MaildirOutbox(root).load()   # fills the page cache: the figures are of a warm start
    # Without a snapshot (a first start, or one after most entries changed):
    # every record file is read; the new snapshot is written apart.
    (root / SNAPSHOT).unlink(missing_ok=True)
    writes = []
    outbox = MaildirOutbox(root, run_blocking=lambda f, *a: writes.append((f, a)) or defer.Deferred())
    t = time.perf_counter()
    outbox.load()
    out["load_files_s"] = time.perf_counter() - t
    del outbox
    t = time.perf_counter()
    for function, args in writes:
        function(*args)
    out["snapshot_write_s"] = time.perf_counter() - t
    out["snapshot_mb"] = (root / SNAPSHOT).stat().st_size / 1e6
    rss = status_kb(os.getpid(), "VmRSS")
    outbox = MaildirOutbox(root)
    t = time.perf_counter()
    outbox.load()
    out["load_s"] = time.perf_counter() - t
    out["rss_per_entry_b"] = (status_kb(os.getpid(), "VmRSS") - rss) * 1024 / n
    out["entry_b"] = _bytes_per_entry(outbox._index)
    ids = list(outbox._index)
    rng = random.Random(1)
    sample = [rng.choice(ids) for _ in range(100_000)]
    t = time.perf_counter()
    for gid in sample:
        outbox.get(gid)
    out["get_ns"] = (time.perf_counter() - t) / len(sample) * 1e9

    # RETR lookup: PickupCounter.retrieve up to the claim (a rename), then release
    clock = task.Clock()
    clock.advance(base - DAY)
    pickup = PickupCounter(outbox, None, FakeResolver(), clock,
                           FailureTracker(clock, 10, 3600, 3600, 30), None)
    lookups = [rng.choice(ids) for _ in range(2000)]
    times = []
    for gid in lookups:
        request = Retrieve(Session(PEER, "smtp", helo="mx.far.bench", esmtp=True), gid)
        t = time.perf_counter()
        d = defer.Deferred.fromCoroutine(pickup.retrieve(request))
        times.append(time.perf_counter() - t)
        result = []
        d.addBoth(result.append)
        if getattr(result[0], "code", 250) != 250 and not hasattr(result[0], "reply"):
            raise RuntimeError(f"RETR lookup gave {result[0]!r}")
        outbox.release(gid)
    out["retr_us"] = statistics.median(times) * 1e6
    out["retr_mean_us"] = statistics.mean(times) * 1e6

    return out


def _bytes_per_entry(index: dict, sample: int = 10_000) -> float:
    """
    Memory per outbox entry: the index's table per entry, plus the entry
    and every object it alone holds (strings, lists, floats), over a
    sample; objects shared by all entries (None, an enum member, a small
    int) are not counted.
    """
    shared = {id(None), id(True), id(False), *(id(i) for i in range(-5, 257))}
    entries = random.Random(2).sample(list(index.values()), min(sample, len(index)))
    seen: set[int] = set()
    total = 0
    stack: list = list(entries)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in shared or isinstance(obj, enum.Enum):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, OutboxEntry):
            stack += [getattr(obj, name) for name in OutboxEntry.__slots__]
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple)):
            stack += obj
    return total / len(entries) + sys.getsizeof(index) / max(1, len(index))


class ExpiryRig:
    """
    An Outbound on a Clock over the dataset of C{n} entries, started (load +
    heap); each C{one_pass()} advances the clock over the next EXPIRE
    expiry times and times the wake that bounces them.  Rigs of all sizes
    live at once so that their passes can be interleaved.
    """

    WARM = 50

    def __init__(self, n: int, log) -> None:
        self.root, self.base = outbox_dataset(n, log)
        self.passes = 0
        self.bounces: list[str] = []
        self.in_files = 0.0       # reading the message for the DSN, two unlinks
        self.clock = task.Clock()
        self.clock.advance(self.base - DAY)
        outbox = MaildirOutbox(self.root)
        self.outbound = Outbound(outbox=outbox, resolver=FakeResolver(), connect=None,
                                 clock=self.clock, run_blocking=defer.maybeDeferred,
                                 hostname="mx.s.bench", config=DeliveryConfig(),
                                 send_bounce=lambda sender, message: self.bounces.append(sender))
        t = time.perf_counter()
        self.outbound.start()
        self.clock.advance(0)             # the start-up's later slices (TIMER_SLICE a turn)
        self.start_s = time.perf_counter() - t
        self.saved = sorted(outbox._index.values(), key=lambda e: e.expires)[
            :self.WARM + EXPIRY_PASSES * EXPIRE]
        t = time.perf_counter()
        self.outbound._wake()             # nothing due: the idle cost of a wake
        self.idle_wake_us = (time.perf_counter() - t) * 1e6
        outbox.remove, outbox.read_message = self._timed(outbox.remove), self._timed(outbox.read_message)
        self._advance_to(self.base + self.WARM - 0.5)
        self.outbound._wake()             # warm-up pass (imports, first DSN), not timed

    def _timed(self, function):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                self.in_files += time.perf_counter() - t0
        return wrapper

    def _advance_to(self, when: float) -> None:
        _stop_timer(self.outbound)        # else advance() would run the pass itself
        self.clock.advance(when - self.clock.seconds())

    def one_pass(self) -> tuple[float, float]:
        """µs per entry: in the reactor (without file I/O), and with it."""
        self.passes += 1
        self._advance_to(self.base + self.WARM + self.passes * EXPIRE - 0.5)
        self.in_files = 0.0
        t = time.perf_counter()
        self.outbound._wake()
        elapsed = time.perf_counter() - t
        return (elapsed - self.in_files) / EXPIRE * 1e6, elapsed / EXPIRE * 1e6

    def close(self) -> None:
        expected = self.WARM + self.passes * EXPIRE
        if len(self.bounces) != expected:
            raise RuntimeError(f"expiry passes bounced {len(self.bounces)}, expected {expected}")
        self.outbound.stop()
        for entry in self.saved:          # put the dataset back
            _write_entry(self.root, entry)


def _measure_expiry(sizes: list[int], log) -> dict[int, dict]:
    """Passes over all sizes in turn (A B C, C B A, …): medians of EXPIRY_PASSES each."""
    rigs = {n: ExpiryRig(n, log) for n in sizes}
    results = {n: {"in_reactor": [], "with_files": []} for n in sizes}
    try:
        for p in range(EXPIRY_PASSES):
            for n in (sizes if p % 2 == 0 else sizes[::-1]):
                in_reactor, with_files = rigs[n].one_pass()
                results[n]["in_reactor"].append(in_reactor)
                results[n]["with_files"].append(with_files)
    finally:
        for rig in rigs.values():
            rig.close()
    return {n: {"start_s": rigs[n].start_s, "idle_wake_us": rigs[n].idle_wake_us,
                "expiry_reactor_us": statistics.median(results[n]["in_reactor"]),
                "expiry_with_files_us": statistics.median(results[n]["with_files"])} for n in sizes}


def _measure_startup(n: int, workdir: Path, dns, log) -> dict:
    """
    A node over the dataset: seconds until it greets, until its outbox is
    indexed (read in the background: the 'outbox loaded' log line), the
    longest wait for a greeting meanwhile (the reactor's longest stall),
    and its RSS then.
    """
    root, _ = outbox_dataset(n, log)
    node = pullmail_node(workdir, f"startup-{n}", STARTUP_IP, "st.bench", [], dns=dns)
    node.state_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(root, node.state_dir / "outbox")
    t = time.monotonic()
    node.start(timeout=900)
    greeted = time.monotonic() - t
    stalls = []
    while b"outbox loaded" not in node.log_path.read_bytes() and time.monotonic() - t < 900:
        t0 = time.monotonic()        # a connection and its greeting: the reactor's turn-round
        with socket.create_connection((STARTUP_IP, 2525), timeout=120) as peer:
            peer.makefile("rb").readline()
        stalls.append(time.monotonic() - t0)
        time.sleep(0.05)
    indexed = time.monotonic() - t
    rss = status_kb(node.pid, "VmRSS") / 1024
    node.stop()
    return {"greet_s": greeted, "indexed_s": indexed, "rss_mb": rss,
            "stall_ms": max(stalls, default=0.0) * 1e3}


def _measure_scheduler(n: int, peers: int = 200) -> dict:
    clock = task.Clock()
    clock.advance(1_000_000)
    store = PendingStore(Path("/nonexistent"))
    for i in range(n):
        store._remember(Notification(
            gdel_id=secrets.token_urlsafe(24), origin="s.bench", peer=f"10.0.{i % peers // 250}.{i % peers % 250}",
            helo="mx.s.bench", sender="a@s.bench", recipients=["b@r.bench"],
            notified_at=clock.seconds() - 10, next_attempt=clock.seconds() - 10 + (i % 7)))
    hanging = []

    def connect(address, port):
        d = defer.Deferred()
        hanging.append(d)
        return d

    def no_disk(function, *args):
        return defer.succeed(None)

    retriever = Retriever(store=store, trust=None, connect=connect, clock=clock,
                          run_blocking=no_disk,
                          hostname="mx.r.bench", schedule=(0.0, 600.0), remote_port=2525,
                          keep_for=2 * DAY, pending_per_origin=10**9, policy=None,
                          per_minute=10**9, deliver=None)
    t = time.perf_counter()
    for notification in store:
        retriever._push(notification)
    push_s = time.perf_counter() - t
    t = time.perf_counter()
    retriever._wake()          # connections start; the rest of the due notifications wait
    first = time.perf_counter() - t
    _stop_timer(retriever)
    wakes = []
    for _ in range(20):         # one connection ends; the scheduler hands out more
        finished = hanging.pop(0)
        t = time.perf_counter()
        finished.errback(ConnectionRefusedError("bench"))
        wakes.append(time.perf_counter() - t)
        _stop_timer(retriever)
    return {"push_us": push_s / n * 1e6, "first_ms": first * 1e3,
            "wake_ms": statistics.median(wakes) * 1e3}


def _stop_timer(obj) -> None:
    """Cancel the service's pending wake-up (its next _arm sets it again)."""
    obj.stop()


def run(args, workdir, log) -> None:
    """The tables; the start-up at the largest size and its memory per entry into args.results."""
    sizes = [s for s in (1000, 10_000, 100_000, 1_000_000) if s <= args.scale_max]
    res = {}
    _measure_outbox(sizes[0], log)   # warm-up: a cold process made the first row up to 1.6x slower
    for n in sizes:
        log(f"scale: outbox of {n}")
        res[n] = _measure_outbox(n, log)
    for n, figures in _measure_expiry(sizes, log).items():
        res[n].update(figures)
    startup = {}
    dns = None
    rss_empty = _measure_startup(0, workdir, dns, log)["rss_mb"]   # the baseline of memory per entry
    for n in sizes:
        runs = [_measure_startup(n, workdir, dns, log)
                for _ in range(1 if n >= 1_000_000 or args.quick else 3)]
        startup[n] = {key: [run[key] for run in runs] for key in runs[0]}
        log(f"scale: startup with {n}: greets in {min(startup[n]['greet_s']):.2f}s, "
            f"indexed in {min(startup[n]['indexed_s']):.2f}s")
    rows = []
    for n in sizes:
        r = res[n]
        rows.append([f"{n:,}", f"{r['load_files_s']:.2f}", f"{r['load_s']:.2f}",
                     f"{r['load_s'] / n * 1e6:.1f}", f"{r['snapshot_write_s']:.2f}",
                     f"{r['entry_b']:.0f}", f"{r['rss_per_entry_b']:.0f}",
                     f"{r['get_ns']:.0f}", f"{r['retr_us']:.1f}", f"{r['start_s']:.2f}",
                     f"{r['idle_wake_us']:.1f}", f"{r['expiry_reactor_us']:.0f}", f"{r['expiry_with_files_us']:.0f}",
                     fmt(startup[n]["greet_s"], 2), fmt(startup[n]["indexed_s"], 2),
                     f"{max(startup[n]['stall_ms']):.0f}", f"{startup[n]['rss_mb'][-1]:.0f}",
                     f"{(startup[n]['rss_mb'][-1] - rss_empty) * 1024 * 1024 / n:,.0f}"])
    table("3. Outbox scale (warm page cache; load = MaildirOutbox.load(), from the record files "
          "(no snapshot) and with the snapshot; memory per entry = the entry, what it alone holds "
          "and its share of the index, and the RSS growth of a load ÷ entries; RETR lookup = "
          "PickupCounter.retrieve with a fake "
          "resolver: get + destined check + claim rename, median; expiry = one Outbound._wake "
          f"expiring {EXPIRE} entries incl. DSN, median of {EXPIRY_PASSES} passes interleaved across the sizes; "
          "'in the reactor' leaves out "
          "reading the message and the two unlinks, which a node does in threads; the node reads its "
          "outbox in a thread: it greets first, and 'longest stall' is its slowest greeting of a new "
          "connection until the outbox is indexed)",
          ["entries", "load() from files s", "load() with snapshot s", "…µs/entry",
           "snapshot write s", "memory B/entry", "RSS B/entry",
           "get() ns", "RETR lookup µs",
           "Outbound.start() s", "idle wake µs", "expiry µs/entry in the reactor",
           "…with its file I/O", "node greets s", "node indexed s", "longest stall ms",
           "node RSS MB", f"B per entry (RSS over an empty outbox's {rss_empty:.0f} MB)"],
          rows)
    hi = sizes[-1]
    if hasattr(args, "results"):     # bench.py's targets table
        args.results["startup"] = (hi, statistics.median(startup[hi]["greet_s"]),
                                   (startup[hi]["rss_mb"][-1] - rss_empty) * 1024 * 1024 / hi)
    lo, hi = sizes[0], sizes[-1]
    rows = [
        [f"RETR lookup {hi:,}/{lo:,}", f"{res[hi]['retr_us'] / res[lo]['retr_us']:.2f}", "≤ 1.2"],
        [f"get() {hi:,}/{lo:,}", f"{res[hi]['get_ns'] / res[lo]['get_ns']:.2f}",
         "(part of RETR lookup; the dict outgrows the CPU caches)"],
        [f"expiry per entry in the reactor {hi:,}/{lo:,}",
         f"{res[hi]['expiry_reactor_us'] / res[lo]['expiry_reactor_us']:.2f}", "≤ 1.2"],
        [f"expiry per entry with its file I/O {hi:,}/{lo:,}",
         f"{res[hi]['expiry_with_files_us'] / res[lo]['expiry_with_files_us']:.2f}", "≤ 1.2"],
        [f"load per entry {hi:,}/{lo:,}",
         f"{(res[hi]['load_s'] / hi) / (res[lo]['load_s'] / lo):.2f}", "(flat)"],
    ]
    if 100_000 in startup:
        rows.append(["node startup with 100,000 entries",
                     f"{statistics.median(startup[100_000]['greet_s']):.2f} s", "< 5 s"])
    if 1_000_000 in startup:
        rows += [["node startup with 1,000,000 entries (greets)",
                  f"{min(startup[1_000_000]['greet_s']):.2f} s", "≤ 10 s"],
                 ["…its outbox indexed", f"{min(startup[1_000_000]['indexed_s']):.2f} s",
                  "(in the background)"]]
    rows.append([f"memory per outbox entry ({hi:,})", f"{res[hi]['entry_b']:.0f} B",
                 f"(RSS growth {res[hi]['rss_per_entry_b']:.0f} B)"])
    table("3. Scale ratios", ["measure", "value", "target"], rows)

    rows = []
    for n in [s for s in (1000, 10_000, 100_000) if s <= max(args.scale_max, 100_000)]:
        r = _measure_scheduler(n)
        rows.append([f"{n:,}", f"{r['push_us']:.2f}", f"{r['first_ms']:.1f}", f"{r['wake_ms']:.2f}",
                     f"{r['wake_ms'] * 1000 / n:.3f}"])
        log(f"scheduler {n}: wake {r['wake_ms']:.2f} ms")
    table("3. Retrieval scheduler (Retriever._wake on a Clock; all notifications due, 200 notifying "
          "peers, 20 connections busy; a later wake = after one peer finishes)",
          ["pending", "heap push µs/notif", "first wake ms", "later wake ms", "later wake µs / pending"],
          rows)
