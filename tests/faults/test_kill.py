"""
SIGKILL under mixed load, at random (seeded) moments, for
C{PULLMAIL_FAULT_ROUNDS} rounds (2 in CI; 20 in the long form):

  push        outside -> mx.receiver.test (bob, local)        MX service
  push        outside -> mx.sender.test (alice, local)        MX service
  submission  alice -> bob@receiver.test, STARTTLS + AUTH      GDEL, then RETR

Each round kills the sender node, the receiver node or both while the load
runs, lets the survivor work against the dead peer for a moment, restarts
what was killed and waits (polling ``pullmail queue --json`` against a
deadline) until every queue is empty.  Every message that got a 250 -- to
end of data on push or submission, and so through the reversed RETR turn --
must then be in its mailbox exactly once: losses and duplicates are counted
and reported, as is any DSN.  Checked after every round, cumulatively.
"""

from __future__ import annotations

import os
import random
import time

from integration.harness import (
    wait_until,
)

from .faultlib import (
    Ledger,
    LoadClient,
    domain_records,
    log_problems,
    verdict,
    wait_drained,
)

SENDER_IP, RECEIVER_IP = "127.0.2.2", "127.0.2.3"
ALICE, BOB = "alice@sender.test", "bob@receiver.test"
ROUNDS = int(os.environ.get("PULLMAIL_FAULT_ROUNDS", "2"))
DRAIN_DEADLINE = 60.0


def test_sigkill_rounds_lose_and_duplicate_nothing(net, seed):
    rng = random.Random(seed)
    dns = net.dns(domain_records({"sender.test": SENDER_IP, "receiver.test": RECEIVER_IP}))
    sender = net.node("sender", SENDER_IP, "sender.test", [ALICE], dns)
    receiver = net.node("receiver", RECEIVER_IP, "receiver.test", [BOB], dns)
    nodes = {"sender": sender, "receiver": receiver}
    ledgers = {"push-bob": Ledger(receiver, BOB, "-pushbob-"),
               "push-alice": Ledger(sender, ALICE, "-pushalice-"),
               "gd-bob": Ledger(receiver, BOB, "-gdbob-")}
    acked = {k: [] for k in ledgers}
    sent = {k: [] for k in ledgers}
    history = []

    for round_number in range(1, ROUNDS + 1):
        clients = {
            "push-bob": LoadClient(f"r{round_number}-pushbob", RECEIVER_IP, "127.0.2.51",
                                   "load@outside.test", BOB),
            "push-alice": LoadClient(f"r{round_number}-pushalice", SENDER_IP, "127.0.2.52",
                                     "load@outside.test", ALICE),
            "gd-bob": LoadClient(f"r{round_number}-gdbob", SENDER_IP, "127.0.2.53",
                                 ALICE, BOB, submission_user=ALICE, per_connection=8),
        }
        victim = rng.choice(["sender", "receiver", "both", "sender", "receiver"])
        kill_after = rng.randint(3, 60)        # acknowledgements in this round
        jitter = rng.uniform(0.0, 0.25)
        linger = rng.uniform(0.2, 1.5)         # the survivor works on alone
        for client in clients.values():
            client.start()
        started = time.monotonic()
        wait_until(lambda: sum(len(c.acked) for c in clients.values()) >= kill_after,
                   30, interval=0.001,
                   message=lambda: f"{kill_after} acks; errors "
                   f"{ {k: dict(c.errors) for k, c in clients.items()} }")
        time.sleep(jitter)
        killed = ["sender", "receiver"] if victim == "both" else [victim]
        for name in killed:
            nodes[name].kill()
        at = time.monotonic() - started
        time.sleep(linger)
        for client in clients.values():
            client.stop()
        for name in killed:
            nodes[name].start()
        for key, client in clients.items():
            acked[key] += client.acked
            sent[key] += client.sent
        note = (f"round {round_number}: killed {victim} at {at:.3f}s after "
                f"{kill_after} acks (+{jitter * 1000:.0f} ms), survivor alone "
                f"{linger:.2f}s; acked "
                f"{ {k: len(c.acked) for k, c in clients.items()} }")
        history.append(note)
        print(note)

        def all_arrived() -> bool:
            return all(set(acked[k]) <= set(ledgers[k].scan()[0]) for k in ledgers)

        try:
            wait_drained([sender, receiver], DRAIN_DEADLINE, extra=all_arrived)
        except AssertionError as e:
            problems = [p for k in ledgers for p in verdict(acked[k], sent[k], ledgers[k], k)]
            raise AssertionError(f"seed {seed}; {history}\n{problems}\n{e}") from None
        problems = [p for k in ledgers for p in verdict(acked[k], sent[k], ledgers[k], k)]
        assert not problems, f"seed {seed}; {history}\n" + "\n".join(problems)

    # The GD path really ran, and the nodes logged no unhandled error.
    assert len(acked["gd-bob"]) > 0, history
    for node in (sender, receiver):
        assert node.running(), node.diagnostics()
        bad = log_problems(node)
        assert not bad, f"{node.name} logged errors (seed {seed}): {bad[:10]}"
    print(f"seed {seed}: {ROUNDS} rounds; acknowledged "
          f"{ {k: len(v) for k, v in acked.items()} }, all delivered exactly once")
