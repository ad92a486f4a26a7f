"""
Latency at light load (issue 17 item 4): one 2 KB message a second,
submitted on the sender's submission port (STARTTLS + AUTH), timed from
the submission's 250 to the file appearing in the receiver's maildir new/
(polled every millisecond), between the two nodes of the gd section:
General Delivery (the receiver offers GDEL: notification, then RETR) and
push (the receiver restarted without it).  Blocks of each mode are
interleaved (pull, push, push, pull); the first message of a block, which
opens connections and fills caches, is not counted.
"""

from __future__ import annotations

import asyncio
import math
import time

import common
from common import SMTPClient, make_message, table

RECIPIENT = "bob@r.bench"
SENDER = "alice@s.bench"
TIMEOUT = 60.0


def percentile(values: list[float], p: float) -> float:
    """Nearest rank (p in 0..100): with few values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _wait_for_file(new, before: int) -> float:
    """Poll C{new} every ms until it holds more than C{before} files; when it did."""
    deadline = time.monotonic() + TIMEOUT
    while common.count_files(new) <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no file in {new} {TIMEOUT:.0f} s after the 250")
        time.sleep(0.001)
    return time.monotonic()


async def _block(sender, new, count: int, log, mode: str) -> list[float]:
    """C{count} + 1 messages, one a second; the latencies (ms) of all but the first."""
    client = await SMTPClient.submission(sender, SENDER)
    latencies = []
    try:
        start = time.monotonic()
        for i in range(count + 1):
            await asyncio.sleep(max(0.0, start + i - time.monotonic()))
            before = common.count_files(new)
            await client.sendmail(SENDER, RECIPIENT, make_message(2048, f"latency {i}"))
            accepted = time.monotonic()
            seen = _wait_for_file(new, before)
            if i:
                latencies.append((seen - accepted) * 1000)
    finally:
        await client.quit()
    log(f"latency {mode}: {len(latencies)} msgs, median {percentile(latencies, 50):.1f} ms")
    return latencies


def run(args, workdir, dns, log) -> None:
    count = 16 if args.quick else 60          # per mode, in two blocks
    sender, receiver = common.gd_pair(workdir, dns, prefix="latency")
    new = receiver.maildir(RECIPIENT) / "new"
    latencies = {"pull": [], "push": []}
    sender.start()
    try:
        for mode in ("pull", "push", "push", "pull"):
            common.restart_as(receiver, mode)
            latencies[mode] += asyncio.run(_block(sender, new, count // 2, log, mode))
    finally:
        sender.stop()
        receiver.stop()
    rows = []
    for mode, what in (("pull", "General Delivery (GDEL, then RETR)"), ("push", "push")):
        values = latencies[mode]
        p50, p99 = percentile(values, 50), percentile(values, 99)
        args.results[f"latency_{mode}"] = (p50, p99, len(values))
        rows.append([what, str(len(values)), f"{min(values):.1f}", f"{p50:.1f}", f"{p99:.1f}",
                     f"{max(values):.1f}"])
    table(f"7. Latency at light load: submission's 250 → file in the receiver's maildir "
          f"({common.GD_SENDER_IP} → {common.GD_RECEIVER_IP}, 2 KB, 1 msg/s; new/ polled every ms)",
          ["mode", "msgs", "min ms", "p50 ms", "p99 ms (nearest rank)", "max ms"], rows)
