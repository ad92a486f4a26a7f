"""
Where to connect for a domain, decided without I/O: the mail hosts in
preference order (RFC 5321 5.1, implicit MX), a null MX (RFC 7505), the cap
on hosts and addresses tried per attempt (``[delivery] mx_limit``) and the
networks never connected to (``[delivery] blocked_networks``).

Outbound delivery (SPEC 7) and the retrieval fallback to an origin's MX
hosts (SPEC 4) both pick their targets here; the caller looks up each
host's addresses and offers them to a L{TargetPicker} until it is full.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

__all__ = ["BlockedAddress", "NullMX", "Target", "TargetPicker", "blocked", "guarded",
           "mail_hosts", "pick"]

# RFC 7505 3: the exchange of a null MX is the root, "." (dnspython's text
# without the final dot is "").
_ROOT = ("", ".")


class NullMX(Exception):
    """The domain says it accepts no mail (RFC 7505 3): ``MX 0 .``."""


def mail_hosts(domain: str, records: Sequence[tuple[int, str]], limit: int) -> list[str]:
    """
    The first C{limit} mail hosts of C{domain} in preference order, from its
    MX C{records} [(preference, host)]: the domain itself when it has none
    (RFC 5321 5.1, implicit MX).  L{NullMX} when the only record is a null
    MX (RFC 7505 3); a root exchange among others is skipped, since no one
    can connect to the root.
    """
    if not records:
        return [domain.lower()][:limit]
    if all(host.rstrip(".") == "" for _, host in records):
        raise NullMX(f"domain {domain} accepts no mail (null MX, RFC 7505)")
    hosts: list[str] = []
    for _, host in sorted(records):
        host = host.rstrip(".").lower()
        if host not in _ROOT and host not in hosts:
            hosts.append(host)
    return hosts[:limit]


def _address(text: str):
    """An IPv4-mapped IPv6 address is checked as the IPv4 one (RFC 4291 2.5.5.2)."""
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def blocked(address: str, networks: Iterable) -> bool:
    """Whether C{address} lies in one of C{networks}; an unparsable address is."""
    try:
        ip = _address(address)
    except ValueError:
        return True
    return any(ip.version == network.version and ip in network for network in networks)


class BlockedAddress(ConnectionRefusedError):
    """An address in ``[delivery] blocked_networks``: never connected to."""


def guarded(connect: Callable, networks: Iterable) -> Callable:
    """
    C{connect(address, port, ...)} that refuses, before any packet is sent,
    an address in C{networks}: the one gate every outbound connection of
    the node passes (push, notification, RETR), whoever chose the address.
    """
    networks = tuple(networks)

    def connect_unless_blocked(address: str, port: int, *args, **kwargs):
        if blocked(address, networks):
            raise BlockedAddress(f"{address} is in a blocked network "
                                 "(delivery.blocked_networks)")
        return connect(address, port, *args, **kwargs)

    return connect_unless_blocked


@dataclass(frozen=True)
class Target:
    """One address to connect to, and the mail host it belongs to."""

    host: str
    address: str


@dataclass
class TargetPicker:
    """
    Takes the addresses of one host after another and hands back those to
    try: at most C{limit} in all, none twice, none in C{networks}.  Each
    address skipped for its network is kept in C{refused}.
    """

    limit: int
    networks: tuple = ()
    chosen: list[Target] = field(default_factory=list)
    refused: list[Target] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.chosen) >= self.limit

    def offer(self, host: str, addresses: Iterable[str]) -> list[Target]:
        """The new targets among C{host}'s C{addresses}, in their order."""
        taken = {target.address for target in self.chosen + self.refused}
        new: list[Target] = []
        for address in addresses:
            if self.full:
                break
            if address in taken:
                continue
            taken.add(address)
            target = Target(host, address)
            if blocked(address, self.networks):
                self.refused.append(target)
                continue
            self.chosen.append(target)
            new.append(target)
        return new

    def explain(self) -> str:
        """Why nothing (more) was tried, for the deferral reason."""
        if not self.refused:
            return ""
        skipped = ", ".join(f"{t.host}[{t.address}]" for t in self.refused[:5])
        return f"blocked network (delivery.blocked_networks): {skipped}"


def pick(hosts: Iterable[tuple[str, Sequence[str]]], limit: int, networks=()) -> list[Target]:
    """The targets a L{TargetPicker} chooses from (host, addresses) pairs, in order."""
    picker = TargetPicker(limit, tuple(networks))
    for host, addresses in hosts:
        if picker.full:
            break
        picker.offer(host, addresses)
    return picker.chosen
