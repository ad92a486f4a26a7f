"""
A hostile network against real nodes (issue 18 items 3, 4, 6, 11, 12, 13):
a GDEL whose origin's MX records point everywhere, MX fan-out, blocked
networks, null MX, own address literals, per-network throttles, and an
attacker's silent DNS that must not stall anyone else's check.

Addresses (127.0.3.x - 127.0.9.x; other suites use 127.0.0.x and 127.0.2.x):

    127.0.3.2   RX: receiver.test; mx_limit 3; blocks 127.0.4.0/24
    127.0.3.3   SX: sender.test (alice); mx_limit 3; blocks 127.0.4.0/24
    127.0.3.10  a notifier that never answers RETR (its MX hosts: below)
    127.0.3.100+ victims: ConnectionCounters on port 2525 (MX hosts)
    127.0.4.x   victims in a blocked network (must see no connection)
    127.0.6.2   LX: limits node, ipv4_prefix 24, 2 connections per /24
    127.0.6.x, 127.0.7.x   its clients (one /24, and another)
    127.0.8.2   DX: DNS node, dns timeout 3s; 127.0.8.50 its honest notifier
    127.0.9.1 - .100   the attackers whose origins' DNS never answers
"""

from __future__ import annotations

import re
import secrets
import threading
import time

import pytest

from .harness import ConnectionCounter, DNSServer, RawSMTP, free_port, submit, wait_until

RX, SX, NOTIFIER = "127.0.3.2", "127.0.3.3", "127.0.3.10"
LX, DX, HONEST = "127.0.6.2", "127.0.8.2", "127.0.8.50"
BLOCKED_NET = "127.0.4.0/24"
DEFAULT_BLOCKED = ["0.0.0.0/8", "169.254.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
                   "240.0.0.0/4", "::/128", "100::/64", "fe80::/10", "ff00::/8"]
BOB, ALICE, PASSWORD = "bob@receiver.test", "alice@sender.test", "pw-hostile-1"
VICTIMS = [f"127.0.3.{100 + n}" for n in range(6)]
BLOCKED_VICTIMS = ["127.0.4.1", "127.0.4.2"]
DEAD = ["127.0.3.120", "127.0.3.121"]          # nothing listens there
ATTACKERS = [f"127.0.9.{n}" for n in range(1, 101)]


def _spf(*networks: str, all: str = "-all") -> str:
    return "v=spf1 " + "".join(f"ip4:{n} " for n in networks) + all


def _mx_hosts(prefix: str, addresses: list[str]) -> tuple[list, dict]:
    mx = [[10 + n, f"{prefix}{n}.test"] for n in range(len(addresses))]
    return mx, {f"{prefix}{n}.test": {"A": [a]} for n, a in enumerate(addresses)}


def _records() -> dict:
    records: dict = {
        "receiver.test": {"A": [RX], "MX": [[10, "mx.receiver.test"]], "TXT": [_spf(RX)]},
        "mx.receiver.test": {"A": [RX]},
        "sender.test": {"A": [SX], "MX": [[10, "mx.sender.test"]], "TXT": [_spf(SX)]},
        "mx.sender.test": {"A": [SX]},
        # Item 3: the whole Internet may send for evil.test, and its MX
        # hosts are everywhere: a pass that proves nothing.
        "evil.test": {"TXT": ["v=spf1 +all"]},
        "wide.test": {"TXT": ["v=spf1 ip4:0.0.0.0/1 ip4:128.0.0.0/1 -all"]},
        # Items 3 and 12: a cluster that really passes SPF, with more MX
        # hosts than mx_limit, the first of them in a blocked network.
        "cluster.test": {"TXT": [_spf("127.0.3.0/24", BLOCKED_NET)]},
        "cluster2.test": {"TXT": [_spf("127.0.3.0/24", BLOCKED_NET)]},
        "fanout.test": {},
        # Item 13
        "nullmx.test": {"MX": [[0, ""]], "TXT": [_spf("127.0.0.0/8")]},
        # Item 4: an honest origin nobody asked about yet, and the silent ones.
        "honest.test": {"TXT": [_spf(HONEST)]},
        "$silent": ["silent.test"],
    }
    # The first three hosts: one blocked, two where nothing listens.
    mx, hosts = _mx_hosts("mx-cluster", BLOCKED_VICTIMS[:1] + DEAD + VICTIMS)
    records["cluster.test"]["MX"] = mx
    records.update(hosts)
    mx, hosts = _mx_hosts("mx-cluster2-", DEAD[:1] + VICTIMS[:1])
    records["cluster2.test"]["MX"] = mx
    records.update(hosts)
    mx, hosts = _mx_hosts("mx-fanout", BLOCKED_VICTIMS[1:] + VICTIMS)
    records["fanout.test"]["MX"] = mx
    records.update(hosts)
    for name in ("evil.test", "wide.test"):
        mx, hosts = _mx_hosts(f"mx-{name.split('.')[0]}", BLOCKED_VICTIMS + VICTIMS)
        records[name]["MX"] = mx
        records.update(hosts)
    return records


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), _records(), free_port("127.0.0.1"))
    with server:
        yield server


