"""
pullmail benchmarks: see README.rst, "Benchmarks".  Run through bench/run.

Every section measures pullmail and its peers in the same run, interleaved
(A B A B ...), and prints medians with min–max and ratios.  Targets are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import targets  # noqa: E402
from common import (  # noqa: E402
    AiosmtpdInlineServer,
    AiosmtpdServer,
    CountingProxy,
    FloorServer,
    PostfixServer,
    PullmailServer,
    SinkServer,
    SMTPClient,
    count_files,
    fmt,
    make_message,
    pullmail_node,
    ratio,
    ratio_value,
    smtp_source,
    summary,
    status_kb,
    table,
    tree_cpu_seconds,
    wait_until,
)

SECTIONS = ("push", "features", "dkim", "gd", "latency", "scale", "idle", "wire", "flood",
            "chunking", "profile", "store", "slowloris", "cluster")
# What bench/run runs without --only: every section the targets table needs, and more.
DEFAULT_SECTIONS = "push,features,gd,latency,scale,idle,wire,flood,chunking"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- 1. push receive ---------------------------------------------------------------------

def _peer_wanted(args, name: str) -> bool:
    """--peers names a peer by its family: "aiosmtpd" is both of its configurations."""
    return name == "pullmail" or name in args.peers or name.split("-")[0] in args.peers


def push_servers(args, workdir, dns):
    """pullmail and the peers --peers asks for (only those are set up: Postfix needs root)."""
    makers = {"pullmail": lambda: PullmailServer(workdir, dns), "floor": lambda: FloorServer(workdir),
              "aiosmtpd-inline": lambda: AiosmtpdInlineServer(workdir),
              "aiosmtpd-pool": lambda: AiosmtpdServer(workdir),
              "postfix": lambda: PostfixServer(workdir), "smtp-sink": lambda: SinkServer(workdir)}
    return [make() for name, make in makers.items() if _peer_wanted(args, name)]


def bench_push(args, workdir, dns):
    servers = push_servers(args, workdir, dns)
    loads = [("2 KB × 20 sessions", 2048, 20, args.n2k), ("100 KB × 10 sessions", 102400, 10, args.n100k)]
    results = {}  # (load, server) -> dict of lists
    for s in servers:
        log(f"starting {s.name}")
        s.start()
    try:
        for label, size, sessions, count in loads:
            # Warm-up, the same for each: two measured runs (one in a quick
            # run).  The first few thousand files a server writes into a fresh
            # folder cost this VM up to three times the kernel time of later
            # ones (bench/README.md, push).
            for s in servers:
                smtp_source(s, sessions, size, args.warmup * count)
            for rnd in range(args.rounds):
                for s in (servers if rnd % 2 == 0 else servers[::-1]):
                    one = common.measure_push(s, sessions, size, count)
                    r = results.setdefault((label, s.name), {k: [] for k in one})
                    for k, v in one.items():
                        r[k].append(v)
                    log(f"push {label} round {rnd + 1} {s.name}: {one['msgs']:.0f} msg/s, "
                        f"cpu {one['cpu']:.2f} ms/msg")
    finally:
        for s in servers:
            s.stop()
    for label, size, sessions, count in loads:
        rows = [[s.name, fmt(r["msgs"]), fmt(r["mb"], 1), fmt(r["cpu"], 2), fmt(r["rss"], 1)]
                for s in servers for r in [results[(label, s.name)]]]
        table(f"1. Push receive, {label}, {count} msgs/run, {args.rounds} rounds "
              "(median (min–max)); server CPU = all its processes (pullmail: node + fsync helper; "
              "Postfix: every process, reaped ones included)",
              ["server", "msgs/s", "MB/s", "server CPU ms/msg", "peak PSS MB (all processes)"], rows)
    _push_ratios(args, loads, results)
    return results


def _push_ratios(args, loads, results) -> None:
    """The ratios of issue 17 (against the faster aiosmtpd of this run) into args.results."""
    rows = []
    for (label, *_), key in zip(loads, ("2k", "100k")):
        msgs = lambda name: results.get((label, name), {}).get("msgs", [])
        aio = [n for n in ("aiosmtpd-inline", "aiosmtpd-pool") if (label, n) in results]
        best = max(aio, key=lambda n: summary(msgs(n))[0]) if aio else None
        if best:
            args.results[f"push_{key}_aiosmtpd"] = (ratio_value(msgs("pullmail"), msgs(best)), best)
            rows.append([label, f"msgs/s, pullmail / {best} (the faster aiosmtpd)",
                         ratio(msgs("pullmail"), msgs(best))])
        for peer in ("postfix", "floor", "smtp-sink"):
            if (label, peer) in results:
                args.results[f"push_{key}_{peer}"] = ratio_value(msgs("pullmail"), msgs(peer))
                rows.append([label, f"msgs/s, pullmail / {peer}", ratio(msgs("pullmail"), msgs(peer))])
        if (label, "floor") in results:
            cpu = lambda name: results[(label, name)]["cpu"]
            args.results[f"push_{key}_cpu_floor"] = ratio_value(cpu("pullmail"), cpu("floor"))
            rows.append([label, "server CPU per message, pullmail / floor",
                         ratio(cpu("pullmail"), cpu("floor"))])
    table("1. Push receive ratios (medians; targets in the final table)", ["load", "ratio", "measured"],
          rows)


# -- 1b. DKIM: verifying signed mail, signing submissions ----------------------------------

def _cpu_per_call(function, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        function()
    return (time.process_time() - started) / n * 1000


def bench_dkim(args, workdir, dns):
    """
    Push receive of a 2 KB message with verification on (it always is):
    the same message unsigned and signed (RSA + Ed25519, key records in
    the bench DNS server), interleaved; and the in-process CPU cost of
    signing one submission and verifying one signed message.
    """
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from pullmail.net.dns import TXTAnswer
    from pullmail.testing import result_of
    from pullmail.trust.dkim import Verifier
    from pullmail.trust.dkim_records import KeyRecords

    files, signer, plain, keys = common.dkim_messages(workdir, dns)
    server = PullmailServer(workdir, dns)
    count = args.n2k
    cpu = {"unsigned": [], "signed": []}
    rate = {"unsigned": [], "signed": []}
    server.start()
    try:
        for name in ("unsigned", "signed"):        # warm-up
            common.smtp_source(server, 20, 2048, count, path=files[name])
        for rnd in range(args.rounds):
            for name in (("unsigned", "signed") if rnd % 2 == 0 else ("signed", "unsigned")):
                one = common.measure_push(server, 20, 2048, count, path=files[name])
                cpu[name].append(one["cpu"])
                rate[name].append(one["msgs"])
                log(f"dkim push {name} round {rnd + 1}: {one['msgs']:.0f} msg/s, "
                    f"cpu {one['cpu']:.2f} ms/msg")
        # The last files by name: the two inputs of a round may share a second.
        heads = [path.read_bytes().split(b"\r\n\r\n")[0]
                 for path in server.node.delivered_paths(server.rcpt)[-40:]]
        verified = [head for head in heads if b"DKIM-Signature:" in head]
        assert verified and all(head.count(b"dkim=pass") == 2 for head in verified), heads[-1]
    finally:
        server.stop()
    extra = [s - u for s, u in zip(sorted(cpu["signed"]), sorted(cpu["unsigned"]))]
    records = {k.record_name.rstrip("."): k.record_value for k in keys["dkim.bench"]}
    verifier = Verifier(KeyRecords(lambda name: defer.succeed(TXTAnswer([records[name]], 3600)),
                                   Clock()), None)
    signed = b"".join(signer.sign([plain]))
    n = 500 if args.quick else 2000
    sign_ms = _cpu_per_call(lambda: signer.sign([plain]), n)
    verify_ms = _cpu_per_call(lambda: result_of(verifier.verify(signed)), n)
    table(f"1b. Push receive 2 KB × 20 sessions with DKIM/DMARC verification on, {count} msgs/run, "
          f"{args.rounds} rounds (median (min–max))",
          ["input message", "msgs/s", "node CPU ms/msg (node + fsync helper)"],
          [[name, fmt(rate[name]), fmt(cpu[name], 2)] for name in ("unsigned", "signed")])
    table("1b. DKIM CPU per message (in process, 2 KB, RSA-2048 + Ed25519)",
          ["what", "measured", "target"],
          [["node: signed minus unsigned push, ms", fmt(extra, 3), "≤ 0.3 ms"],
           ["verify both signatures (keys cached), ms", f"{verify_ms:.3f}", "≤ 0.3 ms"],
           ["sign a submission (both algorithms), ms", f"{sign_ms:.3f}", "≤ 1 ms"]])


# -- 2. General Delivery -------------------------------------------------------------------

async def _notify_load(address, total, sessions, rcpt):
    per = total // sessions

    async def one():
        client = await SMTPClient.connect(address, 2525, source=common.NOTIFY_CLIENT_IP)
        await client.ehlo("client.spf.bench")
        for _ in range(per):
            gid = secrets.token_urlsafe(24)
            client.writer.write(f"MAIL FROM:<a@spf.bench>\r\nRCPT TO:<{rcpt}>\r\nGDEL {gid}\r\n".encode())
            for _ in range(3):
                code, text = await client.reply()
                if code != 250:
                    raise RuntimeError(f"GDEL load: {text!r}")
        await client.quit()

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(sessions)))
    return per * sessions / (time.monotonic() - start)


async def _submit_load(node, total, sessions, size, sender, rcpt):
    per = total // sessions

    async def one(i):
        client = await SMTPClient.submission(node, sender)
        for j in range(per):
            await client.sendmail(sender, rcpt, make_message(size, f"{i}-{j}"))
        await client.quit()

    await asyncio.gather(*(one(i) for i in range(sessions)))
    return per * sessions


def bench_gd(args, workdir, dns):
    # a) notifications accepted per second
    node = pullmail_node(workdir, "notify", common.NOTIFY_NODE_IP, "n.bench", ["bob@n.bench"],
                         settings={"retrieval": {"schedule": ["10h"]}}, dns=dns)
    node.start()
    rates, cpus = [], []
    try:
        asyncio.run(_notify_load(node.address, 20, 20, "bob@n.bench"))  # warm SPF cache
        for rnd in range(args.rounds):
            cpu0 = tree_cpu_seconds(node.pid)
            rate = asyncio.run(_notify_load(node.address, args.ngdel, 20, "bob@n.bench"))
            cpus.append((tree_cpu_seconds(node.pid) - cpu0) / args.ngdel * 1000)
            rates.append(rate)
            log(f"GDEL round {rnd + 1}: {rate:.0f}/s")
        rss = status_kb(node.pid, "VmHWM") / 1024
    finally:
        node.stop()
    table(f"2a. GDEL notifications accepted (20 sessions, pipelined MAIL/RCPT/GDEL, SPF cached, "
          f"{args.ngdel}/run)", ["server", "notifications/s", "node CPU ms/notification", "peak RSS MB"],
          [["pullmail", fmt(rates), fmt(cpus, 2), f"{rss:.1f}"]])

    # b) end to end: submit -> GDEL -> RETR -> maildir, vs push between the same nodes
    sender, receiver = common.gd_pair(workdir, dns)
    sender.start()
    results = {"pull": [], "push": []}
    cpu = {"pull": [], "push": []}
    outbox = sender.state_dir / "outbox" / "entries"
    try:
        for rnd in range(args.rounds + 1):   # round 0 is a warm-up
            for mode in ("pull", "push"):
                common.restart_as(receiver, mode)
                count = args.ne2e if rnd else 20
                before = len(receiver.delivered_paths("bob@r.bench"))
                c0 = tree_cpu_seconds(sender.pid) + tree_cpu_seconds(receiver.pid)
                start = time.monotonic()
                asyncio.run(_submit_load(sender, count, 10, 2048, "alice@s.bench", "bob@r.bench"))
                submitted = time.monotonic() - start
                wait_until(lambda: len(receiver.delivered_paths("bob@r.bench")) >= before + count,
                           300, interval=0.02, message=f"{mode}: {count} delivered")
                elapsed = time.monotonic() - start
                used = tree_cpu_seconds(sender.pid) + tree_cpu_seconds(receiver.pid) - c0
                wait_until(lambda: count_files(outbox) == 0, 60, message="sender outbox to empty")
                if rnd:
                    results[mode].append(count / elapsed)
                    cpu[mode].append(used / count * 1000)
                log(f"e2e {mode} round {rnd}: {count / elapsed:.0f} msg/s (submission took {submitted:.2f}s)")
    finally:
        sender.stop()
        receiver.stop()
    table(f"2b. End to end between two nodes ({common.GD_SENDER_IP} -> {common.GD_RECEIVER_IP}), "
          f"2 KB, {args.ne2e} msgs/run submitted over 10 STARTTLS+AUTH sessions, until all in the maildir",
          ["mode", "msgs/s", "CPU ms/msg (both nodes and their helpers)"],
          [["General Delivery (GDEL+RETR)", fmt(results["pull"]), fmt(cpu["pull"], 2)],
           ["push (receiver without GDEL)", fmt(results["push"]), fmt(cpu["push"], 2)]])
    args.results["gd_ratio"] = ratio_value(results["pull"], results["push"])
    table("2. Ratios", ["ratio", "measured", "target"],
          [["GD end to end / push end to end", ratio(results["pull"], results["push"]), "≥ 0.8×"]])


# -- 2c. the PostgreSQL backend beside the files ----------------------------------------------

def bench_store(args, workdir, dns):
    """
    SPEC 11.3: GDEL notifications accepted per second, and 2 KB submissions
    queued for a remote domain per second (each an outbox write before its
    250), with [store] backend = "files" and "postgresql" (a private
    PostgreSQL on this machine, started for the run, fsync on like a
    production server), interleaved.
    """
    cluster = common.private_postgres(log, "store")
    if cluster is None:
        return
    try:
        import psycopg

        from pullmail.storage.postgresql.schema import initdb

        with psycopg.connect(cluster.dsn) as connection:
            initdb(connection)
        backends = {"files": {"backend": "files"},
                    "postgresql": {"backend": "postgresql", "dsn": cluster.dsn}}
        gdel = {name: [] for name in backends}
        queued = {name: [] for name in backends}
        for rnd in range(args.rounds + 1):   # round 0 is a warm-up
            for name, store in backends.items():
                node = pullmail_node(workdir, f"store-{name}", common.NOTIFY_NODE_IP, "n.bench",
                                     ["bob@n.bench", "alice@n.bench"], dns=dns, settings={
                                         "retrieval": {"schedule": ["10h"]}, "store": store,
                                         "delivery": {"push_retry": ["10h"]}})
                node.start()
                try:
                    total = args.ngdel if rnd else 40
                    rate = asyncio.run(_notify_load(node.address, total, 20, "bob@n.bench"))
                    count = args.n2k // 2 if rnd else 20
                    start = time.monotonic()
                    asyncio.run(_submit_load(node, count, 10, 2048, "alice@n.bench",
                                             "carol@r.bench"))
                    submitted = count / (time.monotonic() - start)
                finally:
                    node.stop()
                if rnd:
                    gdel[name].append(rate)
                    queued[name].append(submitted)
                log(f"store {name} round {rnd}: GDEL {rate:.0f}/s, queued {submitted:.0f}/s")
    finally:
        cluster.destroy()
    table(f"2c. [store] backends (GDEL: 20 sessions, {args.ngdel}/run; 2 KB submissions queued "
          f"for a remote domain: 10 STARTTLS+AUTH sessions, {args.n2k // 2}/run)",
          ["backend", "GDEL accepted/s", "2 KB queued/s"],
          [[name, fmt(gdel[name]), fmt(queued[name])] for name in backends])
    table("2c. Ratios", ["ratio", "measured", "target"],
          [["postgresql / files, GDEL", ratio(gdel["postgresql"], gdel["files"]), "≥ 0.5×"],
           ["postgresql / files, 2 KB queued", ratio(queued["postgresql"], queued["files"]),
            "≥ 0.5×"]])


# -- latency at light load ------------------------------------------------------------------

def bench_latency(args, workdir, dns):
    import latency
    latency.run(args, workdir, dns, log)


# -- 3. scale ------------------------------------------------------------------------------

def bench_scale(args, workdir, dns):
    import scale
    scale.run(args, workdir, log)


# -- 4. idle connections -------------------------------------------------------------------

async def _open_idle(address, port, n, sources, conns, missing):
    sem = asyncio.Semaphore(200)

    async def one(i):
        async with sem:
            reader, writer = await asyncio.open_connection(
                address, port, local_addr=(sources[i % len(sources)], 0))
            conns.append(writer)
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
            except asyncio.TimeoutError:
                missing.append(i)
                return
            if not line.startswith(b"220"):
                raise RuntimeError(f"greeting {line!r}")

    await asyncio.gather(*(one(i) for i in range(n)))


def bench_idle(args, workdir, dns):
    counts = [c for c in (1000, 5000) if c <= args.idle_max]
    makers = {"pullmail": lambda: PullmailServer(workdir, dns), "aiosmtpd": lambda: AiosmtpdServer(workdir),
              }  # smtp-sink caps its sessions: no idle figure
    makers = {k: v for k, v in makers.items() if _peer_wanted(args, k)}
    per = {}   # (name, n) -> [KB per conn]
    total = {}
    for rnd in range(args.idle_rounds):
        for name, make in (makers.items() if rnd % 2 == 0 else list(makers.items())[::-1]):
            server = make()
            server.start()
            try:
                time.sleep(0.3)
                base = sum(status_kb(p, "VmRSS") for p in server.pids())

                async def run():
                    conns, opened, missing = [], 0, []
                    for n in counts:
                        await _open_idle(server.address, server.port, n - opened, common.IDLE_CLIENT_IPS,
                                         conns, missing)
                        if missing:
                            log(f"idle {name}: {len(missing)} of {n} connections got no greeting in 10 s")
                        opened = n
                        await asyncio.sleep(1.0)
                        rss = sum(status_kb(p, "VmRSS") for p in server.pids())
                        per.setdefault((name, n), []).append((rss - base) / n)
                        total.setdefault((name, n), []).append(rss / 1024)
                    for w in conns:
                        w.close()
                    await asyncio.sleep(0.2)

                asyncio.run(run())
                log(f"idle round {rnd + 1} {name}: " + ", ".join(
                    f"{n}: {per[(name, n)][-1]:.1f} KB/conn" for n in counts))
            finally:
                server.stop()
    rows = [[name, str(n), fmt(total[(name, n)], 1), fmt(per[(name, n)], 1)]
            for name in makers for n in counts if (name, n) in per]
    table(f"4. Idle connections after the greeting ({args.idle_rounds} rounds); Postfix not run "
          "(a process per session, ~1 MB each)",
          ["server", "connections", "server RSS MB", "KB per connection (target ≤ 50)"], rows)


# -- 5. wire cost ----------------------------------------------------------------------------

def bench_wire(args, workdir, dns):
    ws = pullmail_node(workdir, "wire-sender", common.WIRE_SENDER_IP, "ws.bench", ["alice@ws.bench"],
                       dns=dns, smtp_port=2526)
    wr = pullmail_node(workdir, "wire-receiver", common.WIRE_RECEIVER_IP, "wr.bench", ["bob@wr.bench"],
                       dns=dns, smtp_port=2526)
    proxies = [CountingProxy((n.address, 2525), (n.address, 2526)) for n in (ws, wr)]
    sizes = [(1024, "1 KB", 20), (10240, "10 KB", 20), (1024 * 1024, "1 MB", 4)]
    rows, cost = [], {}
    ws.start()
    try:
        for mode in ("pull", "push"):
            common.restart_as(wr, mode)
            for size, label, k in sizes:
                k = max(2, k // (2 if args.quick else 1))
                before = len(wr.delivered_paths("bob@wr.bench"))
                for p in proxies:
                    p.reset()
                asyncio.run(_submit_load(ws, k, 1, size, "alice@ws.bench", "bob@wr.bench"))
                wait_until(lambda: len(wr.delivered_paths("bob@wr.bench")) >= before + k, 120,
                           message=f"wire {mode} {label}")
                wait_until(lambda: count_files(ws.state_dir / "outbox" / "entries") == 0, 30)
                # Let QUITs and closes pass the proxies, cached connections
                # too ([delivery] connection_cache_time): none is counted twice.
                wait_until(lambda: all(p.open == 0 for p in proxies), 30,
                           message="connections through the proxies to close")
                up = sum(p.up for p in proxies)
                down = sum(p.down for p in proxies)
                conns = sum(p.connections for p in proxies)
                turns = sum(p.turns for p in proxies)
                msg = len(make_message(size))
                cost[(mode, label)] = (up + down) / k
                if mode == "pull" and label == "1 MB":
                    args.results["wire_conns_1m"] = conns / k
                rows.append([label, mode, f"{(up + down) / k:,.0f}", f"{(up + down) / k - msg:,.0f}",
                             f"{conns / k:.2f}", f"{turns / k:.1f}"])
                log(f"wire {mode} {label}: {(up + down) / k:.0f} B/msg, {turns / k:.1f} RTT/msg")
    finally:
        ws.stop()
        wr.stop()
        for p in proxies:
            p.close()
    rows.sort(key=lambda r: ([s[1] for s in sizes].index(r[0]), r[1]))
    for size, label, k in sizes:
        rows.append([label, "pull/push bytes", f"{cost[('pull', label)] / cost[('push', label)]:.3f}×", "", "", ""])
    args.results["wire_bytes_10k"] = cost[("pull", "10 KB")] / cost[("push", "10 KB")]
    table("5. Wire cost per message between two nodes (MX ports only, both directions, TCP payload "
          "incl. STARTTLS; submission and DNS not counted; one message per submission)",
          ["size", "mode", "bytes/msg", "overhead B/msg", "TCP conns/msg", "round trips/msg"], rows)


# -- chunking ----------------------------------------------------------------------------------

def bench_chunking(args, workdir, dns):
    """
    RFC 3030: what sending one BDAT LAST saves over DATA, both ends, in
    process: the sender's dot-stuffing and the receiver's framing (the DATA
    reader's scans and unstuffing) against a join and an exact-octet read.
    """
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from pullmail.smtp.client import dot_stuff
    from pullmail.smtp.connection import Connection

    def data_path(chunks):
        wire = dot_stuff(chunks)
        connection = Connection()
        connection.read_message(1 << 40)
        connection.receive_data(wire)
        return connection.next_event()

    def bdat_path(chunks):
        data = b"".join(chunks)
        connection = Connection()
        connection.receive_data(b"BDAT %d LAST\r\n" % len(data) + data)
        connection.next_event()                 # the command line, for the machine
        connection.read_octets(len(data))
        return connection.next_event()

    rows = []
    for label, size in [("100 KB", 100_000), ("1 MB", 1_000_000), ("10 MB", 10_000_000)]:
        lines = [(b"." if i % 10 == 0 else b"") + b"x" * 70 + b"\r\n" for i in range(size // 73)]
        chunks = [b"Subject: bench\r\n\r\n" + b"".join(lines)]
        timings = {"DATA": [], "BDAT": []}
        for _ in range(args.rounds):
            for name, path in (("DATA", data_path), ("BDAT", bdat_path)):
                started = time.perf_counter()
                path(chunks)
                timings[name].append((time.perf_counter() - started) * 1000)
        rows.append([label, fmt(timings["DATA"], 2) + " ms", fmt(timings["BDAT"], 2) + " ms",
                     ratio(timings["DATA"], timings["BDAT"])])
    table("6. Framing one message, sender and receiver together, in process: DATA (dot-stuffing, "
          "CRLF.CRLF search, unstuffing) vs one BDAT LAST (RFC 3030); every tenth line dot-led",
          ["size", "DATA", "BDAT", "DATA / BDAT"], rows)


# -- profile -----------------------------------------------------------------------------------

def bench_profile(args, workdir, dns):
    import profile_pullmail
    profile_pullmail.run(args, workdir, dns, log)


def bench_flood(args, workdir, dns):
    import flood
    flood.run(args, workdir, dns, log)


def bench_features(args, workdir, dns):
    import features
    features.run(args, workdir, dns, log)


def bench_cluster(args, workdir, dns):
    """End to end through a two-node cluster over one PostgreSQL (bench/cluster.py)."""
    import cluster
    cluster.bench_cluster(args, workdir, dns)


def bench_slowloris(args, workdir, dns):
    """
    Issue 18 item 7: 2,000 connections (--loris) each sending an octet every
    10 s, half in a command line and half in DATA, against deadlines of
    20 s: every slot must be released within its deadline.
    """
    import slowloris

    deadline = 20.0
    node = common.pullmail_node(
        workdir, "loris", common.PULLMAIL_IP, "bench.test", ["sink@bench.test"], dns=dns,
        settings={"limits": {"command_timeout": f"{deadline:.0f}s",
                             "data_timeout": f"{deadline:.0f}s", "idle_timeout": "10m",
                             "ipv4_prefix": 32, "max_errors": 0}})
    node.start(timeout=60)
    try:
        held, refused, took = asyncio.run(slowloris.flood(
            common.PULLMAIL_IP, 2525, args.loris, interval=10.0))
    finally:
        node.stop()
    for in_data, what in ((False, "in a command line"), (True, "in DATA")):
        times = sorted(t for t, d in held if d is in_data)
        if not times:
            continue
        # DATA's deadline grows by a second per min_data_rate octets: a few here.
        late = [t for t in times if t > deadline + 2.0]
        print(f"slowloris {what}: {len(times)} connections held "
              f"{times[0]:.1f} / {times[len(times) // 2]:.1f} / {times[-1]:.1f} s "
              f"(min / median / max; deadline {deadline:.0f} s); "
              f"{len(late)} held past the deadline + 2 s")
    print(f"slowloris: {len(refused)} refused at connect; the flood took {took:.0f} s")


# -- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (fewer messages)")
    parser.add_argument("--only", default=DEFAULT_SECTIONS,
                        help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--peers", default="aiosmtpd,floor,postfix,smtp-sink",
                        help="peers of the push section (aiosmtpd = both its configurations)")
    parser.add_argument("--scale-max", type=int, default=100_000,
                        help="largest outbox in the scale curves (1000000 for the 1M case)")
    parser.add_argument("--idle-max", type=int, default=5000)
    parser.add_argument("--loris", type=int, default=2000,
                        help="connections of the slowloris section")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--profile-seconds", type=float, default=20,
                        help="length of the profile section (py-spy)")
    parser.add_argument("--profile-out", default=None, help="folder for the profile files")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.idle_rounds = 1 if args.quick else 3
    args.peers = set(args.peers.split(","))
    args.warmup = 1 if args.quick else 2     # push warm-up, in measured runs
    args.n2k = 800 if args.quick else 3000
    args.n100k = 200 if args.quick else 600
    args.ngdel = 1000 if args.quick else 4000
    args.ne2e = 200 if args.quick else 600
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pullmail-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    print(f"# pullmail benchmarks {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"loopback; {'quick' if args.quick else 'full'} run; work folder {workdir}", flush=True)
    dns = common.dns_server(workdir)
    dns.start()
    started = time.monotonic()
    args.results = {}
    try:
        for section in sections:
            log(f"section {section}")
            t = time.monotonic()
            try:
                globals()[f"bench_{section}"](args, workdir, dns)
            except Exception:       # the other sections and the targets table still run
                traceback.print_exc()
                print(f"\n!!! section {section} failed (traceback on stderr)", flush=True)
            log(f"section {section} took {time.monotonic() - t:.0f}s")
    finally:
        dns.stop()
        if not args.keep:
            # Tens of thousands of maildir files: unlinking them takes this VM
            # a minute (its disk is mounted with discard), so in the background.
            subprocess.Popen(["rm", "-rf", str(workdir)], start_new_session=True)
    if {t.section for t in targets.TARGETS} & set(sections):
        targets.print_targets(args.results, sections)
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
