"""
The trust check end to end (SPEC 3, 6, 8, 9): SPF through pyspf against a
DNS server of our own, DNSBL, allow and deny lists, flood protection,
trust-policy plugins, the own-domain forgery on the MX service, and
``pullmail spf-record``.

Addresses (all inside 127.0.0.20 - 127.0.0.60; other suites use .2 - .9):

    127.0.0.20  node A  receiver.test, localdomain.test, nospf-local.test
                        [trust] push = "spf-pass", allow/deny/DNSBL set
    127.0.0.31  node B  receiver.test; its nameserver never answers (temperror)
    127.0.0.32  node C  receiver.test, c-local.test, c-soft.test; push accepted,
                        spf_accept = pass softfail none, plugins, pending cap 3
    127.0.0.40  the DNS server (free port); 127.0.0.41 the silent nameserver
    127.0.0.21  the ordinary client (authorised by pass.test & co.)
    127.0.0.22  on A's allow list        127.0.0.23  on A's deny list
    127.0.0.24  the flood's victim       127.0.0.25/.26  listed in bl.test
    127.0.0.28  a notifier that never answers RETR (pending cap)
    127.0.0.29  the flooder              127.0.0.30  greets with [127.0.0.30]
    127.0.0.33 - .36  further clients    127.0.0.50  a node that never starts
    127.0.0.59  authorised by the "fail" records, used by nobody

Every GDEL carries a fresh 32-character id; every wait polls a deadline.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import textwrap
import time
from pathlib import Path

import dns.resolver
import pytest

from .harness import (
    SMTP_PORT,
    SUBMISSION_PORT,
    ConnectionCounter,
    DNSServer,
    Node,
    RawSMTP,
    SilentUDP,
    free_port,
    merge_settings,
    wait_until,
)

A_IP = "127.0.0.20"
CLIENT = "127.0.0.21"
ALLOWED = "127.0.0.22"
DENIED = "127.0.0.23"
VICTIM = "127.0.0.24"
LISTED = "127.0.0.25"
LISTED_CACHED = "127.0.0.26"
CAP_SOURCE = "127.0.0.28"
FLOODER = "127.0.0.29"
LITERAL = "127.0.0.30"
B_IP = "127.0.0.31"
C_IP = "127.0.0.32"
C_CLIENT = "127.0.0.33"
PLUGIN_CLIENT = "127.0.0.34"
BARE_CLIENT = "127.0.0.35"
STRANGER = "127.0.0.36"
DNS_IP = "127.0.0.40"
SILENT_IP = "127.0.0.41"
NOBODY = "127.0.0.59"

BOB = "bob@receiver.test"
PASSWORD = "pw-" + "y" * 10


def spf(*addresses: str, all: str = "-all") -> str:
    return "v=spf1 " + "".join(f"ip4:{a} " for a in addresses) + all


def include_chain(name: str, length: int, target: str) -> dict:
    """C{name} reaches C{ip4:target} through exactly C{length} include: terms."""
    records = {name: {"TXT": [f"v=spf1 include:c1.{name} -all"]}}
    for k in range(1, length):
        records[f"c{k}.{name}"] = {"TXT": [f"v=spf1 include:c{k + 1}.{name} -all"]}
    records[f"c{length}.{name}"] = {"TXT": [spf(target)]}
    return records


def void_lookups(name: str, count: int, target: str) -> dict:
    """C{count} a: mechanisms on names that do not exist, then ip4:target."""
    mechanisms = " ".join(f"a:v{k}.{name}" for k in range(1, count + 1))
    return {name: {"TXT": [f"v=spf1 {mechanisms} ip4:{target} -all"]}}


RECORDS: dict = {
    "receiver.test": {"A": [A_IP], "MX": [[10, "mx.receiver.test"]], "TXT": [spf(A_IP)]},
    "mx.receiver.test": {"A": [A_IP]},
    # SPF results for CLIENT (RFC 7208 8)
    "pass.test": {"TXT": [spf(CLIENT)]},
    "fail.test": {"TXT": [spf(NOBODY)]},
    "softfail.test": {"TXT": [spf(NOBODY, all="~all")]},
    "neutral.test": {"TXT": [spf(NOBODY, all="?all")]},
    "none.test": {"A": [NOBODY]},                       # no TXT at all
    "badip.test": {"TXT": ["v=spf1 ip4:999.1.1.1 -all"]},
    "badmech.test": {"TXT": [f"v=spf1 foo:bar ip4:{CLIENT} -all"]},
    **include_chain("include10.test", 10, CLIENT),      # at the limit: pass
    **include_chain("include11.test", 11, CLIENT),      # one over: permerror
    **void_lookups("void2.test", 2, CLIENT),            # at the limit: pass
    **void_lookups("void3.test", 3, CLIENT),            # one over: permerror
    # lists
    "bl-ok.test": {"TXT": [spf(CLIENT, LISTED)]},
    "25.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed for testing"]},
    "26.0.0.127.bl.test": {"A": ["127.0.0.2"]},
    "bl-cached.test": {"TXT": [spf(LISTED_CACHED)]},
    "deny-ok.test": {"TXT": [spf(CLIENT, DENIED)]},
    "denied.test": {"TXT": [spf(CLIENT)]},
    "cached.test": {"TXT": [spf(NOBODY)]},
    # flood and pending cap
    "victim.test": {"A": [VICTIM], "MX": [[10, "mx.victim.test"]], "TXT": [spf(VICTIM)]},
    "mx.victim.test": {"A": [VICTIM]},
    "cap.test": {"TXT": [spf(CAP_SOURCE)]},
    # node C
    "c-pass.test": {"TXT": [spf(C_CLIENT)]},
    "vetoed.test": {"TXT": [spf(PLUGIN_CLIENT)]},
    "welcome.test": {"TXT": [spf(PLUGIN_CLIENT)]},
    # the telnet forgery
    "localdomain.test": {"A": [A_IP], "TXT": [spf(A_IP)]},
    "nospf-local.test": {"A": [A_IP]},
    "c-local.test": {"A": [C_IP], "TXT": [spf(C_IP)]},
    "c-soft.test": {"A": [C_IP], "TXT": [spf(C_IP, all="~all")]},
}

FAST = {
    "delivery": {"connect_timeout": "3s"},
    "limits": {"idle_timeout": "60s"},
}

VETO_PLUGIN = textwrap.dedent('''
    """A trust policy dropped in by the tests (not part of pullmail)."""
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from pullmail.smtp import replies
    from pullmail.interfaces import ITrustPolicy


    @implementer(IPlugin, ITrustPolicy)
    class VetoTest:
        name = "veto-test"

        def check(self, peer, domain, helo, sender):
            if domain == "vetoed.test":
                return replies.S550_POLICY.with_text("vetoed by veto-test")
            return None


    veto_test = VetoTest()
''')




def new_id() -> str:
    return secrets.token_hex(16)  # 32 characters of the gdel-id alphabet


def status(texts: list[str]) -> str:
    """The enhanced status code that opens a reply's text."""
    return texts[0].split(" ", 1)[0] if texts and texts[0] else ""


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trust")


