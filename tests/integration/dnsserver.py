"""
A small authoritative DNS server for the integration tests, on twisted.names.

Run as a program::

    python tests/integration/dnsserver.py --listen 127.0.0.1:5353 \\
        --zone-file zone.json [--ttl 60] [--ready-file ready]

It answers over UDP and TCP from a JSON file mapping names to records::

    {"sender.test": {"A": ["127.0.0.2"], "MX": [[10, "mx.sender.test"]],
                     "TXT": ["v=spf1 ip4:127.0.0.2 -all"]},
     "mx.sender.test": {"A": ["127.0.0.2"]}}

Record types: A, AAAA, MX ([preference, exchange]), TXT (a string, or a list
of strings for one record of several character-strings), CNAME, PTR, NS.
Optional top-level keys: ``"$ttl"`` (overrides ``--ttl`` for the file),
``"$serial"`` (echoed into the ready file, see below) and ``"$silent"``, a
list of names that are never answered, nor any name under them: a
nameserver an attacker controls and keeps silent.

The server is authoritative for the whole name space: a name that is not in
the file (and has no descendant in it) is NXDOMAIN; a name that exists
without records of the asked type is an empty answer with an SOA (NODATA).
So a node under test never sends a query to the real DNS.  Names compare
case-insensitively; a trailing dot is ignored.

On SIGHUP the zone file is read again.  After every successful load the
server writes the file's ``$serial`` (or the number of loads, from 0) to
the ready file, so that a test can wait for a reload to take effect.  A
file that does not parse keeps the old records and is reported on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.names import common, dns, server
from twisted.python import failure

_TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "CNAME": dns.CNAME,
    "PTR": dns.PTR,
    "NS": dns.NS,
}


def _normal(name: str | bytes) -> bytes:
    if isinstance(name, str):
        name = name.encode("idna") if not name.isascii() else name.encode("ascii")
    return name.rstrip(b".").lower()


def _txt_strings(value) -> list[bytes]:
    """One TXT record: a string is split into 255-octet character-strings."""
    if isinstance(value, list):
        return [part.encode("utf-8") for part in value]
    data = value.encode("utf-8")
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


def _payload(rtype: str, value, ttl: int):
    if rtype == "A":
        return dns.Record_A(value, ttl=ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(value, ttl=ttl)
    if rtype == "MX":
        preference, exchange = value
        return dns.Record_MX(int(preference), exchange.encode("ascii"), ttl=ttl)
    if rtype == "TXT":
        return dns.Record_TXT(*_txt_strings(value), ttl=ttl)
    if rtype == "CNAME":
        return dns.Record_CNAME(value.encode("ascii"), ttl=ttl)
    if rtype == "PTR":
        return dns.Record_PTR(value.encode("ascii"), ttl=ttl)
    if rtype == "NS":
        return dns.Record_NS(value.encode("ascii"), ttl=ttl)
    raise ValueError(f"unsupported record type {rtype!r}")


class Zone:
    """Records parsed from the JSON mapping; raises ValueError when bad."""

    def __init__(self, mapping: dict, default_ttl: int) -> None:
        if not isinstance(mapping, dict):
            raise ValueError("the zone file must hold a JSON object")
        self.ttl = int(mapping.get("$ttl", default_ttl))
        self.serial = mapping.get("$serial")
        silent = mapping.get("$silent", [])
        if not isinstance(silent, list):
            raise ValueError("$silent must be a list of names")
        self.silent = tuple(_normal(name) for name in silent)
        self.records: dict[bytes, list] = {}
        for name, types in mapping.items():
            if name.startswith("$"):
                continue
            if not isinstance(types, dict):
                raise ValueError(f"{name}: must map record types to lists")
            entries = self.records.setdefault(_normal(name), [])
            for rtype, values in types.items():
                rtype = rtype.upper()
                if rtype not in _TYPES:
                    raise ValueError(f"{name}: unsupported record type {rtype!r}")
                if not isinstance(values, list):
                    values = [values]
                for value in values:
                    entries.append(_payload(rtype, value, self.ttl))

    def is_silent(self, name: bytes) -> bool:
        return any(name == s or name.endswith(b"." + s) for s in self.silent)

    def exists(self, name: bytes) -> bool:
        """The name has records, or is an empty non-terminal (RFC 8020)."""
        if name in self.records:
            return True
        suffix = b"." + name
        return any(other.endswith(suffix) for other in self.records)

    def soa(self, name: bytes) -> dns.RRHeader:
        labels = name.split(b".")
        apex = b".".join(labels[-2:]) if len(labels) >= 2 else name
        record = dns.Record_SOA(
            mname=b"ns." + apex,
            rname=b"hostmaster." + apex,
            serial=int(self.serial or 1),
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=self.ttl,
            ttl=self.ttl,
        )
        return dns.RRHeader(apex, dns.SOA, dns.IN, self.ttl, record, auth=True)


class JSONAuthority(common.ResolverBase):
    """An authority over every name, reading its records from a Zone."""

    def __init__(self, zone: Zone) -> None:
        common.ResolverBase.__init__(self)
        self.zone = zone

    def _lookup(self, name, cls, type, timeout=None):
        zone = self.zone
        key = _normal(name)
        if zone.is_silent(key):
            return defer.Deferred()   # never answered: the client times out
        if not zone.exists(key):
            return defer.fail(failure.Failure(dns.AuthoritativeDomainError(name)))
        answers, cnames = [], []
        for record in zone.records.get(key, []):
            header = dns.RRHeader(name, record.TYPE, dns.IN, record.ttl, record, auth=True)
            if record.TYPE == type or type == dns.ALL_RECORDS:
                answers.append(header)
            elif record.TYPE == dns.CNAME:
                cnames.append(header)
        if not answers and cnames:
            answers = cnames
            target = _normal(cnames[0].payload.name.name)
            for record in zone.records.get(target, []):
                if record.TYPE == type:
                    answers.append(
                        dns.RRHeader(target, record.TYPE, dns.IN, record.ttl, record, auth=True)
                    )
        additional = []
        for answer in answers:
            if answer.type == dns.MX:
                exchange = _normal(answer.payload.name.name)
                for record in zone.records.get(exchange, []):
                    if record.TYPE in (dns.A, dns.AAAA):
                        additional.append(
                            dns.RRHeader(exchange, record.TYPE, dns.IN, record.ttl,
                                         record, auth=True)
                        )
        authority = [] if answers else [zone.soa(key)]
        return defer.succeed((answers, authority, additional))


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT for UDP and TCP")
    parser.add_argument("--zone-file", required=True, type=Path)
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)

    host, port = _hostport(args.listen)
    loads = 0

    def load() -> Zone:
        nonlocal loads
        zone = Zone(json.loads(args.zone_file.read_text("utf-8")), args.ttl)
        serial = zone.serial if zone.serial is not None else loads
        loads += 1
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(f"{serial}\n")
            os.replace(tmp, args.ready_file)
        return zone

    authority = JSONAuthority(Zone({}, args.ttl))

    def reload() -> None:
        try:
            authority.zone = load()
        except (OSError, ValueError, TypeError) as e:
            print(f"dnsserver: cannot load {args.zone_file}: {e}", file=sys.stderr, flush=True)
        else:
            print(f"dnsserver: loaded {args.zone_file}", flush=True)

    factory = server.DNSServerFactory(authorities=[authority])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=host)
    reactor.listenTCP(port, factory, interface=host)
    print(f"dnsserver: listening on {host}:{port} (UDP, TCP)", flush=True)
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    reactor.callWhenRunning(reload)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
