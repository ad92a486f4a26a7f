"""
Verdicts on received mail (pullmail.inbound.verdicts) and what the router
does with them (SPEC 11.1): one Authentication-Results at the top; DMARC
reject gets 550 5.7.1 and nothing is stored; quarantine goes to .Junk;
report writes the header only; SPF is the session's result, asked once.
"""

from __future__ import annotations

import dkim
import pytest
from test_dkim import MESSAGE, NOW, FakeTXT, blocking, verifier
from test_router import FakeOutbound
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail.accounts.users import Accounts
from pullmail.inbound.router import Router
from pullmail.inbound.verdicts import MessageChecker
from pullmail.smtp.envelope import Envelope, Session
from pullmail.testing import FakeDeliveryAgent, FakeResolver, result_of
from pullmail.trust.arc import ARCVerifier
from pullmail.trust.dkim import Signer
from pullmail.trust.dmarc import DMARCChecker, OrganizationalDomains
from pullmail.trust.spf import SPFIdentity, SPFResult

FOREIGN = MESSAGE.replace(b"alice@example.org", b"carol@bank.test")


@pytest.fixture(scope="module")
def domains():
    return OrganizationalDomains()


class FakeSPF:
    def __init__(self, result=SPFResult.PASS) -> None:
        self.result = result
        self.asked = []

    def __call__(self, peer, domain, helo, sender):
        self.asked.append((peer, domain, helo, sender))
        return defer.succeed((self.result, ""))


def make(dkim_keys, domains, dmarc_record="v=DMARC1; p=reject", mode="enforce",
         spf=SPFResult.FAIL, run_blocking=None):
    records = dict(dkim_keys[1])
    records["_dmarc.bank.test"] = dmarc_record
    records["_dmarc.example.org"] = "v=DMARC1; p=reject"
    txt = FakeTXT(records)
    spf_check = FakeSPF(spf)
    checker = MessageChecker("mx.example.org", spf_check, verifier(txt),
                             DMARCChecker(txt, domains, lambda: 0.0), mode,
                             ARCVerifier(txt, blocking))
    clock = Clock()
    clock.advance(NOW)
    accounts = Accounts(frozenset({"example.org"}), users={"bob@example.org": "h"},
                        aliases={"fwd@example.org": ("dave@remote.test",)})
    delivery, outbound = FakeDeliveryAgent(), FakeOutbound()
    router = Router("mx.example.org", accounts, delivery, clock, outbound,
                    checker=checker, signer=Signer(dkim_keys[0], clock, run_blocking))
    return router, delivery, outbound, spf_check


def accept(router, message, recipients=("bob@example.org",), session=None, identity=None,
           sender="carol@bank.test"):
    session = session or Session("192.0.2.9", helo="mail.bank.test", esmtp=True)
    envelope = Envelope(sender, tuple(recipients))
    return result_of(router.accept(session, envelope, [message], len(message),
                                   identity=identity))


def test_spoofed_mail_under_p_reject_gets_550_and_is_not_stored(dkim_keys, domains):
    router, delivery, outbound, _ = make(dkim_keys, domains)
    reply = accept(router, FOREIGN, ("bob@example.org", "fwd@example.org"))
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert "DMARC policy of bank.test" in reply.text
    assert delivery.calls == [] and outbound.calls == []


def test_quarantine_goes_to_junk(dkim_keys, domains):
    router, delivery, _, _ = make(dkim_keys, domains, "v=DMARC1; p=quarantine")
    assert accept(router, FOREIGN).code == 250
    assert delivery.folders == [".Junk"]
    stored = b"".join(delivery.calls[0][3])
    assert stored.startswith(b"Authentication-Results: mx.example.org;")
    assert b"dmarc=fail (p=quarantine dis=quarantine) header.from=bank.test" in stored


def test_several_from_fields_get_550_under_enforce(dkim_keys, domains):
    """RFC 7489 6.6.1 / RFC 5322 3.6: our policy refuses what it cannot judge."""
    router, delivery, _, _ = make(dkim_keys, domains)
    twice = b"From: friend@bank.test\r\n" + FOREIGN
    reply = accept(router, twice)
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert reply.text == "Rejected by the DMARC check: 2 From fields"
    assert delivery.calls == []
    router, delivery, _, _ = make(dkim_keys, domains, mode="report")
    assert accept(router, twice).code == 250
    assert b"dmarc=permerror (2 From fields)" in b"".join(delivery.calls[0][3])