@pytest.fixture(scope="module")
def zone(workdir):
    server = DNSServer(workdir / "dns", RECORDS, free_port(DNS_IP), address=DNS_IP, ttl=60)
    with server:
        yield server


@pytest.fixture(scope="module")
def nodes():
    made: list[Node] = []
    yield made
    for node in made:
        node.kill()


def _node(nodes, workdir, name, address, domains, users, settings, **kwargs) -> Node:
    node = Node(workdir, name, address, domains, f"mx.{domains[0]}",
                users={u: PASSWORD for u in users}, settings=merge_settings(FAST, settings),
                **kwargs)
    nodes.append(node)
    node.start()
    return node


@pytest.fixture(scope="module")
def node_a(nodes, workdir, zone) -> Node:
    return _node(
        nodes, workdir, "a", A_IP, ["receiver.test", "localdomain.test", "nospf-local.test"],
        [BOB, "professor@localdomain.test", "professor@nospf-local.test"],
        {
            "dns": {"nameservers": [zone.nameserver], "timeout": "2s"},
            "trust": {"push": "spf-pass", "allow": [f"{ALLOWED}/32"],
                      "deny": [DENIED, "denied.test"], "dnsbl": ["bl.test"]},
            # A notification whose retrieval fails (nothing listens at the
            # clients' addresses) is dropped at once, so pending/ drains.
            "retrieval": {"schedule": ["0s"]},
            # The flood test sends 250 refused GDELs per connection on
            # purpose; the error budget (tested in test_hostile_protocol)
            # would cut it off after 20.
            "limits": {"max_errors": 0},
        },
    )