def _settings(dns_server: DNSServer, **extra) -> dict:
    settings = {
        "dns": {"nameservers": [dns_server.nameserver], "timeout": "2s"},
        "delivery": {"mx_limit": 3, "blocked_networks": DEFAULT_BLOCKED + [BLOCKED_NET],
                     "push_retry": ["1h"]},
        "retrieval": {"schedule": ["0s", "1h"]},
    }
    for section, values in extra.items():
        settings.setdefault(section, {}).update(values)
    return settings


@pytest.fixture(scope="module")
def rx(make_module_node, dns):
    return make_module_node("rx", RX, ["receiver.test"], "mx.receiver.test",
                            users={BOB: PASSWORD}, settings=_settings(dns))


@pytest.fixture(scope="module")
def sx(make_module_node, dns):
    return make_module_node("sx", SX, ["sender.test"], "mx.sender.test",
                            users={ALICE: PASSWORD}, settings=_settings(dns))


@pytest.fixture
def victims():
    counters = [ConnectionCounter(a) for a in VICTIMS + BLOCKED_VICTIMS]
    yield {c.address: c for c in counters}
    for counter in counters:
        counter.close()


def _gdel(node_ip: str, source: str, sender: str, timeout: float = 15.0):
    """A transaction-form GDEL from C{source}: the reply to GDEL."""
    with RawSMTP(node_ip, source=source, timeout=timeout) as client:
        client.ehlo("mx.claimed.test")
        client.expect(f"MAIL FROM:<{sender}>", 250)
        client.expect(f"RCPT TO:<{BOB}>", 250)
        return client.command(f"GDEL {secrets.token_urlsafe(24)}")


def _contacted(victims, addresses) -> int:
    return sum(victims[a].count for a in addresses)


# -- item 3: a pass for everyone proves nothing --------------------------------------


@pytest.mark.parametrize("origin", ["evil.test", "wide.test"])
def test_spf_for_everyone_is_neutral(rx, victims, origin) -> None:
    """
    "+all", or two halves of the IPv4 space, pass any address: taken as
    neutral, so the GDEL is refused and no MX of the origin is contacted.
    """
    code, texts = _gdel(RX, NOTIFIER, f"x@{origin}")
    assert (code, texts[0].split()[0]) == (550, "5.7.1"), texts
    assert "neutral" in " ".join(texts)
    time.sleep(1.0)
    assert _contacted(victims, VICTIMS + BLOCKED_VICTIMS) == 0


def test_retrieval_fallback_capped_and_never_blocked(rx, victims) -> None:
    """
    The notifier does not answer; the origin's MX hosts pass SPF.  The
    fallback looks at mx_limit (3) hosts and tries mx_limit addresses in
    all, the notifier's included: here the notifier and two hosts where
    nothing listens, so the victims behind them are never contacted, nor
    the host in a blocked network.
    """
    code, _ = _gdel(RX, NOTIFIER, "x@cluster.test")
    assert code == 250
    rx.wait_log(r"retrieval of \S+ from 127\.0\.3\.10 failed", 15)
    time.sleep(0.5)
    assert _contacted(victims, VICTIMS + BLOCKED_VICTIMS) == 0


def test_retrieval_fallback_within_the_cap(rx, victims) -> None:
    """Within the cap the fallback works: the MX host after a dead one is reached."""
    code, _ = _gdel(RX, NOTIFIER, "x@cluster2.test")
    assert code == 250
    wait_until(lambda: victims[VICTIMS[0]].count, 15,
               message=lambda: "the fallback to reach " + VICTIMS[0] + "\n" + rx.diagnostics())
    assert victims[VICTIMS[0]].count == 1