@pytest.mark.parametrize("mode", ["report", "off"])
def test_report_and_off_only_write_the_header(dkim_keys, domains, mode):
    router, delivery, _, _ = make(dkim_keys, domains, mode=mode)
    assert accept(router, FOREIGN).code == 250
    assert delivery.folders == [None]
    stored = b"".join(delivery.calls[0][3])
    assert (b"dmarc=fail (p=reject dis=reject)" in stored) == (mode == "report")
    assert b"spf=fail smtp.mailfrom=carol@bank.test;\r\n\tdkim=none" in stored


def test_signed_mail_passes_and_forged_results_are_removed(dkim_keys, domains):
    router, delivery, _, spf = make(dkim_keys, domains, spf=SPFResult.NONE)
    signed = b"".join(Signer(dkim_keys[0], Clock()).sign([MESSAGE]))
    forged = b"Authentication-Results: mx.example.org; dmarc=pass header.from=bank.test\r\n"
    assert accept(router, forged + signed, sender="alice@example.org").code == 250
    stored = b"".join(delivery.calls[0][3])
    assert stored.count(b"Authentication-Results:") == 1
    assert stored.index(b"Authentication-Results:") == 0
    assert stored.count(b"\tdkim=pass header.d=example.org") == 2
    assert b"dmarc=pass (p=reject dis=none) header.from=example.org" in stored
    assert b"header.from=bank.test" not in stored
    assert spf.asked == [("192.0.2.9", "example.org", "mail.bank.test", "alice@example.org")]


def test_retrieved_mail_asks_spf_about_the_notifying_session(dkim_keys, domains):
    router, delivery, _, spf = make(dkim_keys, domains, "v=DMARC1; p=none")
    identity = SPFIdentity("198.51.100.7", "notifier.bank.test", "carol@bank.test")
    accept(router, FOREIGN, identity=identity)
    assert spf.asked == [("198.51.100.7", "bank.test", "notifier.bank.test", "carol@bank.test")]


def test_null_sender_checks_the_helo_identity(dkim_keys, domains):
    router, delivery, _, spf = make(dkim_keys, domains, "v=DMARC1; p=none")
    accept(router, FOREIGN, sender="")
    assert spf.asked == [("192.0.2.9", "mail.bank.test", "mail.bank.test", None)]
    assert b"smtp.helo=mail.bank.test" in b"".join(delivery.calls[0][3])


def test_submission_is_signed_for_the_outbox_and_marked_auth_pass(dkim_keys, domains):
    router, delivery, outbound, spf = make(dkim_keys, domains)
    session = Session("192.0.2.1", service="submission", helo="laptop", esmtp=True,
                      user="alice@example.org")
    reply = accept(router, MESSAGE, ("bob@example.org", "dave@remote.test"), session=session,
                   sender="alice@example.org")
    assert reply.code == 250
    local = b"".join(delivery.calls[0][3])
    assert local.startswith(b"Authentication-Results: mx.example.org;\r\n\tauth=pass "
                            b"smtp.auth=alice@example.org\r\n")
    sent = b"".join(outbound.calls[0][3])
    assert sent.count(b"DKIM-Signature:") == 2 and b"Authentication-Results" not in sent
    assert spf.asked == []


def assert_chain_passes(message: bytes, records) -> None:
    """dkimpy, as the next hop would, validates the whole ARC chain."""
    cv, _, reason = dkim.arc_verify(
        message, dnsfunc=lambda name, timeout=5: records[name.decode().rstrip(".")].encode())
    assert cv == dkim.CV_Pass, reason


def sealed_arrival(dkim_keys, body: bytes = b"Shall we?") -> bytes:
    """FOREIGN as a list at example.org sealed it (i=1), its body then C{body}."""
    upstream = b"Authentication-Results: lists.example.org; spf=pass smtp.mailfrom=x@y.test\r\n"
    arc = Signer(dkim_keys[0], Clock()).seal(upstream + FOREIGN, "example.org", upstream, "none")
    return b"".join(arc) + upstream + FOREIGN.replace(b"Shall we?", body)


def test_alias_forward_carries_verdicts_and_an_arc_set(dkim_keys, domains):
    router, delivery, outbound, _ = make(dkim_keys, domains, "v=DMARC1; p=none")
    assert accept(router, FOREIGN, ("fwd@example.org",)).code == 250
    sent = b"".join(outbound.calls[0][3])
    assert sent.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.org;")
    assert_chain_passes(sent, dkim_keys[1])
    assert b"ARC-Authentication-Results: i=1; mx.example.org;" in sent
    assert b"DKIM-Signature" not in sent          # not our From: not signed
    assert b"\r\nAuthentication-Results: mx.example.org;" in sent