@pytest.fixture(scope="module")
def silent_ns():
    with SilentUDP(SILENT_IP) as silent:
        yield silent


@pytest.fixture(scope="module")
def node_b(nodes, workdir, silent_ns) -> Node:
    return _node(
        nodes, workdir, "b", B_IP, ["receiver.test"], [BOB],
        {
            "dns": {"nameservers": [silent_ns.nameserver], "timeout": "1s"},
            "trust": {"push": "spf-pass"},
            "retrieval": {"schedule": ["0s"]},
        },
    )


@pytest.fixture(scope="module")
def plugins_root(workdir) -> Path:
    root = workdir / "plugins-root"
    folder = root / "pullmail" / "plugins"   # no __init__.py on purpose
    folder.mkdir(parents=True)
    (folder / "veto_plugin.py").write_text(VETO_PLUGIN, "utf-8")
    return root


@pytest.fixture(scope="module")
def node_c(nodes, workdir, zone, plugins_root) -> Node:
    return _node(
        nodes, workdir, "c", C_IP, ["receiver.test", "c-local.test", "c-soft.test"],
        [BOB, "professor@c-local.test", "professor@c-soft.test"],
        {
            "dns": {"nameservers": [zone.nameserver], "timeout": "2s"},
            "trust": {"spf_accept": ["pass", "softfail", "none"],
                      "policies": ["veto-test", "no-literal-helo"]},
            "limits": {"pending_per_origin": 3},
            # First retrieval at once (refused), then not for an hour: the
            # notifications stay pending.
            "retrieval": {"schedule": ["0s", "1h"]},
        },
        pythonpath=[plugins_root],
    )


# -- clients ----------------------------------------------------------------------------


@contextlib.contextmanager
def _envelope(node: Node, source: str, sender: str | None, ehlo: str, timeout: float):
    """A raw session from C{source} with MAIL and RCPT accepted."""
    with RawSMTP(node.address, source=source, timeout=timeout) as client:
        client.ehlo(ehlo)
        code, texts = client.command(f"MAIL FROM:<{sender or ''}>")
        assert code == 250, f"MAIL FROM:<{sender}> -> {code} {texts}"
        code, texts = client.command(f"RCPT TO:<{BOB}>")
        assert code == 250, f"RCPT -> {code} {texts}"
        yield client


def gdel(node: Node, source: str, sender: str | None, ehlo: str = "client.outside.test",
         gdel_id: str | None = None, timeout: float = 20.0) -> tuple[int, list[str]]:
    """
    The transaction form (C{sender} None: the null sender), from C{source};
    returns the reply to GDEL.  MAIL and RCPT must be accepted.
    """
    with _envelope(node, source, sender, ehlo, timeout) as client:
        return client.command(f"GDEL {gdel_id or new_id()}")


