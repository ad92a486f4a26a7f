"""
The ``cluster`` section (SPEC 11.3, issue 15): end to end through a
two-node cluster.  Two nodes of c.bench (its two MX hosts, one SPF record)
share one PostgreSQL database (a private, durable one, started for the
run as the ``store`` section does); 2 KB messages are submitted to both
nodes at once (STARTTLS+AUTH), and are delivered to the r.bench node: by
General Delivery (GDEL from the node that queued it, RETR served by
whichever node the receiver reaches, the cluster deciding which transfers
it) or pushed (the receiver without GDEL), interleaved.  Printed: messages
per second until every one is in the receiver's maildir and the cluster's
outbox is empty, and the CPU of all three nodes per 1,000 messages.

Wired into bench/bench.py as the ``cluster`` section:
``from cluster import bench_cluster``.
"""

from __future__ import annotations

import asyncio
import time

import common
from common import fmt, pullmail_node, ratio, table

__all__ = ["bench_cluster", "CLUSTER_IPS"]

CLUSTER_IPS = ("127.0.1.20", "127.0.1.21")
DOMAIN = "c.bench"
SENDER, RECIPIENT = f"alice@{DOMAIN}", "bob@r.bench"


def _records() -> dict:
    """c.bench: two MX hosts, one SPF record naming both (SPEC 4: either may be asked)."""
    one, two = CLUSTER_IPS
    return {
        DOMAIN: {"A": [one], "MX": [[10, f"mx1.{DOMAIN}"], [10, f"mx2.{DOMAIN}"]],
                 "TXT": [f"v=spf1 ip4:{one} ip4:{two} -all"]},
        f"mx1.{DOMAIN}": {"A": [one]},
        f"mx2.{DOMAIN}": {"A": [two]},
    }


async def _submit_to_both(nodes, total: int, sessions_per_node: int, size: int) -> None:
    """C{total} submissions, split over C{sessions_per_node} sessions at each node."""
    from bench import _submit_load

    await asyncio.gather(*(_submit_load(node, total // len(nodes), sessions_per_node, size,
                                        SENDER, RECIPIENT) for node in nodes))


def _outbox_rows(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as connection:
        return connection.execute("SELECT count(*) FROM outbox").fetchone()[0]


def bench_cluster(args, workdir, dns):
    database = common.private_postgres(_log, "cluster")
    if database is None:
        return
    dns.update({**dns.records, **_records()})
    nodes, receiver = [], None
    results = {"pull": [], "push": []}
    cpu = {"pull": [], "push": []}
    try:
        import psycopg

        from pullmail.storage.postgresql.schema import initdb

        with psycopg.connect(database.dsn) as connection:
            initdb(connection)
        store = {"backend": "postgresql", "dsn": database.dsn, "lease": "30s"}
        nodes = [pullmail_node(workdir, f"cluster-mx{n + 1}", address, DOMAIN, [SENDER], dns=dns,
                               settings={"store": store})
                 for n, address in enumerate(CLUSTER_IPS)]
        for node in nodes:
            node.start()
        receiver = pullmail_node(workdir, "cluster-receiver", common.GD_RECEIVER_IP, "r.bench",
                                 [RECIPIENT], dns=dns)
        for rnd in range(args.rounds + 1):   # round 0 is a warm-up
            for mode in ("pull", "push"):
                receiver.configure({"trust": {"gdel": mode == "pull"}})
                if receiver.running():
                    receiver.stop()
                receiver.start()
                count = args.ne2e if rnd else 40
                before = len(receiver.delivered_paths(RECIPIENT))
                pids = [n.pid for n in nodes] + [receiver.pid]
                c0 = sum(common.tree_cpu_seconds(pid) for pid in pids)
                start = time.monotonic()
                asyncio.run(_submit_to_both(nodes, count, 5, 2048))
                common.wait_until(
                    lambda: len(receiver.delivered_paths(RECIPIENT)) >= before + count
                    and _outbox_rows(database.dsn) == 0,
                    300, interval=0.05, message=f"cluster {mode}: {count} delivered")
                elapsed = time.monotonic() - start
                used = sum(common.tree_cpu_seconds(pid) for pid in pids) - c0
                if rnd:
                    results[mode].append(count / elapsed)
                    cpu[mode].append(used / count * 1000)
                _log(f"cluster {mode} round {rnd}: {count / elapsed:.0f} msg/s")
    finally:
        for node in nodes + ([receiver] if receiver is not None else []):
            if node.running():
                node.stop()
        database.destroy()
    table(f"2d. End to end through a two-node cluster ({' + '.join(CLUSTER_IPS)}, one "
          f"PostgreSQL, fsync on) -> {common.GD_RECEIVER_IP}: 2 KB, {args.ne2e} msgs/run "
          f"submitted to both nodes over 2x5 STARTTLS+AUTH sessions, until all in the maildir "
          f"and the cluster's outbox empty",
          ["mode", "msgs/s", "CPU s / 1000 (three nodes)"],
          [["General Delivery (GDEL+RETR)", fmt(results["pull"]), fmt(cpu["pull"], 2)],
           ["push (receiver without GDEL)", fmt(results["push"]), fmt(cpu["push"], 2)]])
    table("2d. Ratios", ["ratio", "measured", "target"],
          [["cluster GD end to end / cluster push", ratio(results["pull"], results["push"]),
            "≥ 0.5×"]])


def _log(text: str) -> None:
    from bench import log

    log(text)
