"""
The DNS stops mid-run (each node has its own nameserver here, so the two
outages can be told apart):

  1. the receiver's nameserver stops: its SPF check of a notification
     cannot finish, so GDEL gets a 4xx (SPEC 3: 451 4.7.24) and the sender
     keeps the message and retries; a push claiming the receiver's own
     domain gets a 4xx too (never a 5xx: nothing may bounce for an outage);
  2. the sender's nameserver stops as well: it cannot find the MX, and its
     deliveries are deferred;
  3. both come back: everything submitted during the outage arrives,
     exactly once, with no DSN, on the short retry timers.
"""

from __future__ import annotations

import re
import threading
import time

from integration.harness import (
    RawSMTP,
    wait_until,
)

from .faultlib import (
    Ledger,
    domain_records,
    message,
    submit_as,
    verdict,
    wait_drained,
)

SENDER_IP, RECEIVER_IP, CLIENT_IP = "127.0.2.11", "127.0.2.12", "127.0.2.54"
ALICE, BOB = "alice@sender.test", "bob@receiver.test"
TTL = 1  # seconds: caches empty out quickly once the server is gone


def test_dns_outage_defers_and_loses_nothing(net):
    records = domain_records({"sender.test": SENDER_IP, "receiver.test": RECEIVER_IP})
    dns_s = net.dns(records, ttl=TTL, name="dns-sender")
    dns_r = net.dns(records, ttl=TTL, name="dns-receiver")
    fast_dns = {"dns": {"timeout": "1s"}}
    sender = net.node("sender", SENDER_IP, "sender.test", [ALICE], dns_s, fast_dns)
    receiver = net.node("receiver", RECEIVER_IP, "receiver.test", [BOB], dns_r, fast_dns)
    ledger = Ledger(receiver, BOB)
    acked: list[str] = []

    def send(token: str) -> None:
        assert submit_as(SENDER_IP, ALICE, [BOB], message(token, ALICE, BOB),
                         source=CLIENT_IP) == {}
        acked.append(token)

    # The path works before the outage.
    send("dns-warm-0")
    wait_until(lambda: ledger.scan()[0].get("dns-warm-0"), 20,
               message=lambda: "the warm-up message\n" + receiver.diagnostics())

    # 1. The receiver's nameserver stops, under load.
    load_stop = threading.Event()
    load_errors: list[BaseException] = []

    def load() -> None:
        n = 0
        while not load_stop.is_set():
            n += 1
            try:
                send(f"dns-load-{n:03d}")
            except Exception as e:  # noqa: BLE001 -- reported below
                load_errors.append(e)
            time.sleep(0.1)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(0.3)
    dns_r.stop()
    time.sleep(TTL + 0.5)
    for n in range(3):
        send(f"dns-r-down-{n}")
    sender.wait_log(r"deferred \S+ \(\w+\) until [0-9.]+: 4\d\d", 20)
    gdel_4xx = re.findall(r"deferred \S+ \(\w+\) until [0-9.]+: (4\d\d[ \d.]*)",
                          sender.log_text())
    with RawSMTP(RECEIVER_IP, source=CLIENT_IP, timeout=20) as client:
        client.ehlo()
        code, texts = client.command("MAIL FROM:<someone@receiver.test>")
        assert 400 <= code < 500, (
            f"a push claiming the receiver's own domain during its DNS outage got "
            f"{code} {texts}, expected a 4xx")

    # 2. The sender's nameserver stops too.
    dns_s.stop()
    time.sleep(TTL + 0.5)
    for n in range(3):
        send(f"dns-s-down-{n}")
    sender.wait_log(r"deferred \S+ \(\w+\) until [0-9.]+: DNS", 20)
    load_stop.set()
    loader.join(30)
    assert not load_errors, f"submission failed during the outage: {load_errors[:3]}"
    outage_tokens = [t for t in acked if t.startswith(("dns-r-down", "dns-s-down"))]
    counts = ledger.scan()[0]
    assert not any(counts.get(t) for t in outage_tokens), (
        "delivered while no DNS answered? " + str({t: counts.get(t) for t in outage_tokens}))
    assert not re.search(r"bounced|DSN for", sender.log_text()), sender.diagnostics()

    # 3. DNS returns: everything arrives, exactly once.
    dns_s.start()
    dns_r.start()
    wait_drained([sender, receiver], 60,
                 extra=lambda: set(acked) <= set(ledger.scan()[0]))
    problems = verdict(acked, acked, ledger, "dns outage") + verdict(
        [], [], Ledger(sender, ALICE), "bounces to alice")
    assert not problems, "\n".join(problems)
    print(f"{len(acked)} messages, all delivered once; GDEL deferrals: {sorted(set(gdel_4xx))}")
