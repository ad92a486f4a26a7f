"""
``pullmail doctor``: are the DNS records of each local domain right for
this node?  One line per check, ``ok`` / ``warn`` / ``fail`` with a hint;
the exit status is 1 when any check fails.

The lookups go through the node's own resolver (``[dns] nameservers``), so a
test zone or a split-horizon server is asked, as the node itself would ask.
Each check is a function of (domain, facts, resolver) returning L{Check}s.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

import dns.exception
import dns.resolver
import dns.reversename

__all__ = ["Check", "check_dkim", "check_dmarc", "check_mx", "check_mta_sts", "check_ptr",
           "check_spf", "doctor", "parse_tags"]

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    status: str
    domain: str
    name: str
    message: str
    hint: str = ""

    def line(self) -> str:
        hint = f"  (hint: {self.hint})" if self.hint and self.status != OK else ""
        return f"{self.status:<4}  {self.domain}  {self.name}: {self.message}{hint}"


class Lookup:
    """Blocking lookups over a dnspython resolver: lists of text, [] for none."""

    def __init__(self, resolver) -> None:
        self.resolver = resolver

    def __call__(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = self.resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        if rdtype == "TXT":
            return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        if rdtype == "MX":
            return [r.exchange.to_text(omit_final_dot=True).lower()
                    for r in sorted(answer, key=lambda r: r.preference)]
        if rdtype == "PTR":
            return [r.target.to_text(omit_final_dot=True).lower() for r in answer]
        return [r.to_text() for r in answer]

    def addresses(self, host: str) -> list[str]:
        return self(host, "A") + self(host, "AAAA")


def parse_tags(text: str) -> dict[str, str]:
    """``k=v; k2=v2`` (DKIM RFC 6376 3.2, DMARC RFC 7489 6.4, MTA-STS RFC 8461 3.1)."""
    tags = {}
    for part in text.split(";"):
        if part.strip():
            key, equals, value = part.partition("=")
            if not equals:
                raise ValueError(f"{part.strip()!r} is not tag=value")
            tags[key.strip()] = "".join(value.split())
    return tags


def check_mx(domain: str, addresses: list[str], lookup: Lookup) -> list[Check]:
    hosts = lookup(domain, "MX")
    if not hosts:
        return [Check(FAIL, domain, "MX", "no MX record",
                      f"publish '{domain}. IN MX 10 <this node's hostname>.'")]
    found = {host: lookup.addresses(host) for host in hosts}
    ours = [f"{host} [{a}]" for host, listed in found.items() for a in listed if a in addresses]
    if ours:
        return [Check(OK, domain, "MX", f"{', '.join(ours)} is this node")]
    shown = "; ".join(f"{h} -> {', '.join(a) or 'no A/AAAA'}" for h, a in found.items())
    return [Check(FAIL, domain, "MX", f"no MX host points at {', '.join(addresses)}: {shown}",
                  "give an MX host an A/AAAA record with this node's address")]


def check_ptr(domain: str, addresses: list[str], hostname: str, lookup: Lookup) -> list[Check]:
    checks = []
    for address in addresses:
        names = lookup(dns.reversename.from_address(address).to_text(), "PTR")
        if hostname in names and address in lookup.addresses(hostname):
            checks.append(Check(OK, domain, "PTR", f"{address} -> {hostname} -> {address}"))
        else:
            checks.append(Check(
                FAIL, domain, "PTR", f"{address} -> {', '.join(names) or 'no PTR'}",
                f"ask the address's owner for PTR {hostname} (and {hostname} A {address}); "
                "big providers refuse mail without forward-confirmed reverse DNS"))
    return checks


def check_spf(domain: str, addresses: list[str], hostname: str, resolver,
              timeout: float) -> list[Check]:
    from pullmail.net.dns import DNSPermanentError, DNSTemporaryError
    from pullmail.trust.spf import check_host

    def records(name: str, rdtype: str) -> list:
        """The SPF check's lookups, answered by asking (doctor may wait)."""
        try:
            return list(resolver.resolve(name, rdtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as e:
            raise DNSPermanentError(f"{name} {rdtype}: none") from e
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(f"{name} {rdtype}: {e}") from e

    checks = []
    for address in addresses:
        result, explanation = check_host(records, address, domain, f"postmaster@{domain}",
                                         hostname, timeout)
        if result.value == "pass":
            checks.append(Check(OK, domain, "SPF", f"authorises {address}"))
        else:
            checks.append(Check(FAIL, domain, "SPF", f"{result.value} for {address}"
                                f"{': ' + explanation if explanation else ''}",
                                "publish the record `pullmail spf-record` prints"))
    return checks


def _public_key_b64(path: Path, algorithm: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), password=None).public_key()
    if algorithm == "ed25519":     # RFC 8463 4.2: the raw 32-byte key
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:                          # RFC 6376 3.6.1: SubjectPublicKeyInfo, DER
        raw = key.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def check_dkim(domain: str, selector: str, key_dir: Path, lookup: Lookup) -> list[Check]:
    """
    SPEC 11.1: the key at C{<key_dir>/<domain>.<selector>-<alg>.pem} must
    match the record at C{<selector>-<alg>._domainkey.<domain>}.
    """
    checks = []
    for algorithm in ("rsa", "ed25519"):
        name = f"{selector}-{algorithm}._domainkey.{domain}"
        path = Path(key_dir) / f"{domain}.{selector}-{algorithm}.pem"
        label = f"DKIM {selector}-{algorithm}"
        if not path.is_file():
            checks.append(Check(WARN, domain, label, f"no key {path}",
                                "make one with `pullmail dkim-keygen`"))
            continue
        try:
            wanted = _public_key_b64(path, algorithm)
        except (ValueError, TypeError, OSError) as e:
            checks.append(Check(FAIL, domain, label, f"cannot read {path}: {e}"))
            continue
        records = [r for r in lookup(name, "TXT") if "p=" in r]
        if not records:
            checks.append(Check(FAIL, domain, label, f"no TXT record at {name}",
                                "publish the record `pullmail dkim-keygen` prints"))
            continue
        try:
            published = parse_tags(records[0]).get("p", "")
        except ValueError as e:
            checks.append(Check(FAIL, domain, label, f"{name} does not parse: {e}"))
            continue
        if published == wanted:
            checks.append(Check(OK, domain, label, f"{name} matches {path.name}"))
        else:
            checks.append(Check(FAIL, domain, label, f"{name} holds another key than {path}",
                                "publish the record `pullmail dkim-keygen` prints"))
    return checks


def check_dmarc(domain: str, lookup: Lookup) -> list[Check]:
    name = f"_dmarc.{domain}"
    records = [r for r in lookup(name, "TXT") if r.startswith("v=DMARC1")]
    hint = f'publish "{name}. IN TXT \\"v=DMARC1; p=quarantine\\""'
    if len(records) != 1:
        return [Check(FAIL, domain, "DMARC",
                      "no DMARC record" if not records else "more than one DMARC record",
                      hint)]
    try:
        tags = parse_tags(records[0])
    except ValueError as e:
        return [Check(FAIL, domain, "DMARC", f"does not parse: {e}", hint)]
    if tags.get("p") not in ("none", "quarantine", "reject"):
        return [Check(FAIL, domain, "DMARC", f"p={tags.get('p')!r} is not none, quarantine "
                                             "or reject (RFC 7489 6.3)", hint)]
    status = WARN if tags["p"] == "none" else OK
    return [Check(status, domain, "DMARC", f"p={tags['p']}", "p=none asks for no action")]


def fetch_policy(domain: str, port: int, ca: Path | None, timeout: float) -> str:
    context = ssl.create_default_context()
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    url = f"https://mta-sts.{domain}:{port}/.well-known/mta-sts.txt"
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return response.read(65536).decode("utf-8", "replace")


def check_mta_sts(domain: str, lookup: Lookup, fetch: Callable[[str], str]) -> list[Check]:
    """RFC 8461: the TXT record, then the policy over HTTPS; both or neither."""
    records = [r for r in lookup(f"_mta-sts.{domain}", "TXT") if r.startswith("v=STSv1")]
    if not records:
        return [Check(WARN, domain, "MTA-STS", "no _mta-sts TXT record",
                      "optional: publish a policy at https://mta-sts.<domain>/.well-known/"
                      "mta-sts.txt and its TXT record (RFC 8461)")]
    try:
        policy_id = parse_tags(records[0]).get("id", "")
        text = fetch(domain)
    except (ValueError, OSError) as e:
        return [Check(FAIL, domain, "MTA-STS", f"TXT record present, policy not fetched: {e}",
                      "serve the policy, or remove the TXT record")]
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), []).append(value.strip())
    mode = (fields.get("mode") or [""])[0]
    patterns = fields.get("mx", [])
    hosts = lookup(domain, "MX")
    unmatched = [h for h in hosts if not any(_mx_matches(p, h) for p in patterns)]
    if (fields.get("version") or [""])[0] != "STSv1" or mode not in ("enforce", "testing",
                                                                    "none"):
        return [Check(FAIL, domain, "MTA-STS", "the policy does not parse (version, mode)")]
    if unmatched:
        return [Check(FAIL, domain, "MTA-STS", f"MX {', '.join(unmatched)} not in the "
                      f"policy's mx patterns {patterns}", "add them to the policy")]
    return [Check(OK, domain, "MTA-STS", f"id {policy_id}, mode {mode}, every MX matches")]