def bare_gdel(node: Node, source: str, ehlo: str, timeout: float = 20.0):
    with RawSMTP(node.address, source=source, timeout=timeout) as client:
        client.ehlo(ehlo)
        return client.command(f"GDEL {new_id()}")


def push(node: Node, source: str, sender: str | None, ehlo: str = "client.outside.test",
         timeout: float = 20.0) -> tuple[int, list[str], tuple | None]:
    """
    MAIL/RCPT/DATA; returns (DATA code, texts, reply to end of data or
    None when DATA was refused).
    """
    with _envelope(node, source, sender, ehlo, timeout) as client:
        code, texts = client.command("DATA")
        if code != 354:
            return code, texts, None
        client.send(b"Subject: trust test\r\n\r\npushed\r\n.\r\n")
        return code, texts, client.read_reply()


# -- 1. SPF results, on GDEL and on push -----------------------------------------------------

SPF_CASES = [
    # (sender domain, expected code, expected status; None = accepted)
    ("pass.test", None),
    ("fail.test", (550, "5.7.23")),
    ("softfail.test", (550, "5.7.1")),
    ("neutral.test", (550, "5.7.1")),
    ("none.test", (550, "5.7.1")),
    ("nxdomain.test", (550, "5.7.1")),       # not in the zone at all: none
    ("badip.test", (550, "5.7.24")),
    ("badmech.test", (550, "5.7.24")),
    ("include10.test", None),
    ("include11.test", (550, "5.7.24")),
    ("void2.test", None),
    ("void3.test", (550, "5.7.24")),
]


@pytest.mark.parametrize("domain, refusal", SPF_CASES, ids=[c[0] for c in SPF_CASES])
def test_spf_gdel(node_a, domain, refusal):
    code, texts = gdel(node_a, CLIENT, f"a@{domain}")
    expected = (250, "2.0.0") if refusal is None else refusal
    assert (code, status(texts)) == expected, (domain, code, texts, node_a.diagnostics(8))


@pytest.mark.parametrize("domain, refusal", SPF_CASES, ids=[c[0] for c in SPF_CASES])
def test_spf_push(node_a, domain, refusal):
    code, texts, final = push(node_a, CLIENT, f"a@{domain}")
    if refusal is None:
        assert code == 354, (domain, code, texts)
        assert final is not None and final[0] == 250, final
    else:
        assert (code, status(texts)) == refusal, (domain, code, texts)


def test_identity_is_mail_from_domain_in_transaction(node_a):
    """The EHLO name does not matter when MAIL FROM names a domain."""
    code, texts = gdel(node_a, CLIENT, "a@pass.test", ehlo="fail.test")
    assert code == 250, texts
    code, texts = gdel(node_a, CLIENT, "a@fail.test", ehlo="pass.test")
    assert (code, status(texts)) == (550, "5.7.23"), texts


def test_bare_form_uses_ehlo_domain(node_a):
    code, texts = bare_gdel(node_a, CLIENT, "pass.test")
    assert (code, status(texts)) == (250, "2.0.0"), texts
    code, texts = bare_gdel(node_a, CLIENT, "fail.test")
    assert (code, status(texts)) == (550, "5.7.23"), texts
    code, texts = bare_gdel(node_a, CLIENT, "badip.test")
    assert (code, status(texts)) == (550, "5.7.24"), texts


def test_null_sender_uses_ehlo_domain(node_a):
    code, texts = gdel(node_a, CLIENT, None, ehlo="pass.test")
    assert (code, status(texts)) == (250, "2.0.0"), texts
    code, texts = gdel(node_a, CLIENT, None, ehlo="fail.test")
    assert (code, status(texts)) == (550, "5.7.23"), texts


def test_null_sender_push_uses_ehlo_domain(node_a):
    code, texts, final = push(node_a, CLIENT, None, ehlo="pass.test")
    assert code == 354 and final and final[0] == 250, (code, texts, final)
    code, texts, _ = push(node_a, CLIENT, None, ehlo="softfail.test")
    assert (code, status(texts)) == (550, "5.7.1"), texts