def test_notifier_in_a_blocked_network_never_contacted(rx, victims) -> None:
    """
    A GDEL from a blocked network may pass the trust check, but the node
    never connects back there: it goes straight to the origin's MX hosts.
    """
    blocked_notifier = "127.0.4.5"
    with ConnectionCounter(blocked_notifier) as notifier:
        code, _ = _gdel(RX, blocked_notifier, "x@cluster2.test")
        assert code == 250
        wait_until(lambda: victims[VICTIMS[0]].count, 15,
                   message=lambda: "the fallback to reach " + VICTIMS[0] + "\n"
                   + rx.diagnostics())
        assert notifier.count == 0


# -- items 12 and 13: outbound ------------------------------------------------------------


def test_delivery_fan_out_capped(sx, victims) -> None:
    """
    A domain with 7 MX hosts that all hang up: one attempt looks at
    mx_limit (3) hosts, the first in a blocked network, and connects to the
    other two only; the message waits, no bounce.
    """
    assert submit(SX, ALICE, PASSWORD, ["carol@fanout.test"],
                  b"Subject: fan-out\r\n\r\nhello\r\n") == {}
    sx.wait_log(r"deferred \S+ \(\w+\) until", 20)
    time.sleep(0.5)
    assert victims[BLOCKED_VICTIMS[1]].count == 0
    assert [victims[a].count for a in VICTIMS] == [1, 1, 0, 0, 0, 0]
    assert not sx.delivered(ALICE)


def test_null_mx_bounces_at_once(sx, victims) -> None:
    """RFC 7505: mail to a null-MX domain bounces with 5.1.10, nothing is contacted."""
    assert submit(SX, ALICE, PASSWORD, ["carol@nullmx.test"],
                  b"Subject: to nowhere\r\n\r\nhello\r\n") == {}
    [bounce] = sx.wait_delivered(ALICE, timeout=20)
    assert b"Status: 5.1.10" in bounce
    assert b"carol@nullmx.test" in bounce
    assert _contacted(victims, VICTIMS + BLOCKED_VICTIMS) == 0


def test_null_mx_sender_refused(rx) -> None:
    """RFC 7505 4.2: a GDEL whose sender domain has a null MX gets 550 5.7.27."""
    code, texts = _gdel(RX, "127.0.3.11", "someone@nullmx.test")
    assert (code, texts[0].split()[0]) == (550, "5.7.27"), texts


# -- item 6: own address literals ------------------------------------------------------------


def test_own_literal_is_local(rx) -> None:
    """
    MAIL FROM our own literal from a stranger is a forgery (550 5.7.1);
    RCPT TO it reaches the main domain's mailbox; another literal is no relay.
    """
    with RawSMTP(RX, source="127.0.3.12") as client:
        client.ehlo()
        code, texts = client.command(f"MAIL FROM:<someone@[{RX}]>")
        assert (code, texts[0].split()[0]) == (550, "5.7.1"), texts
        client.expect("MAIL FROM:<someone@outside.test>", 250)
        client.expect(f"RCPT TO:<bob@[{RX}]>", 250)
        code, texts = client.command("RCPT TO:<bob@[127.0.3.99]>")
        assert (code, texts[0].split()[0]) == (550, "5.7.1"), texts
        code, texts = client.command(f"RCPT TO:<nobody@[{RX}]>")
        assert (code, texts[0].split()[0]) == (550, "5.1.1"), texts
        client.expect("DATA", 354)
        client.send(b"Subject: literal\r\n\r\nto our own address\r\n.\r\n")
        assert client.read_reply()[0] == 250
    [message] = rx.wait_delivered(BOB)
    assert b"to our own address" in message


# -- item 11: throttles per network ------------------------------------------------------------


@pytest.fixture(scope="module")
def lx(make_module_node, dns):
    return make_module_node("lx", LX, ["receiver.test"], "mx.receiver.test",
                            users={BOB: PASSWORD}, settings=_settings(dns, limits={
                                "ipv4_prefix": 24, "connections_per_ip": 2,
                                "retr_fail_limit": 3, "retr_tarpit_max": "0s",
                                "auth_fail_limit": 3, "auth_tarpit_max": "0s"}))


