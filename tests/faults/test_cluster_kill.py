"""
The SIGKILL rounds of L{test_kill} against a cluster (SPEC 11.3): two
sending nodes, MX hosts of sender.test, share one PostgreSQL database; a
receiving node retrieves from them.  Each round submits at both senders
and kills one sender, the other, or the receiver, at a random (seeded)
moment; the killed node is restarted and every queue must drain.  Every
message that got a 250 must then be in bob's mailbox exactly once: a dead
sender's transfers are served by the other once their lease ran out (or
by itself, restarted), and no DSN is sent.

    mx1.sender.test 127.0.2.2   mx2.sender.test 127.0.2.4   mx.receiver.test 127.0.2.3
"""

from __future__ import annotations

import random
import time

from integration.harness import (
    merge_settings,
    wait_until,
)

from .faultlib import (
    FAST,
    PASSWORD,
    Ledger,
    LoadClient,
    domain_records,
    log_problems,
    verdict,
    wait_drained,
)
from .test_kill import ROUNDS

MX1, MX2, RECEIVER_IP = "127.0.2.2", "127.0.2.4", "127.0.2.3"
ALICE, BOB = "alice@sender.test", "bob@receiver.test"
DRAIN_DEADLINE = 90.0


def test_sigkill_rounds_against_a_cluster(net, seed, pg_dsn):
    rng = random.Random(seed)
    records = domain_records({"receiver.test": RECEIVER_IP})
    records.update({
        "sender.test": {"A": [MX1], "MX": [[10, "mx1.sender.test"], [10, "mx2.sender.test"]],
                        "TXT": [f"v=spf1 ip4:{MX1} ip4:{MX2} -all"]},
        "mx1.sender.test": {"A": [MX1]}, "mx2.sender.test": {"A": [MX2]},
    })
    dns = net.dns(records)
    # A lease long enough that a live node under a loaded machine (the whole
    # suite on two CPUs) renews it in time; short enough for the test.
    store = {"store": {"backend": "postgresql", "dsn": pg_dsn, "lease": "8s"},
             "dns": {"nameservers": [dns.nameserver], "timeout": "2s"}}
    nodes = {
        name: net.nodes(name, address, ["sender.test"], f"{name}.sender.test",
                        users={ALICE: PASSWORD}, settings=merge_settings(FAST, store))
        for name, address in (("mx1", MX1), ("mx2", MX2))
    }
    nodes["receiver"] = net.node("receiver", RECEIVER_IP, "receiver.test", [BOB], dns)
    ledger = Ledger(nodes["receiver"], BOB, "-gd")
    acked, sent, history = [], [], []

    for round_number in range(1, ROUNDS + 1):
        clients = [LoadClient(f"r{round_number}-gd{n}", address, f"127.0.2.{54 + n}", ALICE, BOB,
                              submission_user=ALICE, per_connection=8)
                   for n, address in enumerate((MX1, MX2))]
        victim = rng.choice(["mx1", "mx2", "receiver"])
        kill_after = rng.randint(3, 40)
        linger = rng.uniform(0.2, 1.5)
        for client in clients:
            client.start()
        started = time.monotonic()
        wait_until(lambda: sum(len(c.acked) for c in clients) >= kill_after, 30,
                   interval=0.001, message=lambda: f"{kill_after} acks; errors "
                   f"{[dict(c.errors) for c in clients]}")
        time.sleep(rng.uniform(0.0, 0.25))
        nodes[victim].kill()
        at = time.monotonic() - started
        time.sleep(linger)
        for client in clients:
            client.stop()
            acked += client.acked
            sent += client.sent
        nodes[victim].start()
        note = (f"round {round_number}: killed {victim} at {at:.3f}s after {kill_after} acks,"
                f" others alone {linger:.2f}s; acked {[len(c.acked) for c in clients]}")
        history.append(note)
        print(note)
        try:
            wait_drained(nodes.values(), DRAIN_DEADLINE,
                         extra=lambda: set(acked) <= set(ledger.scan()[0]))
        except AssertionError as e:
            raise AssertionError(f"seed {seed}; {history}\n"
                                 f"{verdict(acked, sent, ledger, 'gd-bob')}\n{e}") from None
        problems = verdict(acked, sent, ledger, "gd-bob")
        assert not problems, f"seed {seed}; {history}\n" + "\n".join(problems)

    assert acked, history
    for node in nodes.values():
        assert node.running(), node.diagnostics()
        bad = log_problems(node)
        assert not bad, f"{node.name} logged errors (seed {seed}): {bad[:10]}"