def test_temperror_when_dns_does_not_answer(node_b, silent_ns):
    started = time.monotonic()
    code, texts = gdel(node_b, CLIENT, "a@pass.test", timeout=30)
    elapsed = time.monotonic() - started
    assert (code, status(texts)) == (451, "4.7.24"), (texts, node_b.diagnostics(10))
    assert elapsed < 15, f"the SPF check took {elapsed:.1f}s: not bounded by [dns] timeout"
    assert silent_ns.received() > 0, "the node never asked its configured nameserver"
    code, texts, _ = push(node_b, CLIENT, "a@pass.test", timeout=30)
    assert (code, status(texts)) == (451, "4.7.24"), texts


def test_answers_are_cached(node_a, zone):
    """
    SPF and DNSBL answers are kept for their TTL (60 s here): after the
    zone changes, the node still answers as before.
    """
    code, texts = gdel(node_a, CLIENT, "a@cached.test")
    assert (code, status(texts)) == (550, "5.7.23"), texts
    code, texts = gdel(node_a, LISTED_CACHED, "a@bl-cached.test")
    assert (code, status(texts)) == (550, "5.7.1") and "bl.test" in " ".join(texts), texts

    records = dict(RECORDS)
    records["cached.test"] = {"TXT": [spf(CLIENT)]}
    del records["26.0.0.127.bl.test"]
    zone.update(records)
    # The server does serve the new answers ...
    probe = dns.resolver.Resolver(configure=False)
    probe.nameservers = [zone.address]
    probe.port = zone.port
    txt = [b"".join(r.strings).decode() for r in probe.resolve("cached.test", "TXT")]
    assert txt == [spf(CLIENT)]
    with pytest.raises(dns.resolver.NXDOMAIN):
        probe.resolve("26.0.0.127.bl.test", "A")
    # ... but the node still has the old ones.
    code, texts = gdel(node_a, CLIENT, "a@cached.test")
    assert (code, status(texts)) == (550, "5.7.23"), texts
    code, texts = gdel(node_a, LISTED_CACHED, "a@bl-cached.test")
    assert (code, status(texts)) == (550, "5.7.1") and "bl.test" in " ".join(texts), texts


# -- 2. spf_accept, DNSBL, allow and deny lists, plugins: one GDEL each ------------------------

ACCEPTED = (250, "2.0.0")
REFUSED = (550, "5.7.1")

POLICY_CASES = [
    # (node, connecting address, MAIL FROM, expected, words the reply must hold)
    pytest.param("c", C_CLIENT, "a@softfail.test", ACCEPTED, "", id="spf_accept-softfail"),
    pytest.param("c", C_CLIENT, "a@neutral.test", REFUSED, "", id="spf_accept-neutral"),
    pytest.param("c", C_CLIENT, "a@fail.test", (550, "5.7.23"), "", id="spf_accept-fail"),
    pytest.param("a", LISTED, "a@bl-ok.test", REFUSED, "bl.test", id="dnsbl-listed"),
    pytest.param("a", CLIENT, "a@bl-ok.test", ACCEPTED, "", id="dnsbl-unlisted"),
    pytest.param("a", ALLOWED, "a@fail.test", ACCEPTED, "", id="allow-beats-spf-fail"),
    pytest.param("a", DENIED, "a@deny-ok.test", REFUSED, "", id="deny-address"),
    # the control: the same domain from an address not denied passes SPF
    pytest.param("a", CLIENT, "a@deny-ok.test", ACCEPTED, "", id="deny-address-control"),
    pytest.param("a", CLIENT, "a@denied.test", REFUSED, "", id="deny-domain"),
    pytest.param("c", PLUGIN_CLIENT, "a@vetoed.test", REFUSED, "vetoed by veto-test",
                 id="plugin-vetoes"),
    pytest.param("c", PLUGIN_CLIENT, "a@welcome.test", ACCEPTED, "", id="plugin-lets-through"),
]