def test_connection_cap_per_network(lx) -> None:
    """Two connections per /24: a neighbour's third is refused, another /24's is not."""
    first, second = RawSMTP(LX, source="127.0.6.10"), RawSMTP(LX, source="127.0.6.11")
    try:
        with RawSMTP(LX, source="127.0.6.12") as third:
            assert third.greeting[0] == 421
        with RawSMTP(LX, source="127.0.7.10") as elsewhere:
            assert elsewhere.greeting[0] == 220
    finally:
        first.close()
        second.close()
        # The next test's neighbours must find both places free: the node
        # logs a session that handed over no mail once it has let it go.
        for source in ("127.0.6.10", "127.0.6.11"):
            lx.wait_log(rf"connection from {re.escape(source)} on smtp", 10)


def test_retr_failures_per_network(lx) -> None:
    """
    Failed RETRs from three neighbours block their whole /24: the third,
    which reaches the limit, is cut off at once (421, issue 18 item 10).
    """
    for n, expected in enumerate([550, 550, 421]):
        with RawSMTP(LX, source=f"127.0.6.{20 + n}") as client:
            client.ehlo()
            assert client.command(f"RETR {secrets.token_urlsafe(24)}")[0] == expected
    lx.wait_log(r"blocking 127\.0\.6\.22 for \S+ after 3 failed RETRs from 127\.0\.6\.0/24", 5)
    with RawSMTP(LX, source="127.0.6.30") as client:
        assert client.greeting[0] == 421
    with RawSMTP(LX, source="127.0.7.30") as client:
        assert client.greeting[0] == 220


def test_auth_failures_per_network(lx) -> None:
    """Wrong passwords from three neighbours block their /24 on submission."""
    import base64

    from .harness import SUBMISSION_PORT

    wrong = base64.b64encode(f"\0{BOB}\0wrong".encode()).decode()
    codes = []
    for n in range(3):
        with RawSMTP(LX, SUBMISSION_PORT, source=f"127.0.6.{40 + n}") as client:
            client.ehlo()
            client.starttls()
            client.ehlo()
            codes.append(client.command(f"AUTH PLAIN {wrong}")[0])
    assert codes == [535, 535, 421]      # the third guess, from a third address, ends it
    lx.wait_log(r"failed AUTHs from 127\.0\.6\.0/24", 5)
    with RawSMTP(LX, SUBMISSION_PORT, source="127.0.6.50") as client:
        assert client.greeting[0] == 421
    with RawSMTP(LX, SUBMISSION_PORT, source="127.0.7.50") as client:
        assert client.greeting[0] == 220


# -- item 4: an attacker's silent DNS delays no one else ------------------------------------------


def test_silent_dns_does_not_stall_others(make_node, dns) -> None:
    """
    100 GDELs in parallel claim origins whose DNS never answers; an honest
    GDEL from an origin nobody asked about yet, sent meanwhile, is answered
    within its own DNS timeout (3 s), not after the attackers' lookups.
    The attackers get 451 4.7.24 (temperror) once their own timeout passes.
    """
    dx = make_node("dx", DX, ["receiver.test"], "mx.receiver.test", users={BOB: PASSWORD},
                   settings={"dns": {"nameservers": [dns.nameserver], "timeout": "3s"},
                             "limits": {"connections_per_ip": 200}})
    started = threading.Barrier(len(ATTACKERS) + 1, timeout=30)
    replies: list = []

    def attack(source: str, n: int) -> None:
        with RawSMTP(DX, source=source, timeout=30) as client:
            client.ehlo("mx.silent.test")
            client.expect(f"MAIL FROM:<x@o{n}.silent.test>", 250)
            client.expect(f"RCPT TO:<{BOB}>", 250)
            client.send(f"GDEL {secrets.token_urlsafe(24)}\r\n")
            started.wait()
            replies.append(client.read_reply())

    threads = [threading.Thread(target=attack, args=(a, n), daemon=True)
               for n, a in enumerate(ATTACKERS)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.3)                      # every attacker's lookups are on the wire
    began = time.monotonic()
    code, texts = _gdel(DX, HONEST, "someone@honest.test")
    elapsed = time.monotonic() - began
    assert code == 250, texts
    assert elapsed < 3.0, f"the honest GDEL waited {elapsed:.1f}s"
    for thread in threads:
        thread.join(30)
    assert len(replies) == len(ATTACKERS)
    assert {(c, t[0].split()[0]) for c, t in replies} == {(451, "4.7.24")}
    # The timeouts are remembered: the same silent origin again is answered at once.
    began = time.monotonic()
    code, _ = _gdel(DX, ATTACKERS[0], "x@o0.silent.test")
    assert code == 451 and time.monotonic() - began < 2.0
    wait_until(lambda: dx.running(), 1)
