"""
The reply to GDEL is lost (the RMTA stored the notification, fsynced, and
died -- or the link broke -- before its 250 reached the SMTA): the kind of
moment the SIGKILL rounds hit at random, made deterministic with a fake
RMTA that takes the notification and hangs up without answering.

The RMTA then holds a valid notification and comes to retrieve it, from an
address of an MX host of the recipient domain.  The id is known, not
expired, not retrieved: SPEC 4 allows ``550 no such message`` only for
"unknown, expired or already retrieved ids", and a real RMTA drops a
notification at once on a 5xx.  So the SMTA must hand the message over (or
at worst say 4xx), never 550 -- otherwise, if its own retry of the
notification reaches the RMTA while that RETR waits in the tarpit, the
RMTA folds the retry into the notification it then drops, and the message
sits in the outbox until it bounces (seen in test_kill: seed 607821016).
"""

from __future__ import annotations

from integration.harness import (
    SMTP_PORT,
    RawSMTP,
    wait_until,
)

from .faultlib import (
    NotifiedRMTA,
    domain_records,
    message,
    queue_rows,
    submit_as,
)

NODE_IP, FAKE_RMTA_IP, CLIENT_IP = "127.0.2.36", "127.0.2.37", "127.0.2.57"
ALICE, CAROL = "alice@lost.test", "carol@fake2.test"


def test_retr_after_a_lost_gdel_reply_is_not_refused(net):
    dns = net.dns(domain_records({"lost.test": NODE_IP, "fake2.test": FAKE_RMTA_IP}))
    # A slow retry, so that the RETR below comes before the SMTA notifies again.
    node = net.node("node", NODE_IP, "lost.test", [ALICE], dns,
                    settings={"delivery": {"push_retry": ["20s"]}})
    fake = NotifiedRMTA(FAKE_RMTA_IP, SMTP_PORT, "mx.fake2.test", hang_up_on_first_gdel=True)
    fake.start()
    try:
        assert submit_as(NODE_IP, ALICE, [CAROL], message("lost-reply", ALICE, CAROL),
                         source=CLIENT_IP) == {}
        wait_until(lambda: fake.ids, 15, message=lambda: "the GDEL\n" + node.diagnostics())
        gdel_id = fake.ids[0]
        node.wait_log(rf"deferred {gdel_id}", 10)
        with RawSMTP(NODE_IP, source=FAKE_RMTA_IP, timeout=15) as client:
            client.ehlo("mx.fake2.test")
            code, texts = client.command(f"RETR {gdel_id}")
        rows = [r for r in queue_rows(node) if r["id"] == gdel_id]
        assert code == 250 or 400 <= code < 500, (
            f"RETR of a known, unexpired id whose GDEL reply was lost, from a destined "
            f"host, got {code} {texts}; a real RMTA drops the notification on that. "
            f"Entry: {rows}")
    finally:
        fake.close()
