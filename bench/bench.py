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
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    PASSWORD,
    AiosmtpdServer,
    CountingProxy,
    PostfixServer,
    PullmailServer,
    RSSSampler,
    SinkServer,
    SMTPClient,
    count_files,
    fmt,
    make_message,
    pullmail_node,
    ratio,
    smtp_source,
    status_kb,
    table,
    tree_cpu_seconds,
    wait_until,
)

SECTIONS = ("push", "gd", "scale", "idle", "wire", "chunking", "profile")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- 1. push receive ---------------------------------------------------------------------

def bench_push(args, workdir, dns):
    servers = [PullmailServer(workdir, dns), AiosmtpdServer(workdir), PostfixServer(workdir),
               SinkServer(workdir)]
    servers = [s for s in servers if s.name in args.peers or s.name == "pullmail"]
    loads = [("2 KB × 20 sessions", 2048, 20, args.n2k), ("100 KB × 10 sessions", 102400, 10, args.n100k)]
    results = {}  # (load, server) -> dict of lists
    for s in servers:
        log(f"starting {s.name}")
        s.start()
    try:
        for label, size, sessions, count in loads:
            # Warm-up, the same for each: two measured runs.  The first few
            # thousand files a server writes into a fresh folder cost this VM up
            # to three times the kernel time of later ones (README, Benchmarks).
            for s in servers:
                smtp_source(s, sessions, size, 2 * count)
            for rnd in range(args.rounds):
                order = servers if rnd % 2 == 0 else servers[::-1]
                for s in order:
                    before = s.delivered()
                    cpu0 = s.cpu()
                    with RSSSampler(s) as rss:
                        elapsed = smtp_source(s, sessions, size, count)
                        if before is not None:  # drain (Postfix delivers after its 250)
                            wait_until(lambda: s.delivered() >= before + count, 120,
                                       message=f"{s.name} to store {count}")
                    cpu = s.cpu() - cpu0
                    r = results.setdefault((label, s.name), {"msgs": [], "mb": [], "cpu": [], "rss": []})
                    r["msgs"].append(count / elapsed)
                    r["mb"].append(count * size / elapsed / 1e6)
                    r["cpu"].append(cpu / count * 1000)
                    r["rss"].append(rss.peak_kb / 1024)
                    log(f"push {label} round {rnd + 1} {s.name}: {count / elapsed:.0f} msg/s, "
                        f"cpu {cpu / count * 1000:.2f} s/1000")
    finally:
        for s in servers:
            s.stop()
    for label, size, sessions, count in loads:
        rows = []
        for s in servers:
            r = results[(label, s.name)]
            rows.append([s.name, fmt(r["msgs"]), fmt(r["mb"], 1), fmt(r["cpu"], 2), fmt(r["rss"], 1)])
        table(f"1. Push receive, {label}, {count} msgs/run, {args.rounds} rounds "
              "(median (min–max)); CPU = all server processes",
              ["server", "msgs/s", "MB/s", "CPU s / 1000 msgs", "peak PSS MB (all processes)"], rows)
    pm = lambda label: results[(label, "pullmail")]["msgs"]
    rows = []
    for label, target_pf, target_aio in [(loads[0][0], 2.0, 2.0), (loads[1][0], 1.0, None)]:
        for peer, target in (("aiosmtpd", target_aio), ("postfix", target_pf), ("smtp-sink", None)):
            if (label, peer) in results:
                rows.append([label, f"pullmail / {peer}", ratio(pm(label), results[(label, peer)]["msgs"]),
                             f"≥ {target:.1f}×" if target else ("(ceiling)" if peer == "smtp-sink" else "—")])
    table("1. Push receive ratios (msgs/s)", ["load", "ratio", "measured", "target"], rows)
    return results


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
        client = await SMTPClient.connect(node.address, 2587)
        await client.ehlo("client.submit.bench")
        await client.starttls()
        await client.ehlo("client.submit.bench")
        await client.login(sender, PASSWORD)
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
          f"{args.ngdel}/run)", ["server", "notifications/s", "CPU s / 1000", "peak RSS MB"],
          [["pullmail", fmt(rates), fmt(cpus, 2), f"{rss:.1f}"]])

    # b) end to end: submit -> GDEL -> RETR -> maildir, vs push between the same nodes
    sender = pullmail_node(workdir, "gd-sender", common.GD_SENDER_IP, "s.bench", ["alice@s.bench"], dns=dns)
    receiver = pullmail_node(workdir, "gd-receiver", common.GD_RECEIVER_IP, "r.bench", ["bob@r.bench"], dns=dns)
    sender.start()
    results = {"pull": [], "push": []}
    cpu = {"pull": [], "push": []}
    outbox = sender.state_dir / "outbox" / "entries"
    try:
        for rnd in range(args.rounds + 1):   # round 0 is a warm-up
            for mode in ("pull", "push"):
                receiver.configure({"trust": {"gdel": mode == "pull"}})
                if receiver.running():
                    receiver.stop()
                receiver.start()
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
          ["mode", "msgs/s", "CPU s / 1000 (both nodes)"],
          [["General Delivery (GDEL+RETR)", fmt(results["pull"]), fmt(cpu["pull"], 2)],
           ["push (receiver without GDEL)", fmt(results["push"]), fmt(cpu["push"], 2)]])
    table("2. Ratios", ["ratio", "measured", "target"],
          [["GD end to end / push end to end", ratio(results["pull"], results["push"]), "≥ 0.5×"]])


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
    makers = {k: v for k, v in makers.items() if k in args.peers or k == "pullmail"}
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
            wr.configure({"trust": {"gdel": mode == "pull"}})
            if wr.running():
                wr.stop()
            wr.start()
            for size, label, k in sizes:
                k = max(2, k // (2 if args.quick else 1))
                before = len(wr.delivered_paths("bob@wr.bench"))
                for p in proxies:
                    p.reset()
                asyncio.run(_submit_load(ws, k, 1, size, "alice@ws.bench", "bob@wr.bench"))
                wait_until(lambda: len(wr.delivered_paths("bob@wr.bench")) >= before + k, 120,
                           message=f"wire {mode} {label}")
                wait_until(lambda: count_files(ws.state_dir / "outbox" / "entries") == 0, 30)
                time.sleep(1.0)   # let QUITs and closes pass the proxies
                up = sum(p.up for p in proxies)
                down = sum(p.down for p in proxies)
                conns = sum(p.connections for p in proxies)
                turns = sum(p.turns for p in proxies)
                msg = len(make_message(size))
                cost[(mode, label)] = (up + down) / k
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


# -- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (fewer messages)")
    parser.add_argument("--only", default="push,gd,scale,idle,wire,chunking",
                        help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--peers", default="aiosmtpd,postfix,smtp-sink")
    parser.add_argument("--scale-max", type=int, default=100_000,
                        help="largest outbox in the scale curves (1000000 for the 1M case)")
    parser.add_argument("--idle-max", type=int, default=5000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--profile-seconds", type=float, default=20,
                        help="length of the profile section (py-spy)")
    parser.add_argument("--profile-out", default=None, help="folder for the profile files")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.idle_rounds = 1 if args.quick else 3
    args.peers = set(args.peers.split(","))
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
    try:
        for section in sections:
            log(f"section {section}")
            t = time.monotonic()
            globals()[f"bench_{section}"](args, workdir, dns)
            log(f"section {section} took {time.monotonic() - t:.0f}s")
    finally:
        dns.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
