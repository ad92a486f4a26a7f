"""
The tests' own DNS server (dnsserver.py): what nodes under test will be
pointed at with C{[dns] nameservers}.  Queried here with dnspython, as
pullmail's resolver does.
"""

from __future__ import annotations

import os
import signal

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from .harness import DNSServer, wait_until

RECORDS = {
    "sender.test": {
        "A": ["127.0.0.2"],
        "MX": [[10, "mx.sender.test"]],
        "TXT": ["v=spf1 ip4:127.0.0.2 -all"],
    },
    "mx.sender.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "multi.test": {"MX": [[20, "mx2.multi.test"], [10, "mx1.multi.test"]]},
    "_spf.deep.sub.test": {"TXT": ["v=spf1 -all"]},
}


def resolver(server: DNSServer, tcp: bool = False) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [server.address]
    r.port = server.port
    r.timeout = r.lifetime = 3.0
    return r


def resolve(server, name, rdtype, tcp=False):
    return resolver(server).resolve(name, rdtype, tcp=tcp)


@pytest.fixture
def zone(dns_server):
    dns_server.update(RECORDS)
    return dns_server


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
class RecordTests:
    """A, AAAA, MX and TXT answers, over UDP and over TCP."""

    def test_a(self, zone, tcp):
        answer = resolve(zone, "sender.test", "A", tcp)
        assert [r.address for r in answer] == ["127.0.0.2"]

    def test_aaaa(self, zone, tcp):
        answer = resolve(zone, "mx.sender.test", "AAAA", tcp)
        assert [r.address for r in answer] == ["::1"]

    def test_mx(self, zone, tcp):
        answer = resolve(zone, "sender.test", "MX", tcp)
        assert [(r.preference, r.exchange.to_text()) for r in answer] == [
            (10, "mx.sender.test.")
        ]

    def test_several_mx(self, zone, tcp):
        answer = resolve(zone, "multi.test", "MX", tcp)
        assert sorted((r.preference, r.exchange.to_text()) for r in answer) == [
            (10, "mx1.multi.test."),
            (20, "mx2.multi.test."),
        ]

    def test_txt(self, zone, tcp):
        answer = resolve(zone, "sender.test", "TXT", tcp)
        assert [b"".join(r.strings) for r in answer] == [b"v=spf1 ip4:127.0.0.2 -all"]

    def test_nxdomain(self, zone, tcp):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolve(zone, "nowhere.test", "A", tcp)

    def test_nxdomain_under_served_name(self, zone, tcp):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolve(zone, "nothing.sender.test", "TXT", tcp)


def test_answers_are_authoritative(zone):
    """The AA flag is set: the server is the authority for its records."""
    query = dns.message.make_query("sender.test", "A")
    response = dns.query.udp(query, zone.address, port=zone.port, timeout=3)
    assert response.flags & dns.flags.AA


def test_nxdomain_rcode(zone):
    """An unknown name is rcode NXDOMAIN (not SERVFAIL or REFUSED)."""
    query = dns.message.make_query("unknown.example.invalid", "MX")
    response = dns.query.udp(query, zone.address, port=zone.port, timeout=3)
    assert response.rcode() == dns.rcode.NXDOMAIN


def test_nodata(zone):
    """A name that exists without records of the type: an empty answer."""
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(zone, "mx.sender.test", "MX")


def test_empty_non_terminal_is_not_nxdomain(zone):
    """A name with only descendants exists (RFC 8020): NODATA."""
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(zone, "deep.sub.test", "A")


def test_case_insensitive(zone):
    answer = resolve(zone, "SeNdEr.TeSt", "A")
    assert [r.address for r in answer] == ["127.0.0.2"]


def test_default_ttl(zone):
    assert resolve(zone, "sender.test", "A").rrset.ttl == 60


def test_ttl_option(tmp_path, dns_port):
    with DNSServer(tmp_path, RECORDS, dns_port, ttl=5) as server:
        assert resolve(server, "sender.test", "TXT").rrset.ttl == 5


def test_ttl_in_zone_file(zone):
    zone.update({"$ttl": 1, **RECORDS})
    assert resolve(zone, "sender.test", "MX").rrset.ttl == 1


def test_long_txt_is_split_into_strings(zone):
    """A TXT value over 255 octets is served as several character-strings."""
    text = "v=spf1 " + " ".join(f"ip4:10.0.{i}.0/24" for i in range(30)) + " -all"
    assert len(text) > 255
    zone.update({"long.test": {"TXT": [text]}})
    (record,) = resolve(zone, "long.test", "TXT")
    assert [len(s) for s in record.strings][:-1] == [255] * (len(text) // 255)
    assert b"".join(record.strings) == text.encode()


def test_sighup_reload(zone):
    """update() rewrites the file and SIGHUPs; new records are served at once."""
    assert [r.address for r in resolve(zone, "sender.test", "A")] == ["127.0.0.2"]
    zone.update(
        {
            "sender.test": {"A": ["127.0.0.9"], "TXT": ["v=spf1 ip4:127.0.0.9 -all"]},
            "new.test": {"MX": [[5, "mx.new.test"]]},
        }
    )
    assert [r.address for r in resolve(zone, "sender.test", "A")] == ["127.0.0.9"]
    assert [b"".join(r.strings) for r in resolve(zone, "sender.test", "TXT")] == [
        b"v=spf1 ip4:127.0.0.9 -all"
    ]
    assert [r.preference for r in resolve(zone, "new.test", "MX", tcp=True)] == [5]
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(zone, "sender.test", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(zone, "mx.sender.test", "A")


def test_bad_zone_file_keeps_records(zone):
    """A reload that fails to parse keeps serving the previous records."""
    zone.zone_path.write_text("{not json")
    os.kill(zone.process.pid, signal.SIGHUP)
    wait_until(
        lambda: "cannot load" in zone.output_path.read_text(),
        5,
        message="the server to report the bad zone file",
    )
    assert [r.address for r in resolve(zone, "sender.test", "A")] == ["127.0.0.2"]
    zone.update({"sender.test": {"A": ["127.0.0.3"]}})
    assert [r.address for r in resolve(zone, "sender.test", "A")] == ["127.0.0.3"]


def test_silent_names_never_answered(dns_server):
    """"$silent": a name, and every name under it, gets no answer at all."""
    dns_server.update({**RECORDS, "$silent": ["slow.test"]})
    r = resolver(dns_server)
    r.timeout = r.lifetime = 0.5
    for name in ("slow.test", "deep.under.slow.test"):
        with pytest.raises(dns.exception.Timeout):
            r.resolve(name, "TXT")
    assert [x.address for x in resolve(dns_server, "sender.test", "A")] == ["127.0.0.2"]