def _mx_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host.count(".") == pattern.count(".")
    return host == pattern.lower()


def diagnose(config, addresses: list[str], resolver, fetch=None) -> Iterable[Check]:
    lookup = Lookup(resolver)
    hostname = config.node.hostname
    dkim = getattr(config, "dkim", None)
    delivery = config.delivery
    port = getattr(delivery, "mta_sts_port", 443)
    fetch = fetch or (lambda domain: fetch_policy(domain, port, delivery.tls_ca,
                                                  config.dns.timeout))
    for domain in config.node.domains:
        try:
            yield from check_mx(domain, addresses, lookup)
            yield from check_ptr(domain, addresses, hostname, lookup)
            yield from check_spf(domain, addresses, hostname, resolver, config.dns.timeout)
            if dkim is None:
                yield Check(WARN, domain, "DKIM", "no [dkim] section in this pullmail",
                            "upgrade pullmail to sign mail (SPEC 11.1)")
            else:
                key_dir = config.base / dkim.key_dir     # as given when absolute
                yield from check_dkim(domain, dkim.selector, key_dir, lookup)
            yield from check_dmarc(domain, lookup)
            yield from check_mta_sts(domain, lookup, fetch)
        except dns.exception.DNSException as e:
            yield Check(FAIL, domain, "DNS", f"lookup failed: {e.__class__.__name__}: {e}",
                        "check [dns] nameservers")


def doctor(args, out: TextIO) -> int:
    from pullmail.net.dns import make_dnspython_resolver
    from pullmail.node.cli import _load, outbound_addresses

    config = _load(args)
    addresses = [str(ipaddress.ip_address(a)) for a in (args.address or [])] or \
        outbound_addresses(config)
    if not addresses:
        print("fail  -  address: no public address known; give --address IP (or set "
              "[delivery] bind_address)", file=out)
        return 1
    resolver = make_dnspython_resolver(config.dns.nameservers, config.dns.timeout)
    failed = False
    for check in diagnose(config, addresses, resolver):
        print(check.line(), file=out)
        failed = failed or check.status == FAIL
    return 1 if failed else 0