def test_an_arc_sealed_arrival_gets_arc_pass_and_a_forward_continues_its_chain(
        dkim_keys, domains):
    """RFC 8617: arc= in our results; the set we add is i=2 with cv=pass."""
    router, delivery, outbound, _ = make(dkim_keys, domains, "v=DMARC1; p=none")
    arrived = sealed_arrival(dkim_keys)
    assert accept(router, arrived, ("bob@example.org", "fwd@example.org")).code == 250
    stored = b"".join(delivery.calls[0][3])
    assert b"\tarc=pass (i=1 d=example.org);\r\n" in stored.split(b"\r\n\r\n")[0] + b"\r\n"
    sent = b"".join(outbound.calls[0][3])
    assert sent.startswith(b"ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=example.org;")
    assert_chain_passes(sent, dkim_keys[1])


def test_a_broken_chain_is_arc_fail_and_the_forward_seals_cv_fail(dkim_keys, domains):
    arrived = sealed_arrival(dkim_keys, b"Pay me.")
    router, delivery, outbound, _ = make(dkim_keys, domains, "v=DMARC1; p=none")
    assert accept(router, arrived, ("bob@example.org", "fwd@example.org")).code == 250
    assert b"\tarc=fail (i=1 d=example.org Most recent ARC-Message-Signature did not validate)" \
        in b"".join(delivery.calls[0][3])
    assert b"".join(outbound.calls[0][3]).startswith(b"ARC-Seal: i=2; cv=fail;")


def test_a_large_forward_is_signed_and_sealed_off_the_reactor_thread(dkim_keys, domains):
    ran = []

    def run(function, *args):
        ran.append(function.__name__)
        return defer.succeed(function(*args))

    router, _, outbound, _ = make(dkim_keys, domains, "v=DMARC1; p=none", run_blocking=run)
    ours = b"".join(Signer(dkim_keys[0], Clock()).sign([MESSAGE + b"z" * 76 * 1000]))
    assert accept(router, ours, ("fwd@example.org",), sender="alice@example.org").code == 250
    sent = b"".join(outbound.calls[0][3])
    assert sent.startswith(b"ARC-Seal: i=1; cv=none;") and sent.count(b"DKIM-Signature:") == 4
    assert ran == ["sign", "seal"]


def test_bounces_are_signed_by_the_local_domain_of_the_hostname(dkim_keys, domains):
    """Bounces come from MAILER-DAEMON@<hostname>: signed by the parent domain."""
    router, delivery, outbound, _ = make(dkim_keys, domains)
    notice = MESSAGE.replace(b"alice@example.org", b"MAILER-DAEMON@mx.example.org")
    result_of(router.inject("", ["dave@remote.test", "bob@example.org"], [notice]))
    assert b"".join(outbound.calls[0][3]).count(b"d=example.org;") == 2
    assert b"".join(delivery.calls[0][3]).startswith(
        b"Authentication-Results: mx.example.org;\r\n\tnone\r\n")


def test_authentication_results_reuse_the_sessions_spf_check():
    """The trust check's SPF result is reused; trust decisions after TRUST_REUSE check afresh."""
    from pullmail.config import TrustConfig
    from pullmail.trust import policy

    calls = []

    async def check_host(resolver, ip, domain, sender, helo, timeout, clock):
        calls.append((ip, domain, helo, sender))
        return SPFResult.PASS, ""

    clock = Clock()
    trust = policy.TrustChecker(TrustConfig(push="spf-pass"), FakeResolver(), clock, 5.0,
                                spf_check=check_host)
    session = Session("192.0.2.9", helo="mail.bank.test")
    envelope = Envelope("carol@bank.test", ("bob@example.org",))
    assert result_of(trust.check_push(session, envelope)) is None
    asked = ("192.0.2.9", "bank.test", "mail.bank.test", "carol@bank.test")
    assert result_of(trust.spf_result(*asked))[0] is SPFResult.PASS
    assert len(calls) == 1
    assert result_of(trust.check_push(session, envelope)) is None
    assert len(calls) == 1              # a pass is reused for policy.TRUST_REUSE
    clock.advance(policy.TRUST_REUSE + 0.1)
    assert result_of(trust.check_push(session, envelope)) is None
    assert len(calls) == 2
    clock.advance(61)
    result_of(trust.spf_result(*asked))
    assert len(calls) == 3