@pytest.mark.parametrize("node_name, source, sender, expected, words", POLICY_CASES)
def test_policy_verdict(request, node_name, source, sender, expected, words):
    node = request.getfixturevalue(f"node_{node_name}")
    code, texts = gdel(node, source, sender)
    assert (code, status(texts)) == expected, (texts, node.diagnostics(8))
    assert words in " ".join(texts), texts


def test_dnsbl_push(node_a):
    code, texts, _ = push(node_a, LISTED, "a@bl-ok.test")
    assert (code, status(texts)) == REFUSED and "bl.test" in " ".join(texts), texts


# -- 3. floods ---------------------------------------------------------------------------------


def _pending_files(node: Node) -> list[Path]:
    return sorted((node.state_dir / "pending").glob("*.json"))


def _pending_rows(node: Node) -> list[dict]:
    rows = json.loads(node.cli("queue", "--json").stdout)["messages"]
    return [row for row in rows if row.get("queue") == "pending"]


def test_forged_flood_never_reaches_the_victim(node_a):
    total, connections, batch = 1000, 4, 50
    with ConnectionCounter(VICTIM) as victim, ConnectionCounter(FLOODER) as flooder:
        # Earlier tests' notifications are dropped after one refused retrieval.
        wait_until(lambda: not _pending_files(node_a), 20,
                   message=lambda: f"pending/ to drain: {_pending_files(node_a)}")
        refused = 0
        for _ in range(connections):
            with RawSMTP(A_IP, source=FLOODER, timeout=60) as client:
                client.ehlo("mx.victim.test")
                for _ in range(total // connections // batch):
                    lines = []
                    for _ in range(batch):
                        lines += ["MAIL FROM:<newsletter@victim.test>", f"RCPT TO:<{BOB}>",
                                  f"GDEL {new_id()}"]
                    client.send("".join(line + "\r\n" for line in lines))
                    answers = client.read_replies(len(lines), timeout=60)
                    for k in range(0, len(answers), 3):
                        mail, rcpt, notify = answers[k:k + 3]
                        assert mail[0] == 250 and rcpt[0] == 250, (mail, rcpt)
                        assert (notify[0], status(notify[1])) == (550, "5.7.23"), notify
                        refused += 1
                client.command("QUIT")
        assert refused == total
        time.sleep(3)  # give a (wrong) retrieval every chance to happen
        assert victim.count == 0, f"the RMTA connected to the victim: {victim.sources}"
        assert flooder.count == 0, f"the RMTA connected to the flooder: {flooder.sources}"
    assert _pending_files(node_a) == []
    assert _pending_rows(node_a) == []


def test_pending_cap_per_origin(node_c):
    ids = [new_id() for _ in range(4)]
    for gdel_id in ids[:3]:
        code, texts = gdel(node_c, CAP_SOURCE, "a@cap.test", gdel_id=gdel_id)
        assert (code, status(texts)) == (250, "2.0.0"), texts
    code, texts = gdel(node_c, CAP_SOURCE, "a@cap.test", gdel_id=ids[3])
    assert (code, status(texts)) == (452, "4.3.1"), (texts, node_c.diagnostics(10))
    # The same id again is no new notification.
    code, texts = gdel(node_c, CAP_SOURCE, "a@cap.test", gdel_id=ids[0])
    assert (code, status(texts)) == (250, "2.0.0"), texts
    rows = wait_until(
        lambda: [r for r in _pending_rows(node_c) if r["peer"] == CAP_SOURCE],
        10, message="pending rows from the capped origin",
    )
    assert sorted(r["id"] for r in rows) == sorted(ids[:3])


# -- 4. shipped plugins, plugin configuration --------------------------------------------------


def test_shipped_no_literal_helo(node_c):
    code, texts = bare_gdel(node_c, LITERAL, f"[{LITERAL}]")
    assert (code, status(texts)) == (550, "5.7.1"), texts
    assert "host name" in " ".join(texts), texts
    # The control: SPF "none" is accepted on this node, so only the
    # address literal can have been refused.
    code, texts = bare_gdel(node_c, BARE_CLIENT, "none.test")
    assert (code, status(texts)) == (250, "2.0.0"), texts


def _config_only_node(workdir, name, policies, **kwargs) -> Node:
    return Node(workdir, name, "127.0.0.50", ["receiver.test"], "mx.receiver.test",
                settings={"trust": {"policies": policies}}, **kwargs)


def test_checkconfig_unknown_plugin(workdir, plugins_root):
    node = _config_only_node(workdir, "badplugin", ["no-such-plugin"])
    result = node.cli("checkconfig", check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    assert "trust.policies" in output, output
    # The drop-in is found only on its path.
    node = _config_only_node(workdir, "nopath", ["veto-test"])
    assert node.cli("checkconfig", check=False).returncode != 0
    node = _config_only_node(workdir, "withpath", ["veto-test", "no-literal-helo"],
                             pythonpath=[plugins_root])
    result = node.cli("checkconfig", check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")


# -- 5. the telnet forgery ---------------------------------------------------------------------


def _mail_from(node: Node, source: str, sender: str, port: int = SMTP_PORT):
    with RawSMTP(node.address, port=port, source=source) as client:
        client.ehlo("client.outside.test")
        reply = client.command(f"MAIL FROM:<{sender}>")
        if reply[0] == 250:
            # Finish the forgery so that a wrong 250 shows in the mailbox too.
            client.command(f"RCPT TO:<professor@{sender.rpartition('@')[2]}>")
            client.command("DATA")
            client.send(b"Subject: Grades\r\n\r\nforged\r\n.\r\n")
            client.read_reply()
        return reply


@pytest.mark.parametrize("node_name, sender, expected", [
    ("a", "secr@localdomain.test", (550, "5.7.23")),
    ("a", "secr@nospf-local.test", (550, "5.7.1")),
    # push = "accept" and spf_accept = pass, softfail, none: still only pass will do.
    ("c", "secr@c-local.test", (550, "5.7.23")),
    ("c", "secr@c-soft.test", (550, "5.7.1")),
])
def test_telnet_forgery(request, node_name, sender, expected):
    node = request.getfixturevalue(f"node_{node_name}")
    code, texts = _mail_from(node, STRANGER, sender)
    assert code != 250, f"MAIL FROM:<{sender}> from {STRANGER} accepted: {texts}"
    assert (code, status(texts)) == expected, texts
    assert node.delivered(f"professor@{sender.rpartition('@')[2]}") == []


def test_submission_needs_auth(node_a):
    with RawSMTP(A_IP, port=SUBMISSION_PORT, source=STRANGER) as client:
        client.ehlo("client.outside.test")
        code, texts = client.command("MAIL FROM:<secr@localdomain.test>")
        assert (code, status(texts)) == (530, "5.7.0"), texts
        code, texts = client.starttls()
        assert code == 220, texts
        client.ehlo("client.outside.test")
        code, texts = client.command("MAIL FROM:<secr@localdomain.test>")
        assert (code, status(texts)) == (530, "5.7.0"), texts
        code, texts = client.command("RCPT TO:<professor@localdomain.test>")
        assert code >= 500, texts


# -- 6. spf-record -----------------------------------------------------------------------------


def test_spf_record(node_a):
    result = node_a.cli("spf-record")
    lines = [l for l in result.stdout.decode().splitlines() if l and not l.startswith(";")]
    assert lines == [
        f'{domain}.\tIN\tTXT\t"v=spf1 ip4:{A_IP} -all"'
        for domain in ["receiver.test", "localdomain.test", "nospf-local.test"]
    ]
